"""Choose StructPrune's hyper-parameters on held-out calibration text (never evaluation sets).

For each setting: prune SmolLM2 with calibration windows from C4 documents C4_CALIB_DOCS,
then score perplexity on held-out windows from C4 documents C4_HELDOUT_DOCS (disjoint
from calibration and from the C4 evaluation documents). Writes a Markdown table + JSON.

    python benchmarks/tune_structprune.py --sparsity 0.3,0.5 --sweep temperature=0,0.25,0.5,1,2,inf \
        --nsamples 8 --seqlen 512 --heldout 8 --out benchmarks/results/tune_temperature
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from structprune import PruneConfig, load_model, prune
from structprune.data import get_calibration
from structprune.data.calibration import get_heldout_calibration
from structprune.eval.perplexity import perplexity_from_ids


def _value(v: str):
    if v == "inf":
        return math.inf
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v  # a string field (method, target, allocation)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsity", default="0.3,0.5")
    p.add_argument("--sweep", required=True, help="name=v1,v2,... of a PruneConfig field")
    p.add_argument("--fixed", default="", help="name=value;name=value of other PruneConfig fields")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--heldout", type=int, default=8, help="held-out windows (of --seqlen tokens)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--out", required=True, help="output path prefix (.md and .json are added)")
    a = p.parse_args(argv)

    name, values = a.sweep.split("=")
    values = [_value(v) for v in values.split(",")]
    fixed = {k: _value(v) for k, v in (kv.split("=") for kv in a.fixed.split(";") if kv)}
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, dtype=getattr(torch, a.dtype))
    calib = get_calibration(tok, "c4", nsamples=a.nsamples, seqlen=a.seqlen, seed=0)
    held = get_heldout_calibration(tok, "c4", nsamples=a.heldout, seqlen=a.seqlen, seed=1).reshape(1, -1)
    dense = perplexity_from_ids(model.to(a.device), held, a.seqlen, device=a.device, progress=False).ppl
    model.to("cpu")
    rows = []
    cache: dict = {}  # sensitivities and dense paths are shared by every setting (same model, same windows)
    for s in [float(x) for x in a.sparsity.split(",")]:
        for v in values:
            m = copy.deepcopy(model)
            cfg = PruneConfig(sparsity=s, nsamples=a.nsamples, seqlen=a.seqlen,
                              **{"method": "structprune", **fixed, name: v})
            t = time.perf_counter()
            r = prune(m, calib, cfg, device=a.device, progress=False, cache=cache)
            ppl = perplexity_from_ids(m.to(a.device), held, a.seqlen, device=a.device, progress=False).ppl
            iters = [e for e in r.report["solver_log"] if "iteration" in e]
            rows.append({"sparsity": s, name: v if not (isinstance(v, float) and math.isinf(v)) else "inf",
                         "heldout_ppl": ppl, "achieved": r.report["sparsity_achieved"],
                         "objective": [e["objective"] for e in iters], "seconds": time.perf_counter() - t})
            print(json.dumps(rows[-1]), flush=True)
            del m
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python " + " ".join(sys.argv), "dense_heldout_ppl": dense, "device": a.device,
            "dtype": a.dtype, "nsamples": a.nsamples, "seqlen": a.seqlen, "heldout_windows": a.heldout,
            "fixed": fixed, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    lines = [f"# Sweep of `{name}` on held-out C4 calibration text", "",
             f"Command: `{meta['command']}`", "",
             f"Model {a.model}, {a.device} {a.dtype}, calibration {a.nsamples}x{a.seqlen} (C4 calibration documents, "
             f"seed 0), scored on {a.heldout} held-out windows of {a.seqlen} (disjoint C4 documents). "
             f"Dense held-out perplexity: {dense:.3f}. Fixed: {fixed or 'defaults'}.", "",
             f"| sparsity | {name} | held-out ppl | achieved | objective per iteration | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        obj = ", ".join(f"{o:.4f}" for o in r["objective"])
        lines.append(f"| {r['sparsity']:.2f} | {r[name]} | {r['heldout_ppl']:.3f} | {r['achieved']:.4f} | {obj} | "
                     f"{r['seconds']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
