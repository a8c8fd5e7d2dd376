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
    # a capped size into its own file, then one table of every run (later files replace rows)
    python benchmarks/scale.py --sizes llama-2-7b --methods structprune --cap-gib 6 --max-shard-size 256MB \\
        --activation-budget 512MiB --out /tmp/part_7b --resume
    python benchmarks/scale.py --sizes "" --out benchmarks/results/scale_cpu \\
        --merge benchmarks/results/scale_cpu.json --merge /tmp/part_7b.json
    # a shape too slow for the session: its first layers, projected to the full depth
    python benchmarks/scale.py --sizes llama-2-13b --layers 2 --methods structprune --cap-gib 8 --out /tmp/part_13b

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


def n_params(shape: str, layers: int | None = None) -> int:
    import torch

    return checkpoint_plan(synthetic_config(shape, layers), torch.bfloat16, "2GB").total_parameters


def full_layers(shape: str) -> int:
    return synthetic_config(shape).num_hidden_layers


def run_name(shape: str, layers: int | None) -> str:
    """The row's model: the shape, or its first ``layers`` layers (a per-layer projection)."""
    return shape if layers is None else f"{shape}@{layers}l"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def ensure_checkpoint(shape: str, work: Path, log: list[str], layers: int | None = None) -> Path:
    folder = work / "ckpt" / run_name(shape, layers)
    if (folder / "config.json").is_file():
        return folder
    cmd = [PY, "-m", "structprune.models.synthetic", shape, "--output", str(folder), "--dtype", "bfloat16",
           "--max-shard-size", "2GB"] + ([] if layers is None else ["--layers", str(layers)])
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

    @classmethod
    def existing(cls, name: str) -> "MemoryGroup":
        """A group made elsewhere (read only: its limit and peak are left as they are)."""
        group = cls.__new__(cls)
        group.path = CGROUP / name
        group.ok = (group.path / "memory.limit_in_bytes").is_file()
        return group

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


def prune_command(shape: str, method: str, ckpt: Path, args, layers: int | None = None) -> tuple[list[str], Path]:
    out = Path(args.work) / "out" / f"{run_name(shape, layers)}-{method}"
    cmd = [PY, "-m", "structprune.cli", "prune", str(ckpt), "--sparsity", str(args.sparsity), "--method", method,
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--eval", "", "--output", str(out),
           "--overwrite", "-q"]
    if args.max_shard_size:  # default: the CLI's own (shards are streamed: no memory either way)
        cmd += ["--max-shard-size", args.max_shard_size]
    if args.max_memory:
        cmd += ["--max-memory", args.max_memory]
    if args.device:
        cmd += ["--device", args.device]
    if args.activation_budget:
        cmd += ["--activation-budget", args.activation_budget]
    if not args.quiet:
        cmd.remove("-q")  # progress bars in the run's log: where the time (or the memory) went
    return cmd, out


def tqdm_seconds(log_text: str, desc: str) -> float | None:
    """Elapsed seconds of the last finished tqdm bar ``desc`` in a log (runs whose report predates
    the per-phase timings of the sensitivity pass)."""
    import re

    best = None
    for m in re.finditer(re.escape(desc) + r": 100%\|[^|]*\| *\d+/\d+ \[(?:(\d+):)?(\d+):(\d+)<", log_text):
        h, mi, se = (int(x) if x else 0 for x in m.groups())
        best = 3600 * h + 60 * mi + se
    return best


def phase_seconds(row: dict, log_text: str = "") -> dict[str, float]:
    """Seconds per phase of a finished run: the report's per-layer passes, with the sensitivity
    pass read from the log's progress bars where the report lacks it."""
    t = {k: v["seconds"] for k, v in (row.get("timings") or {}).items() if isinstance(v, dict) and v["seconds"]}
    for desc in ("sensitivity fwd", "sensitivity bwd"):
        if desc not in t and log_text:
            sec = tqdm_seconds(log_text, desc)
            if sec is not None:
                t[desc] = float(sec)
    return t


