"""One pruning job on 1 and on R ranks (torchrun, one thread each): wall time, per-pass time,
per-rank peak memory, and the equality of the outputs (issue 28).

For each world size the same ``structprune prune`` command runs under
``torchrun --standalone --nproc-per-node R`` (R = 1 is a plain one-process run), with
``OMP_NUM_THREADS=1`` so that R ranks use R cores; the outputs are then compared tensor by tensor
(bit for bit) and plan by plan. The split of each pass's time shows what data parallelism divides
(forwards, Grams, the sensitivity backward) and what it cannot (the per-module solves).

    python benchmarks/distributed.py smollm2-135m --nsamples 32 --seqlen 2048 --ranks 1,2 \\
        --out benchmarks/results/distributed_cpu
    python benchmarks/distributed.py smollm2-135m --nsamples 4 --seqlen 256 --ranks 1,2 --out /tmp/dist_small

On a GPU machine pass ``--device cuda`` (each rank takes ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def run(model: str, out: Path, ranks: int, args) -> dict:
    """One ``structprune prune`` under torchrun with ``ranks`` processes; its wall time and report."""
    cli = ["prune", model, "--sparsity", str(args.sparsity), "--method", args.method, "--nsamples",
           str(args.nsamples), "--seqlen", str(args.seqlen), "--eval", "",
           "--device", args.device, "-q", "--output", str(out)]
    if ranks == 1:
        cmd = [sys.executable, "-m", "structprune.cli", *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "structprune.cli", *cli]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    passes = {name: round(t["seconds"], 2) for name, t in report["timings"].items() if isinstance(t, dict)}
    return {"ranks": ranks, "command": shlex.join(cmd), "wall_seconds": round(wall, 2),
            "prune_seconds": round(report["prune_seconds"], 2), "passes": passes,
            "peak_rss_bytes_per_rank": [r["peak_rss_bytes"] for r in report["ranks"]] if report.get("ranks")
            else [report["peak_rss_bytes"]],
            # seconds each rank spent reading (and converting) layers from disk: every rank reads its own copy
            "layer_read_seconds_per_rank": [round((r.get("layer_reads") or {}).get("seconds", 0.0), 2)
                                            for r in (report.get("ranks") or [report])]}


def same_output(a: Path, b: Path) -> dict:
    """Bit-equality of every tensor and of the plans of two output folders."""
    ta, tb = {}, {}
    for folder, t in ((a, ta), (b, tb)):
        for f in sorted(glob.glob(str(folder / "*.safetensors"))):
            t.update(load_file(f))
    differ = [k for k in ta if k not in tb or not torch.equal(ta[k], tb[k])]
    worst = max((float((ta[k].double() - tb[k].double()).abs().max()) for k in differ
                 if k in tb and ta[k].shape == tb[k].shape), default=0.0)
    plans = json.loads((a / "plan.json").read_text()) == json.loads((b / "plan.json").read_text())
    return {"tensors": len(ta), "bit_identical": not differ and ta.keys() == tb.keys(), "max_abs_diff": worst,
            "plans_equal": plans}


def amdahl(rows: list[dict], project: int = 8) -> dict:
    """Per pass (and for the whole prune), the serial share ``s`` that the 1- and R-rank times imply
    under Amdahl's law, ``T_R = T_1 (s + (1 - s) / R)`` (so ``s = (R T_R / T_1 - 1) / (R - 1)``, clipped
    to [0, 1]), and the time that share projects for ``project`` ranks: a projection from the measured
    split, not a measurement."""
    one = next(r for r in rows if r["ranks"] == 1)
    many = max(rows, key=lambda r: r["ranks"])
    R = many["ranks"]
    if R == 1:
        return {}
    out = {}
    pairs = [(name, one["passes"].get(name), many["passes"].get(name)) for name in one["passes"]]
    pairs.append(("prune", one["prune_seconds"], many["prune_seconds"]))
    for name, t1, tr in pairs:
        if not t1 or tr is None:
            continue
        s = min(1.0, max(0.0, (R * tr / t1 - 1) / (R - 1)))
        tp = t1 * (s + (1 - s) / project)
        out[name] = {"t1": t1, f"t{R}": tr, "serial_share": round(s, 3), f"projected_t{project}": round(tp, 1),
                     f"projected_speedup_{project}": round(t1 / tp, 2)}
    return out


def render(result: dict, level: str = "#") -> list[str]:
    """The Markdown of one measurement (``result`` as :func:`measure` returns it)."""
    rows, split = result["runs"], result.get("amdahl") or {}
    ranks = [r["ranks"] for r in rows]
    load = result["load_average_at_end"]
    lines = [f"{level} {result['model']}: 1 vs {', '.join(map(str, ranks[1:]))} ranks ({result['method']}, "
             f"{result['nsamples']}x{result['seqlen']}, {result['device']}, one thread per rank)", "",
             f"Load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in load)} on {result['cpus']} CPUs"
             + (f". {result['note']}" if result.get("note") else "."), "",
             "| ranks | wall s | prune s | speed-up | peak RSS per rank (MiB) | layer reads s per rank | bit-identical "
             "| plans equal |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        eq = row["equal_to_one_process"]
        rss = ", ".join(f"{b / 2**20:.0f}" for b in row["peak_rss_bytes_per_rank"])
        reads = ", ".join(str(x) for x in row.get("layer_read_seconds_per_rank", []))
        lines.append(f"| {row['ranks']} | {row['wall_seconds']} | {row['prune_seconds']} | {row['speedup']} | {rss} "
                     f"| {reads} | {eq['bit_identical']} | {eq['plans_equal']} |")
    lines += ["", "Seconds per pass:", "", "| pass | " + " | ".join(f"{r['ranks']} rank(s)" for r in rows) + " |",
              "|---|" + "---|" * len(rows)]
    for name in rows[0]["passes"]:
        lines.append(f"| {name} | " + " | ".join(str(r["passes"].get(name, "")) for r in rows) + " |")
    if split:
        R = max(ranks)
        lines += ["", f"Serial share implied by the 1- and {R}-rank times (Amdahl: T_R = T_1 (s + (1 - s) / R)) and "
                  "what it gives 8 ranks (**a projection**, not a measurement; on GPUs the split differs):", "",
                  f"| pass | 1 rank s | {R} ranks s | serial share | projected 8 ranks s | projected speed-up |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, v in split.items():
            lines.append(f"| {name} | {v['t1']} | {v[f't{R}']} | {v['serial_share']} | {v['projected_t8']} "
                         f"| {v['projected_speedup_8']} |")
    lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in rows]
    if result.get("benchmark_command"):
        lines += ["", f"Made by: `{result['benchmark_command']}`"]
    return lines


def measure(args) -> dict:
    """Run the job on every world size of ``args.ranks`` and compare the outputs with the first's."""
    ranks = [int(r) for r in args.ranks.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="structprune-dist-") as tmp:
        outs = {}
        for r in ranks:
            outs[r] = Path(tmp) / f"ranks{r}"
            rows.append(run(args.model, outs[r], r, args))
            print(json.dumps(rows[-1]), flush=True)
        base = ranks[0]
        for row in rows:
            row["equal_to_one_process"] = same_output(outs[base], outs[row["ranks"]])
            row["speedup"] = round(rows[0]["prune_seconds"] / row["prune_seconds"], 3)
    return {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "method": args.method,
            "sparsity": args.sparsity, "device": args.device,
            "torch": torch.__version__, "cpus": os.cpu_count(), "load_average_at_end": list(os.getloadavg()),
            "runs": rows, "amdahl": amdahl(rows),
            "benchmark_command": shlex.join(["python", "benchmarks/distributed.py", *sys.argv[1:]]),
            "note": args.note}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--method", default="structprune")
    p.add_argument("--device", default="cpu")
    p.add_argument("--note", default="", help="a sentence on the conditions of the run, kept with the result")
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="instead of measuring: one table file from earlier results (JSON files this script wrote)")
    p.add_argument("--out", required=True, help="results path without extension (.json and .md are written)")
    args = p.parse_args(argv)
    if args.combine:
        results = [json.loads(Path(f).read_text()) for f in args.combine]
        parts = [r for res in results for r in (res["measurements"] if "measurements" in res else [res])]
        Path(f"{args.out}.json").write_text(json.dumps({"measurements": parts}, indent=2))
        lines = ["# StructPrune over torch.distributed: 1 against 2 ranks on the CPU (issue 28)", "",
                 f"Combined by `python benchmarks/distributed.py --combine {' '.join(args.combine)} --out {args.out}`.", ""]
        for res in parts:
            lines += render(res, "##") + [""]
    else:
        if not args.model:
            p.error("a model (or --combine)")
        result = measure(args)
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=2))
        lines = render(result)
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
