"""The streamed path against the in-memory path on the real SmolLM2 (issue 10's target: same kept
structures, weights within 1e-6).

The same calibration windows and config prune SmolLM2-135M twice: ``prune_checkpoint`` reads the
checkpoint folder one decoder layer at a time and writes the pruned shards as it goes; ``prune``
works on the model loaded whole. Both output folders are then loaded (``load_pruned``) and
compared: kept heads and MLP channels per layer, every tensor's shape, and the largest absolute
difference of any weight (float32).

    OMP_NUM_THREADS=1 python benchmarks/streamed_vs_memory.py --threads 1 \\
        --out benchmarks/results/streamed_vs_memory_smollm2
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without install

from structprune import PruneConfig, load_model, load_pruned, prune  # noqa: E402
from structprune.api import prune_checkpoint  # noqa: E402
from structprune.data import get_calibration  # noqa: E402
from structprune.export import save_pruned  # noqa: E402
from structprune.models.loading import resolve_model  # noqa: E402

TOLERANCE = 1e-6


def compare(a: dict, b: dict) -> dict:
    """Shapes and the largest absolute difference between two state dicts (float32)."""
    if set(a) != set(b):
        return {"same_names": False, "only_streamed": sorted(set(a) - set(b)),
                "only_in_memory": sorted(set(b) - set(a))}
    shapes = [k for k in a if a[k].shape != b[k].shape]
    diffs = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a if k not in shapes and a[k].numel()}
    worst = max(diffs, key=diffs.get)
    return {"same_names": True, "tensors": len(a), "shape_mismatches": shapes, "max_abs_diff": diffs[worst],
            "worst_tensor": worst}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="structprune")
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="output prefix (.json, .md)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    folder = resolve_model(a.model).path
    model, tok = load_model(a.model, dtype=torch.float32)
    calib = get_calibration(tok, "c4", nsamples=a.nsamples, seqlen=a.seqlen, seed=0)
    cfg = PruneConfig(method=a.method, sparsity=a.sparsity, nsamples=a.nsamples, seqlen=a.seqlen)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        streamed = prune_checkpoint(folder, Path(tmp) / "streamed", calib, cfg, device="cpu", progress=False)
        t_streamed = time.perf_counter() - t
        t = time.perf_counter()
        mem = prune(model, calib, cfg, device="cpu", progress=False)
        t_mem = time.perf_counter() - t
        save_pruned(model, tok, Path(tmp) / "in_memory", report=mem.report, plans=mem.plans)
        # What a user gets back from each: both folders loaded as saved (per-layer widths: the
        # export's own config class, verified against the files).
        sa = load_pruned(Path(tmp) / "streamed", dtype=torch.float32).state_dict()
        sb = load_pruned(Path(tmp) / "in_memory", dtype=torch.float32).state_dict()
        weights = compare(sa, sb)
    widths = streamed.report["layers"]
    # The kept indices themselves (query heads, KV groups, MLP channels), layer by layer.
    same_kept = [p.to_dict() for p in streamed.plans] == [p.to_dict() for p in mem.plans]
    record = {"command": shlex.join(["python", "benchmarks/streamed_vs_memory.py", *(argv or sys.argv[1:])]),
              "model": a.model, "method": a.method, "sparsity": a.sparsity,
              "calibration": f"c4 {a.nsamples}x{a.seqlen} seed 0", "threads": a.threads,
              "versions": {"torch": torch.__version__},
              "same_kept_indices": same_kept, "widths": widths,
              "sparsity_achieved": {"streamed": streamed.report["sparsity_achieved"],
                                    "in_memory": mem.report["sparsity_achieved"]},
              "prune_seconds": {"streamed": t_streamed, "in_memory": t_mem}, "weights": weights,
              "within_tolerance": weights.get("same_names") and not weights.get("shape_mismatches")
              and weights["max_abs_diff"] <= TOLERANCE, "tolerance": TOLERANCE}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    w = record["weights"]
    lines = ["# Streamed from disk against in memory: " + a.model, "",
             f"Command: `{record['command']}`", "",
             f"{a.method} at {a.sparsity:.0%}, calibration {record['calibration']} (the same windows for both), "
             f"CPU float32 (the checkpoint is stored in float32), {a.threads} thread(s), torch {torch.__version__}. "
             "Both output folders loaded with `structprune.load_pruned` (per-layer widths) and compared tensor by "
             "tensor.", "",
             "| | streamed (`prune_checkpoint`) | in memory (`prune`) |", "| --- | --- | --- |",
             f"| sparsity achieved | {record['sparsity_achieved']['streamed']:.6f} | "
             f"{record['sparsity_achieved']['in_memory']:.6f} |",
             f"| prune seconds | {t_streamed:.0f} | {t_mem:.0f} |", "",
             f"* kept query heads, KV groups and MLP channels identical in every layer: "
             f"**{record['same_kept_indices']}**",
             f"* tensors: {w.get('tensors')}, same names: {w['same_names']}, shape mismatches: "
             f"{len(w.get('shape_mismatches', []))}",
             f"* largest absolute weight difference: **{w.get('max_abs_diff', float('nan')):.3g}** "
             f"({w.get('worst_tensor')}); within {TOLERANCE:g}: **{record['within_tolerance']}**"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if record["within_tolerance"] and record["same_kept_indices"] else 1


if __name__ == "__main__":
    sys.exit(main())
