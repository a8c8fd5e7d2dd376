"""Inference speed of SmolLM2-135M dense vs pruned (30% and 50%, uniform and non-uniform widths).

Prunes with the CLI, then runs ``structprune bench`` on each model in its own process
(so the CPU peak-RSS figure is that model's alone), and writes a markdown table with
the exact commands. The protocol's settings (batch 1 and 16, 2048-token prompts, 128
new tokens, on the GPU) are the defaults of ``structprune bench``; ``--cpu`` uses
CPU-sized ones (batch 1 and 4, 256-token prompts, 32 new tokens).

    python benchmarks/speed.py --cpu --out benchmarks/results/speed_smollm2_cpu.md
    python benchmarks/speed.py --out benchmarks/results/speed_smollm2_gpu.md   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without install
from structprune.bench import hardware_name  # noqa: E402
PY = sys.executable
CPU_SETTINGS = ["--batch-sizes", "1,4", "--prompt-len", "256", "--new-tokens", "32", "--repeats", "3", "--warmup", "1"]
# Pruning settings kept small: speed does not depend on calibration quality.
PRUNE_SETTINGS = ["--method", "wanda-sp", "--nsamples", "8", "--seqlen", "256", "--eval", "", "-q"]
VARIANTS = [  # name, sparsity, extra prune flags
    ("pruned 30% uniform", 0.3, ["--allocation", "uniform", "--uniform-widths"]),
    ("pruned 30% threshold", 0.3, ["--allocation", "threshold"]),
    ("pruned 50% uniform", 0.5, ["--allocation", "uniform", "--uniform-widths"]),
    ("pruned 50% threshold", 0.5, ["--allocation", "threshold"]),
]


def run(cmd: list[str], log: list[str], env: dict | None = None) -> None:
    prefix = "".join(f"{k}={v} " for k, v in (env or {}).items())
    printable = prefix + " ".join(shlex.quote(c) for c in cmd).replace(PY, "python")
    log.append(printable)
    print("+", printable, flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, **(env or {})})


def widths(folder: Path) -> str:
    cfg = json.loads((folder / "config.json").read_text())
    layers = cfg["structprune"]["layers"]
    heads = sorted({l["heads"] for l in layers})
    mlp = [l["mlp"] for l in layers]
    return (f"{cfg['model_type']}; heads {heads[0]}-{heads[-1]}, MLP {min(mlp)}-{max(mlp)}"
            if len(set(mlp)) > 1 or len(heads) > 1 else f"{cfg['model_type']}; {heads[0]} heads, MLP {mlp[0]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="CPU-sized settings and --device cpu")
    ap.add_argument("--work", default=os.environ.get("STRUCTPRUNE_BENCH_DIR", "/tmp/structprune-speed"),
                    help="scratch folder for pruned models and JSON")
    ap.add_argument("--out", required=True, help="markdown file to write")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for the bench runs (default with --cpu: 1; on a shared CPU, more "
                         "threads than free cores thrash)")
    ap.add_argument("--reuse", action="store_true", help="keep pruned models and bench JSON already in --work")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    device = ["--device", "cpu"] if args.cpu else []
    threads = args.threads or (1 if args.cpu else None)
    bench_env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    settings = CPU_SETTINGS if args.cpu else []
    cmds: list[str] = []
    models = [("dense", "smollm2-135m", None)]
    for name, sparsity, flags in VARIANTS:
        folder = work / name.replace(" ", "_").replace("%", "")
        cmd = [PY, "-m", "structprune.cli", "prune", "smollm2-135m", "--sparsity", str(sparsity), *PRUNE_SETTINGS,
               *flags, *device, "--output", str(folder), "--overwrite"]
        if args.reuse and (folder / "config.json").is_file():
            cmds.append("# reused, made earlier by: " + " ".join(shlex.quote(c) for c in cmd).replace(PY, "python"))
        else:
            run(cmd, cmds)
        models.append((name, str(folder), folder))
    results = []
    for name, spec, folder in models:
        out = work / f"bench_{name.replace(' ', '_').replace('%', '')}.json"
        load = os.getloadavg()[0]
        if not (args.reuse and out.is_file()):
            run([PY, "-m", "structprune.cli", "bench", spec, *settings, *device, "-q", "--json", str(out)], cmds,
                bench_env)
            load = max(load, os.getloadavg()[0])
        res = json.loads(out.read_text())
        (m,) = res["models"].values()
        results.append((name, folder, m, res["settings"], load))

    dense = {r["batch"]: r for r in results[0][2]["rows"]}
    s = results[0][3]
    lines = [
        f"# Inference speed: SmolLM2-135M dense vs pruned ({'CPU' if args.cpu else 'GPU'})",
        "",
        f"Hardware: {hardware_name('cpu' if args.cpu else 'cuda')} "
        f"({os.cpu_count()} cores visible; bench runs with {threads or 'default'} thread(s)), torch {torch.__version__}, "
        f"dtype {s['dtype']}, device {s['device']}.",
        f"Settings: batch sizes {s['batch_sizes']}, prompt {s['prompt_len']} random tokens, "
        f"{s['new_tokens']} new tokens (greedy, KV cache), median of {s['repeats']} runs after {s['warmup']} warm-up.",
    ]
    if args.cpu:
        lines += ["", "**CPU-sized settings, not the protocol's** (batch 1 and 16, 2048-token prompts, 128 new tokens, "
                  "on a GPU): this session had no GPU. The machine was shared with other jobs, so absolute figures are "
                  "noisy (load avg: the 1-minute load average around each model's run, "
                  f"on {os.cpu_count()} cores); compare rows of the same run. Peak memory is each model's own "
                  "process peak RSS (one process per model)."]
    lines += ["", "Prefill tok/s = batch x prompt / forward time; decode tok/s = batch x new tokens / "
              "(generate time - prefill time).", "",
              "| model | widths (config) | params | batch | prefill tok/s | decode tok/s | prefill speed-up "
              "| decode speed-up | peak memory | load avg |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, folder, m, _, load in results:
        w = widths(folder) if folder else "llama; 9 heads, MLP 1536"
        for r in m["rows"]:
            d = dense[r["batch"]]
            lines.append(f"| {name} | {w} | {m['params'] / 1e6:.1f}M | {r['batch']} | {r['prefill_tok_s']:,.0f} | "
                         f"{r['decode_tok_s']:,.1f} | {r['prefill_tok_s'] / d['prefill_tok_s']:.2f}x | "
                         f"{r['decode_tok_s'] / d['decode_tok_s']:.2f}x | {r['peak_mem_bytes'] / 2**20:,.0f} MiB | "
                         f"{load:.1f} |")
    lines += ["", "Pruned models: `wanda-sp`, calibration 8 x 256 C4 windows (speed does not depend on it), "
              "`--mlp-multiple 8` (the default). Uniform widths export a stock `llama` config; threshold allocation "
              "gives per-layer widths and a `structprune_llama` config (loaded with the packaged modeling code).",
              "", "Commands (from the repository root):", "", "```",
              f"python benchmarks/speed.py {' '.join(argv or sys.argv[1:])}", "# which ran:", *cmds, "```", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