def make_row(shape: str, method: str, out: Path, log_path: Path, returncode: int, wall: float, cap: int,
             group: dict, args, layers: int | None = None) -> dict:
    row = {"shape": run_name(shape, layers), "base_shape": shape, "method": method,
           "params": n_params(shape, layers), "layers_run": layers or full_layers(shape),
           "layers_full": full_layers(shape), "params_full": n_params(shape), "returncode": returncode,
           "wall_seconds": wall, "capped": args.cap_gib is not None, "cap_enforced": bool(group),
           "commit": git_commit(), "log": str(log_path), "nsamples": args.nsamples, "seqlen": args.seqlen, "threads": args.threads,
           **group}
    report = out / "report.json"
    log_text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    if returncode == 0 and report.is_file():
        r = json.loads(report.read_text())
        row.update(finished=True, prune_seconds=r["prune_seconds"], peak_rss_bytes=r["peak_rss_bytes"],
                   process_peak_rss_bytes=r["process_peak_rss_bytes"], peak_gpu_mem_bytes=r["peak_gpu_mem_bytes"],
                   sparsity_achieved=r["sparsity_achieved"], residency=r.get("residency"),
                   memory=r.get("memory"), timings=r.get("timings"))
        # how the sensitivity backward kept its boundaries (every one, or sqrt(L) checkpoints): the projection's
        # recomputed forwards follow it
        row["sensitivity_checkpoint_every"] = next((e["sensitivity_checkpoint_every"] for e in r.get("solver_log", [])
                                                    if "sensitivity_checkpoint_every" in e), None)
        row["resumed"] = bool((r.get("timings") or {}).get("resumed"))
        # A resumed run's report times its last attempt only; the log's bars may be an earlier one's.
        row["phase_seconds"] = phase_seconds(row, "" if row["resumed"] else log_text)
    else:
        tail = log_text[-600:]
        killed = returncode in (-9, 137) or row.get("cgroup_failcnt", 0) > 0
        row.update(finished=False, why=("killed at the memory limit of %.1f GiB" % (cap / 2**30)) if killed
                   else "failed: " + tail.strip().splitlines()[-1] if tail.strip() else "failed")
    return row


def run_one(shape: str, method: str, ckpt: Path, args, log: list[str], layers: int | None = None) -> dict:
    cmd, out = prune_command(shape, method, ckpt, args, layers)
    cap = int((args.cap_gib or SAFETY_CAP_GIB) * 2**30)
    group = MemoryGroup(f"structprune-scale-{os.getpid()}", cap)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    log.append(f"(cgroup memory.limit_in_bytes={cap}) OMP_NUM_THREADS={args.threads} {sh(cmd)}")
    print("+", log[-1], flush=True)
    t0 = time.perf_counter()
    log_path = Path(args.work) / f"{run_name(shape, layers)}-{method}.log"
    with open(log_path, "w") as logf:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                              preexec_fn=group.join)
    wall = time.perf_counter() - t0
    info = group.read()
    group.close()
    return make_row(shape, method, out, log_path, proc.returncode, wall, cap, info, args, layers)


