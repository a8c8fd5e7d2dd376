"""StructPrune's ADMM iterations against its one-shot pass, on held-out text (issue 11, item 1).

For each sparsity and variant: prune SmolLM2 with C4 calibration windows (C4_CALIB_DOCS), score
perplexity on held-out C4 calibration windows (C4_HELDOUT_DOCS: disjoint from calibration and
from the C4 evaluation documents; this is what chooses the default) and on the first WikiText-2
evaluation windows (reported, not used to choose). Per-window NLLs and every iteration's
residuals go to the JSON; a Markdown table is written next to it.

    python benchmarks/admm_vs_oneshot.py --sparsity 0.3,0.5 --nsamples 8 --seqlen 512 --heldout 8 \
        --wikitext 4 --threads 1 --out benchmarks/results/admm_vs_oneshot_smollm2_cpu
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
from structprune.eval.perplexity import encode_corpus, perplexity_from_ids

VARIANTS = {
    "one-shot": {"iterations": 1},
    "admm": {"iterations": 4, "rho": 1.0},
}


def _ppl(model, ids, seqlen, limit, device, name):
    r = perplexity_from_ids(model.to(device), ids, seqlen, limit=limit, device=device, progress=False, dataset=name)
    model.to("cpu")
    return {"ppl": r.ppl, "window_nlls": list(r.window_nlls)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsity", default="0.3,0.5")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--heldout", type=int, default=8, help="held-out C4 windows (of --seqlen tokens)")
    p.add_argument("--wikitext", type=int, default=4, help="first WikiText-2 windows of --eval-seqlen")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--out", required=True, help="output path prefix (.md and .json are added)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, dtype=torch.float32)
    calib = get_calibration(tok, "c4", nsamples=a.nsamples, seqlen=a.seqlen, seed=0)
    held = get_heldout_calibration(tok, "c4", nsamples=a.heldout, seqlen=a.seqlen, seed=1).reshape(1, -1)
    wiki = encode_corpus(tok, "wikitext2")
    dense = {"heldout": _ppl(model, held, a.seqlen, None, a.device, "c4-heldout"),
             "wikitext2": _ppl(model, wiki, a.eval_seqlen, a.wikitext, a.device, "wikitext2")}
    print(json.dumps({"dense": {k: v["ppl"] for k, v in dense.items()}}), flush=True)
    rows, cache = [], {}  # sensitivities and dense paths shared by every run (same model and windows)
    for s in [float(x) for x in a.sparsity.split(",")]:
        for name in a.variants.split(","):
            m = copy.deepcopy(model)
            cfg = PruneConfig(method="structprune", sparsity=s, nsamples=a.nsamples, seqlen=a.seqlen, **VARIANTS[name])
            t = time.perf_counter()
            r = prune(m, calib, cfg, device=a.device, progress=False, cache=cache)
            seconds = time.perf_counter() - t
            iters = [e for e in r.report["solver_log"] if "iteration" in e]
            chosen = next(e["chosen_iteration"] for e in r.report["solver_log"] if "chosen_iteration" in e)
            row = {"sparsity": s, "variant": name, "config": VARIANTS[name], "achieved": r.report["sparsity_achieved"],
                   "heldout": _ppl(m, held, a.seqlen, None, a.device, "c4-heldout"),
                   "wikitext2": _ppl(m, wiki, a.eval_seqlen, a.wikitext, a.device, "wikitext2"),
                   "chosen_iteration": chosen, "prune_seconds": seconds,
                   "iterations": [{k: e[k] for k in ("iteration", "objective", "consensus_objective", "primal_residual",
                                                     "dual_residual", "eps_primal", "eps_dual", "rho", "lambda",
                                                     "converged", "seconds")} for e in iters]}
            rows.append(row)
            print(json.dumps({k: (v["ppl"] if isinstance(v, dict) and "ppl" in v else v) for k, v in row.items()
                              if k != "iterations"}), flush=True)
            del m
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python " + " ".join(sys.argv), "model": a.model, "device": a.device, "dtype": "float32",
            "threads": torch.get_num_threads(), "calibration": f"c4 {a.nsamples}x{a.seqlen} seed 0",
            "heldout": f"c4 held-out documents, {a.heldout}x{a.seqlen} seed 1",
            "wikitext2": f"first {a.wikitext} windows of {a.eval_seqlen}", "dense": dense, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    lines = ["# StructPrune: ADMM iterations against the one-shot pass", "",
             f"Command: `{meta['command']}`", "",
             f"Model {a.model}, {a.device} float32, {meta['threads']} thread(s). Calibration {meta['calibration']}; "
             f"selection on {meta['heldout']}; WikiText-2 {meta['wikitext2']} (reported only). Dense: held-out "
             f"{dense['heldout']['ppl']:.3f}, WikiText-2 {dense['wikitext2']['ppl']:.3f}.", "",
             "| sparsity | variant | held-out C4 ppl | WikiText-2 ppl | achieved | chosen iteration | objective per "
             "iteration | primal residual per iteration | dual residual per iteration | prune s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        it = r["iterations"]
        lines.append(f"| {r['sparsity']:.2f} | {r['variant']} | {r['heldout']['ppl']:.3f} | {r['wikitext2']['ppl']:.3f} | "
                     f"{r['achieved']:.4f} | {r['chosen_iteration']} | "
                     + ", ".join(f"{e['objective']:.4f}" for e in it) + " | "
                     + ", ".join(f"{e['primal_residual']:.3g}" for e in it) + " | "
                     + ", ".join(f"{e['dual_residual']:.3g}" for e in it) + f" | {r['prune_seconds']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
