"""Peak memory and time of pruning against model size (issue 10): the O(sqrt N) claim, measured.

For each model shape (random weights of real architectures: memory and time do not depend
on the values; `structprune.models.synthetic`), write the bf16 checkpoint once, then run
``structprune prune`` on it in a child process per method, each inside its own cgroup v1
memory group (a cap: ``--cap-gib``, or a safety cap that keeps an O(N) run from taking
the machine down). Records the child's peak resident memory (its report and the cgroup's
``memory.max_usage_in_bytes``), the baseline of an empty process that imported the same
libraries, wall time, and whether it finished; then the log-log slope of (peak - baseline)
against parameter count per method, a Markdown table, JSON and a plot.

    python benchmarks/scale.py --sizes smollm2-135m,tinyllama-1.1b --methods structprune,global \\
        --out benchmarks/results/scale_cpu --resume
    python benchmarks/scale.py --sizes llama-2-7b --methods structprune --cap-gib 6 \\
        --out benchmarks/results/scale_cpu_capped --resume

Needs root for the cgroup (``/sys/fs/cgroup/memory``); without it the runs are uncapped and
the table says so. On a GPU machine the same script records the report's peak GPU memory
(``torch.cuda.max_memory_allocated``) as well.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without install
from structprune.bench import hardware_name  # noqa: E402
from structprune.models.synthetic import SHAPES, checkpoint_plan, synthetic_config  # noqa: E402

PY = sys.executable
CGROUP = Path("/sys/fs/cgroup/memory")
SAFETY_CAP_GIB = 20  # of this machine's 24: an O(N) run that does not fit dies alone


def sh(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd).replace(PY, "python")


def n_params(shape: str) -> int:
    import torch

    return checkpoint_plan(synthetic_config(shape), torch.bfloat16, "2GB").total_parameters


def ensure_checkpoint(shape: str, work: Path, log: list[str]) -> Path:
    folder = work / "ckpt" / shape
    if (folder / "config.json").is_file():
        return folder
    cmd = [PY, "-m", "structprune.models.synthetic", shape, "--output", str(folder), "--dtype", "bfloat16",
           "--max-shard-size", "2GB"]
    log.append(sh(cmd))
    print("+", sh(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return folder


class MemoryGroup:
    """A cgroup v1 memory group capping one child process (and reporting its peak)."""

    def __init__(self, name: str, limit: int):
        self.path = CGROUP / name
        self.ok = CGROUP.is_dir() and os.access(CGROUP, os.W_OK)
        if self.ok:
            self.path.mkdir(exist_ok=True)
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            # Without swap on these machines the limit is hard; make sure no swap hides usage.
            swappiness = self.path / "memory.swappiness"
            if swappiness.exists():
                swappiness.write_text("0")
            (self.path / "memory.max_usage_in_bytes").write_text("0")

    def join(self) -> None:  # runs in the child before exec
        if self.ok:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def read(self) -> dict:
        if not self.ok:
            return {}
        def val(f):
            return int((self.path / f).read_text())
        return {"cgroup_limit_bytes": val("memory.limit_in_bytes"),
                "cgroup_max_usage_bytes": val("memory.max_usage_in_bytes"), "cgroup_failcnt": val("memory.failcnt")}

    def close(self) -> None:
        if self.ok:
            try:
                self.path.rmdir()
            except OSError:
                pass


def baseline_rss(threads: int) -> int:
    """Resident memory of a process that imported what ``structprune prune`` imports."""
    code = ("import torch, transformers, safetensors, structprune.cli, structprune.api;"
            "import structprune.models.checkpoint, structprune.solvers;"
            "print(int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024)")
    out = subprocess.run([PY, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return int(out.stdout.strip())


def run_one(shape: str, method: str, ckpt: Path, args, log: list[str]) -> dict:
    out = Path(args.work) / "out" / f"{shape}-{method}"
    cmd = [PY, "-m", "structprune.cli", "prune", str(ckpt), "--sparsity", str(args.sparsity), "--method", method,
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--eval", "", "--output", str(out),
           "--overwrite", "--max-shard-size", args.max_shard_size, "-q"]
    if args.device:
        cmd += ["--device", args.device]
    if args.activation_budget:
        cmd += ["--activation-budget", args.activation_budget]
    if not args.quiet:
        cmd.remove("-q")  # progress bars in the run's log: where the time (or the memory) went
    cap = int((args.cap_gib or SAFETY_CAP_GIB) * 2**30)
    group = MemoryGroup(f"structprune-scale-{os.getpid()}", cap)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    log.append(f"(cgroup memory.limit_in_bytes={cap}) OMP_NUM_THREADS={args.threads} {sh(cmd)}")
    print("+", log[-1], flush=True)
    t0 = time.perf_counter()
    with open(Path(args.work) / f"{shape}-{method}.log", "w") as logf:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                              preexec_fn=group.join)
    wall = time.perf_counter() - t0
    row = {"shape": shape, "method": method, "params": n_params(shape), "returncode": proc.returncode,
           "wall_seconds": wall, "capped": args.cap_gib is not None, "cap_enforced": group.ok, **group.read()}
    group.close()
    report = out / "report.json"
    if proc.returncode == 0 and report.is_file():
        r = json.loads(report.read_text())
        row.update(finished=True, prune_seconds=r["prune_seconds"], peak_rss_bytes=r["peak_rss_bytes"],
                   process_peak_rss_bytes=r["process_peak_rss_bytes"], peak_gpu_mem_bytes=r["peak_gpu_mem_bytes"],
                   sparsity_achieved=r["sparsity_achieved"], residency=r.get("residency"),
                   memory=r.get("memory"), timings=r.get("timings"))
    else:
        tail = (Path(args.work) / f"{shape}-{method}.log").read_text()[-600:]
        killed = proc.returncode in (-9, 137) or row.get("cgroup_failcnt", 0) > 0
        row.update(finished=False, why=("killed at the memory limit of %.1f GiB" % (cap / 2**30)) if killed
                   else "failed: " + tail.strip().splitlines()[-1] if tail.strip() else "failed")
    return row


def slope(rows: list[dict], base: int) -> float | None:
    pts = [(math.log(r["params"]), math.log(r["process_peak_rss_bytes"] - base)) for r in rows
           if r.get("finished") and r["process_peak_rss_bytes"] > base]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def write_outputs(res: dict, out: Path) -> None:
    rows, base = res["rows"], res["baseline_rss_bytes"]
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    gib = 2 ** 30
    lines = [f"# Pruning memory and time against model size ({res['hardware']})", "",
             f"Random-weight bf16 checkpoints of real shapes, pruned to {res['settings']['sparsity']:.0%} with "
             f"calibration {res['settings']['nsamples']}x{res['settings']['seqlen']} (C4), compute float32 on "
             f"{res['settings']['device'] or 'cpu'}, {res['settings']['threads']} threads. Peak = the child "
             "process's peak resident memory (VmHWM / ru_maxrss); baseline = an empty process with the same "
             f"imports: {base / gib:.2f} GiB. Every run in its own cgroup v1 memory group whose limit is the "
             f"'cap' column (an enforced cap, or a safety cap of {SAFETY_CAP_GIB} GiB"
             f"{'' if res['cgroup'] else '; NOT enforced here: not root'}); 'fp32 model' is the model's size in "
             "the compute dtype.", "",
             "| model | params | bf16 on disk | fp32 model | method | cap | finished | wall | prune | peak RSS | "
             "peak − baseline | cgroup peak | peak GPU |",
             "|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        disk = r["params"] * 2 / gib
        cap = (f"{r['cgroup_limit_bytes'] / gib:.0f} GiB" + ("" if r["capped"] else " (safety)")
               if r.get("cgroup_limit_bytes") else "none")
        head = f"| {r['shape']} | {r['params'] / 1e9:.2f}B | {disk:.2f} GiB | {2 * disk:.2f} GiB | {r['method']} | {cap} "
        if r.get("finished"):
            lines.append(head + "| yes | "
                         f"{r['wall_seconds'] / 60:.1f} min | {r['prune_seconds'] / 60:.1f} min | "
                         f"{r['process_peak_rss_bytes'] / gib:.2f} GiB | {(r['process_peak_rss_bytes'] - base) / gib:.2f} GiB | "
                         f"{r.get('cgroup_max_usage_bytes', 0) / gib:.2f} GiB | "
                         f"{(r['peak_gpu_mem_bytes'] or 0) / gib:.2f} GiB |")
        else:
            lines.append(head + f"| no: {r['why']} | {r['wall_seconds'] / 60:.1f} min | | | | "
                         f"{r.get('cgroup_max_usage_bytes', 0) / gib:.2f} GiB | |")
    lines += ["", "Log-log slope of (peak RSS − baseline) against parameters, over the finished runs:", ""]
    for m in sorted({r["method"] for r in rows}):
        s = slope([r for r in rows if r["method"] == m], base)
        lines.append(f"* {m}: " + (f"{s:.3f}" if s is not None else "fewer than two finished sizes"))
    lines += ["", "Commands:", "", "```", *res["commands"], "```", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for m in sorted({r["method"] for r in rows}):
        pts = [(r["params"], (r["process_peak_rss_bytes"] - base) / gib) for r in rows
               if r["method"] == m and r.get("finished")]
        if pts:
            ax.loglog(*zip(*pts), "o-", label=m)
    ax.set_xlabel("parameters")
    ax.set_ylabel("peak RSS − baseline (GiB)")
    ax.set_title("Pruning memory against model size (CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="smollm2-135m,llama-3.2-1b,tinyllama-1.1b,llama-3.2-3b,llama-2-7b",
                    help=f"comma-separated shapes: {', '.join(SHAPES)}")
    ap.add_argument("--methods", default="structprune,global")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--cap-gib", type=float, default=None, help="enforced memory cap per run (cgroup v1)")
    ap.add_argument("--max-shard-size", default="1GB", help="the output writer holds up to one shard in RAM")
    ap.add_argument("--activation-budget", default=None, help="passed to structprune prune (default: its own)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars in the runs' logs")
    ap.add_argument("--work", default=os.environ.get("STRUCTPRUNE_SCALE_DIR", "/tmp/structprune-scale"))
    ap.add_argument("--out", default="benchmarks/results/scale_cpu", help="output stem (.md, .json, .png)")
    ap.add_argument("--resume", action="store_true", help="keep finished rows of an earlier run of --out")
    ap.add_argument("--keep-checkpoints", action="store_true", help="do not delete each size's checkpoint after")
    args = ap.parse_args(argv)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res = {"hardware": hardware_name(args.device or "cpu"), "rows": [], "commands": [],
           "settings": {k: getattr(args, k) for k in ("sparsity", "nsamples", "seqlen", "threads", "device",
                                                       "cap_gib", "max_shard_size", "activation_budget")},
           "cgroup": CGROUP.is_dir() and os.access(CGROUP, os.W_OK)}
    if args.resume and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        res["rows"], res["commands"] = old["rows"], old["commands"]
    res["baseline_rss_bytes"] = baseline_rss(args.threads)
    done = {(r["shape"], r["method"]) for r in res["rows"]}
    for shape in args.sizes.split(","):
        todo = [m for m in args.methods.split(",") if (shape, m) not in done]
        if not todo:
            continue
        ckpt = ensure_checkpoint(shape, work, res["commands"])
        for method in todo:
            row = run_one(shape, method, ckpt, args, res["commands"])
            res["rows"].append(row)
            write_outputs(res, out)
            print(json.dumps({k: row.get(k) for k in ("shape", "method", "finished", "wall_seconds",
                                                      "process_peak_rss_bytes", "why")}), flush=True)
        if not args.keep_checkpoints:
            import shutil
            shutil.rmtree(ckpt, ignore_errors=True)
    write_outputs(res, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