def adopt_run(spec: str, args, log: list[str]) -> dict:
    """A row for a run made outside this script with the same command (a long capped run started by
    hand, or resumed with ``--resume``): ``SHAPE:METHOD:OUTPUT:LOG:CGROUP[:COMMIT]``, where LOG is the
    run's ``/usr/bin/time -v`` output (wall time, exit status, the command), CGROUP the name of its
    cgroup v1 memory group (limit, peak, failures) and COMMIT the code that ran (default: this one)."""
    import re

    shape, method, out, log_path, cgroup, *commit = spec.split(":")
    layers = re.fullmatch(r"(.+)@(\d+)l", shape)
    shape, layers = (layers.group(1), int(layers.group(2))) if layers else (shape, None)
    text = Path(log_path).read_text(errors="replace")
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", text)
    if not m:
        raise SystemExit(f"{log_path}: no /usr/bin/time -v summary (the run is not finished)")
    wall = 3600 * int(m.group(1) or 0) + 60 * int(m.group(2)) + float(m.group(3))
    # /usr/bin/time prints "Exit status: 0" after "Command terminated by signal 9"
    killed = re.search(r"Command terminated by signal (\d+)", text)
    status = re.search(r"Exit status: (\d+)", text)
    returncode = -int(killed.group(1)) if killed else int(status.group(1)) if status else 1
    cmd = re.search(r'Command being timed: "(.*)"', text)
    threads = re.search(r"OMP_NUM_THREADS=(\d+)", text)
    group = MemoryGroup.existing(cgroup)
    info = group.read()
    cap = info.get("cgroup_limit_bytes", int(SAFETY_CAP_GIB * 2**30))
    line = (f"(cgroup memory.limit_in_bytes={cap}) OMP_NUM_THREADS={threads.group(1) if threads else args.threads} "
            + (cmd.group(1) if cmd else "?").replace(PY, "python"))
    if line not in log:
        log.append(line)
    report = Path(out) / "report.json"
    if returncode == 0 and report.is_file():  # the adopted run's own settings, not this invocation's
        cal = json.loads(report.read_text()).get("calibration") or {}
        args = argparse.Namespace(**{**vars(args), "nsamples": cal.get("nsamples", args.nsamples),
                                     "seqlen": cal.get("seqlen", args.seqlen),
                                     "threads": int(threads.group(1)) if threads else args.threads})
    row = make_row(shape, method, Path(out), Path(log_path), returncode, wall, cap, info, args, layers)
    row["capped"] = cap < SAFETY_CAP_GIB * 2**30
    if commit:
        row["commit"] = commit[0]
    return row


def is_projection(r: dict) -> bool:
    return r.get("layers_run", 0) < r.get("layers_full", 0)


def slope(rows: list[dict], base: int) -> float | None:
    pts = [(math.log(r["params"]), math.log(r["process_peak_rss_bytes"] - base)) for r in rows
           if r.get("finished") and not is_projection(r) and r["process_peak_rss_bytes"] > base]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


LAYER_PHASES = ("sensitivity fwd", "sensitivity bwd")  # plus every per-layer pass of the report


def layer_seconds(r: dict) -> float:
    """Seconds spent in per-layer work (every streamed pass, the sensitivity pass included)."""
    return sum((r.get("phase_seconds") or {}).values())


def recomputed_forwards(num_layers: int, every_boundary: bool = False) -> int:
    """Layer forwards the sensitivity backward sweep recomputes (engine/sensitivity.py): none when
    it kept every boundary, else every segment of ``checkpoint_interval`` layers but the last
    (whose boundaries are still held) again, less its checkpointed first layer."""
    from structprune.engine.sensitivity import checkpoint_interval, recomputed_layers

    return 0 if every_boundary else recomputed_layers(num_layers, checkpoint_interval(num_layers))


def forward_seconds(r: dict) -> float | None:
    """Seconds of one dense forward pass over the calibration: the sensitivity sweep's own forward
    (float32, every layer once, nothing else), or, where the profile pass recorded the sweep's
    boundaries instead (engine/sensitivity.py: BoundaryRecorder; no "sensitivity fwd" phase), the
    profile pass's forward operation (its statistics and layer reads excluded), the same computation
    over the same windows when the sensitivities use every chunk (``sens_nsamples``, which counts chunks
    of ``batch_size`` windows, at least the calibration's chunks: the scale runs' 8 windows)."""
    fwd = (r.get("phase_seconds") or {}).get("sensitivity fwd")
    if fwd:
        return fwd
    ops = ((r.get("timings") or {}).get("structprune profile") or {}).get("operations") or {}
    return ops.get("forward")


def projected_seconds(r: dict) -> float:
    """A run over the first layers of a shape, extended to all of them: the run's own time plus
    the remaining layers at its measured seconds per layer. The sensitivity backward's share of
    recomputed forwards grows with depth (about sqrt(L) per segment), so it is taken out of the
    measured per-layer time and added back for the full depth at the measured forward time."""
    lr, lf = r["layers_run"], r["layers_full"]
    ph = r.get("phase_seconds") or {}
    fwd = (forward_seconds(r) or 0.0) / lr
    every = r.get("sensitivity_checkpoint_every") == 1  # then assumed to fit at the full depth too
    per_layer = layer_seconds(r) / lr - recomputed_forwards(lr, every) / lr * fwd
    return (r["prune_seconds"] + (lf - lr) * per_layer
            + (recomputed_forwards(lf, every) - recomputed_forwards(lr, every)) * fwd)


def plan_text(plan: dict | None) -> str:
    """The report's memory plan in a cell: the limit, where it came from, and the estimated need."""
    if not plan:
        return "(no plan: before engine/budget.py)"
    gib = 2 ** 30
    where = plan["limit_source"].split(" /")[0]
    limit = "unknown" if plan["limit"] is None else f"{plan['limit'] / gib:.2f} GiB"
    return f"{limit} ({where}), need {plan['need_bytes'] / gib:.2f} GiB"


def forward_multiple(r: dict) -> str:
    """The pruning time in forward passes over the calibration (issue 30's yardstick), the forward
    pass measured as :func:`forward_seconds` says."""
    fwd = forward_seconds(r)
    return f"{r['prune_seconds'] / fwd:.1f}×" if fwd else ""


OPERATIONS = ("forward", "statistics", "factor", "inverse", "path", "refit", "value refit", "input refit", "objective",
              "layer io", "other")


def operations_table(rows: list[dict], unit: str = "minutes") -> list[str]:
    """Markdown lines: minutes (or seconds) per operation in each streamed pass of each row (the report's
    ``timings[pass]["operations"]``, engine/clock.py: exclusive of nested operations; ``other`` is
    the rest of the pass)."""
    if not rows:
        return []
    div, fmt = (60, "{:.1f}") if unit == "minutes" else (1, "{:.0f}")
    lines = ["", f"Where each pass's time goes ({unit} per operation, exclusive of nested ones: a forward "
             "excludes the statistics its hooks gather; factor and inverse are the removal path's, the refit "
             "includes its own factorisation; 'other': the rest of the pass):", "",
             "| model | method | pass | " + " | ".join(OPERATIONS) + " | pass |",
             "|---|---|---|" + "---:|" * (len(OPERATIONS) + 1)]
    for r in rows:
        for desc, t in r["timings"].items():
            if not isinstance(t, dict) or "operations" not in t:
                continue
            ops = t["operations"]
            cells = " | ".join(fmt.format(ops[o] / div) if o in ops else "" for o in OPERATIONS)
            lines.append(f"| {r['shape']} | {r['method']} | {desc} | {cells} | {fmt.format(t['seconds'] / div)} |")
    return lines


def write_outputs(res: dict, out: Path) -> None:
    rows, base = res["rows"], res["baseline_rss_bytes"]
    full = sorted((r for r in rows if not is_projection(r)), key=lambda r: (r["params"], r["method"]))
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    gib = 2 ** 30
    lines = [f"# Pruning memory and time against model size ({res['hardware']})", "",
             "Random-weight bf16 checkpoints of real shapes, pruned to "
             f"{res['settings']['sparsity']:.0%} with calibration "
             f"{res['settings']['nsamples']}x{res['settings']['seqlen']} (C4), compute float32 on "
             f"{res['settings']['device'] or 'cpu'}, {res['settings']['threads']} threads. Peak = the child "
             "process's peak resident memory (VmHWM / ru_maxrss); baseline = an empty process with the same "
             f"imports: {base / gib:.2f} GiB. Every run in its own cgroup v1 memory group whose limit is the "
             f"'cap' column (an enforced cap, or a safety cap of {SAFETY_CAP_GIB} GiB"
             f"{'' if res['cgroup'] else '; NOT enforced here: not root'}); 'fp32 model' is the model's size in "
             "the compute dtype; 'code' the commit that ran. The cgroup's peak counts the page cache of the "
             "checkpoint being read, which the kernel evicts at the limit (clean file pages) instead of killing "
             "the process: at a cap it reads the cap; the process's own peak is 'peak RSS'. Memory flags passed: "
             + (", ".join(f"--{k.replace('_', '-')} {v}" for k in ("max_shard_size", "max_memory", "activation_budget")
                          if (v := res['settings'].get(k))) or "none (the defaults)") + ".", "",
             "| model | params | bf16 on disk | fp32 model | method | cap | finished | wall | prune | peak RSS | "
             "peak − baseline | cgroup peak | peak GPU | code |",
             "|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]

    def cap_of(r):
        if not r.get("cgroup_limit_bytes") or r["cgroup_limit_bytes"] >= 2**50:  # no group, or an unlimited one
            return "none"
        return f"{r['cgroup_limit_bytes'] / gib:.3g} GiB" + ("" if r["capped"] else " (safety)")

    for r in full:
        disk = r["params"] * 2 / gib
        head = (f"| {r['shape']} | {r['params'] / 1e9:.2f}B | {disk:.2f} GiB | {2 * disk:.2f} GiB | {r['method']} "
                f"| {cap_of(r)} ")
        code = r.get("commit") or "?"
        if r.get("finished"):
            lines.append(head + "| yes | "
                         f"{r['wall_seconds'] / 60:.1f} min | {r['prune_seconds'] / 60:.1f} min | "
                         f"{r['process_peak_rss_bytes'] / gib:.2f} GiB | {(r['process_peak_rss_bytes'] - base) / gib:.2f} GiB | "
                         f"{r.get('cgroup_max_usage_bytes', 0) / gib:.2f} GiB | "
                         f"{(r['peak_gpu_mem_bytes'] or 0) / gib:.2f} GiB | {code} |")
        else:
            lines.append(head + f"| no: {r['why']} | {r['wall_seconds'] / 60:.1f} min | | | | "
                         f"{r.get('cgroup_max_usage_bytes', 0) / gib:.2f} GiB | | {code} |")
    lines += ["", "Log-log slope of (peak RSS − baseline) against parameters, over the finished runs:", ""]
    for m in sorted({r["method"] for r in full}):
        sl = slope([r for r in full if r["method"] == m], base)
        lines.append(f"* {m}: " + (f"{sl:.3f}" if sl is not None else "fewer than two finished sizes"))
    # full runs, then projections (their first layers: the per-layer profile of a shape too slow to run whole)
    timed = [r for r in full + sorted((r for r in rows if is_projection(r)), key=lambda r: (r["params"], r["method"]))
             if r.get("finished") and r.get("phase_seconds")]
    if timed:
        lines += ["", "Where the time goes (minutes per phase; 'per layer' = all per-layer work / layers; "
                  "'rest' = the rest of the pruning time: first-layer inputs, the LM head's loss and "
                  "gradient, allocation; loading and saving are outside 'prune', inside 'wall'; "
                  "resumed runs time their last attempt only; a model@Nl row is a projection's run over the "
                  "first N layers, as measured; 'sensitivity fwd' 0.0: the profile pass's forward recorded the "
                  "sweep's boundaries, and 'prune / forward' divides by that pass's forward operation):", "",
                  "| model | method | sensitivity fwd | sensitivity bwd | profile (statistics + removal paths) | "
                  "passes (statistics + cut + refit) | rest | prune | per layer | prune / forward |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in timed:
            ph = r["phase_seconds"]
            passes = sum(v for k, v in ph.items() if k not in LAYER_PHASES and k != "structprune profile")
            rest = r["prune_seconds"] - layer_seconds(r)
            lines.append(f"| {r['shape']} | {r['method']} | {ph.get('sensitivity fwd', 0) / 60:.1f} | "
                         f"{ph.get('sensitivity bwd', 0) / 60:.1f} | {ph.get('structprune profile', 0) / 60:.1f} | "
                         f"{passes / 60:.1f} | {rest / 60:.1f} | {r['prune_seconds'] / 60:.1f} | "
                         f"{layer_seconds(r) / r['layers_run']:.0f} s | {forward_multiple(r)} |")
    def has_ops(r):
        return any("operations" in t for t in (r.get("timings") or {}).values() if isinstance(t, dict))
    lines += operations_table([r for r in timed if has_ops(r) and not is_projection(r)])
    lines += operations_table([r for r in timed if has_ops(r) and is_projection(r)], unit="seconds")
    mem = [r for r in full if r.get("finished") and r.get("memory") and r["method"] == "structprune"]
    if mem:
        lines += ["", "One resident layer's memory by kind (the report's breakdown: weights, Grams and solver "
                  "workspace are the largest layer's tensor sizes; activations measured):", "",
                  "| model | layer weights | statistics | solver workspace | activations in RAM (budget) | "
                  "spilled to disk | peak RSS | plan: limit (source), estimated need |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in mem:
            m = r["memory"]

            def g(v):
                return "" if v is None else f"{v / gib:.2f} GiB"
            lines.append(f"| {r['shape']} | {g(m['layer_weights_bytes'])} | {g(m['statistics_bytes'])} | "
                         f"{g(m['solver_workspace_bytes'])} | {g(m['activations_peak_ram_bytes'])} "
                         f"({g(m['activation_budget']) or 'none'}) | {g(m['activations_spilled_bytes'])} | "
                         f"{r['process_peak_rss_bytes'] / gib:.2f} GiB | {plan_text(m.get('plan'))} |")
    proj = [r for r in rows if is_projection(r)]
    if proj:
        lines += ["", "**Projections** (not full runs): the first layers of a shape pruned for real (same "
                  "layer shapes, embeddings and LM head), their measured time per layer extended to the full "
                  "depth (the sensitivity backward's recomputed forwards counted for the full depth). For "
                  "StructPrune streamed from disk the peak is one layer's work plus activations within the "
                  "budget (the rest spills to disk), which depth does not change by design; measured on the "
                  "7B shape, the high-water mark still rose by about 1 GiB from the first profile layer to the "
                  "end of the 32-layer run (C heap growth: docs/experiments.md), so a full-depth peak may "
                  "exceed the partial run's by about that.", "",
                  "| model | method | layers run / full | params run / full | cap | finished | prune (measured) | "
                  "per layer | projected prune, full depth | peak RSS | cgroup peak | code |",
                  "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
        for r in proj:
            head = (f"| {r['base_shape']} | {r['method']} | {r['layers_run']} / {r['layers_full']} | "
                    f"{r['params'] / 1e9:.2f}B / {r['params_full'] / 1e9:.2f}B | {cap_of(r)} ")
            if r.get("finished"):
                lines.append(head + f"| yes | {r['prune_seconds'] / 60:.1f} min | "
                             f"{layer_seconds(r) / r['layers_run']:.0f} s | "
                             f"**{projected_seconds(r) / 60:.0f} min (projection)** | "
                             f"{r['process_peak_rss_bytes'] / gib:.2f} GiB | "
                             f"{r.get('cgroup_max_usage_bytes', 0) / gib:.2f} GiB | {r.get('commit') or '?'} |")
            else:
                lines.append(head + f"| no: {r['why']} | | | | | {r.get('cgroup_max_usage_bytes', 0) / gib:.2f} GiB | "
                             f"{r.get('commit') or '?'} |")
    lines += ["", "Commands:", "", "```", *res["commands"], "```", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in sorted({r["method"] for r in full}):
        done = [r for r in full if r["method"] == m and r.get("finished")]
        if done:
            ax.loglog([r["params"] for r in done], [(r["process_peak_rss_bytes"] - base) / gib for r in done],
                      "o-", label=m)
            bx.loglog([r["params"] for r in done], [r["prune_seconds"] / 60 for r in done], "o-", label=m)
        for r in full:  # runs that did not fit: where they stopped
            if r["method"] == m and not r.get("finished") and r.get("cgroup_max_usage_bytes"):
                ax.loglog([r["params"]], [r["cgroup_max_usage_bytes"] / gib], "x", color="red", markersize=9)
    for r in proj:
        if r.get("finished"):
            bx.loglog([r["params_full"]], [projected_seconds(r) / 60], "s", mfc="none", color="gray",
                      label=f"{r['base_shape']} {r['method']} (projection)")
    ax.set_xlabel("parameters")
    ax.set_ylabel("peak RSS − baseline (GiB)")
    ax.set_title("Peak memory (x: killed at its cap)")
    bx.set_xlabel("parameters")
    bx.set_ylabel("prune time (min)")
    bx.set_title(f"Time ({res['settings']['device'] or 'cpu'}, {res['settings']['threads']} threads)")
    from matplotlib.ticker import NullFormatter

    for a_ in (ax, bx):
        a_.xaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels overlap
        a_.grid(True, which="both", alpha=0.3)
        a_.legend()
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
    ap.add_argument("--max-shard-size", default=None, help="passed to structprune prune (default: its own)")
    ap.add_argument("--max-memory", default=None, help="passed to structprune prune (default: its own: the cgroup's limit)")
    ap.add_argument("--activation-budget", default=None, help="passed to structprune prune (default: its own)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars in the runs' logs")
    ap.add_argument("--work", default=os.environ.get("STRUCTPRUNE_SCALE_DIR", "/tmp/structprune-scale"))
    ap.add_argument("--out", default="benchmarks/results/scale_cpu", help="output stem (.md, .json, .png)")
    ap.add_argument("--resume", action="store_true", help="keep finished rows of an earlier run of --out")
    ap.add_argument("--keep-checkpoints", action="store_true", help="do not delete each size's checkpoint after")
    ap.add_argument("--layers", type=int, default=None,
                    help="prune only each shape's first N layers and project the full depth's time (a row "
                         "labelled as a projection; for shapes whose full run does not fit the session)")
    ap.add_argument("--merge", action="append", default=[], metavar="JSON",
                    help="add the rows and commands of another results file of this script (runs made with "
                         "other caps); its rows replace those of the same model and method")
    ap.add_argument("--adopt", action="append", default=[], metavar="SHAPE:METHOD:OUTPUT:LOG:CGROUP[:COMMIT]",
                    help="add a row for a run made by hand with the same command under /usr/bin/time -v in "
                         "cgroup CGROUP (a long capped run, possibly resumed), from its output folder and log")
    ap.add_argument("--logs-dir", action="append", default=[], metavar="DIR",
                    help="where merged rows' run logs are (SHAPE-METHOD.log), to read the sensitivity pass's "
                         "time of runs whose report predates its per-layer timings")
    ap.add_argument("--drop", action="append", default=[], metavar="MODEL:METHOD",
                    help="remove a row (superseded by a later run of newer code; say so in the experiment log)")
    args = ap.parse_args(argv)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res = {"hardware": hardware_name(args.device or "cpu"), "rows": [], "commands": [],
           "settings": {k: getattr(args, k) for k in ("sparsity", "nsamples", "seqlen", "threads", "device",
                                                       "cap_gib", "max_shard_size", "max_memory", "activation_budget")},
           "cgroup": CGROUP.is_dir() and os.access(CGROUP, os.W_OK)}
    if args.resume and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        res["rows"], res["commands"] = old["rows"], old["commands"]
    for other in args.merge:
        old = json.loads(Path(other).read_text())
        newer = {(r["shape"], r["method"]) for r in old["rows"]}
        res["rows"] = [r for r in res["rows"] if (r["shape"], r["method"]) not in newer] + old["rows"]
        res["commands"] += [c for c in old["commands"] if c not in res["commands"]]
    for r in res["rows"]:  # rows of older versions of this script: full-depth runs
        if "layers_run" not in r:
            r.update(base_shape=r["shape"], layers_run=full_layers(r["shape"]), layers_full=full_layers(r["shape"]),
                     params_full=r["params"])
        if r.get("finished") and not r.get("resumed") and not all(
                k in r.get("phase_seconds", {}) for k in LAYER_PHASES):
            logs = [Path(d) / f"{r['shape']}-{r['method']}.log" for d in (*args.logs_dir, args.work)]
            log = next((p for p in logs if p.is_file()), None)
            r["phase_seconds"] = phase_seconds(r, log.read_text(errors="replace") if log else "")
    for spec in args.drop:
        model, method = spec.split(":")
        res["rows"] = [r for r in res["rows"] if (r["shape"], r["method"]) != (model, method)]
    res["baseline_rss_bytes"] = baseline_rss(args.threads)
    for spec in args.adopt:
        row = adopt_run(spec, args, res["commands"])
        res["rows"] = [r for r in res["rows"] if (r["shape"], r["method"]) != (row["shape"], row["method"])]
        res["rows"].append(row)
    done = {(r["shape"], r["method"]) for r in res["rows"]}
    for shape in filter(None, args.sizes.split(",")):
        todo = [m for m in args.methods.split(",") if (run_name(shape, args.layers), m) not in done]
        if not todo:
            continue
        ckpt = ensure_checkpoint(shape, work, res["commands"], args.layers)
        for method in todo:
            row = run_one(shape, method, ckpt, args, res["commands"], args.layers)
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
