"""Every pruning method on one model under one protocol (docs/protocol.md): a table (Markdown + JSON).

Rows: the dense model, then each method spec at each sparsity. A method spec is
``method[:allocation][+field=value...]`` (PruneConfig fields), e.g. ``wanda-sp:owl`` or
``structprune:softmax+temperature=0.5``; its text is the row's label. Issue 11's table:

* main rows at 20/30/40/50%: ``structprune`` (the default), ``structprune+iterations=1`` (one-shot,
  explicit, so the row stays the one-shot pass if the default changes), ``structprune+iterations=K``
  (ADMM), ``global``, ``obs-local``, ``flap``, ``wanda-sp``;
* ``--ablations``: at 30% and 50%, StructPrune with the uniform / threshold / softmax allocation,
  two more temperatures and more ADMM iterations.

Sizes come from ``--protocol`` (``eval/protocol.py``): ``cpu`` = 32x2048 C4 calibration and the
first 40 WikiText-2, 20 PTB and 20 C4 windows of 2048; ``gpu`` = 128x2048 and every window.
Every row keeps its per-window NLLs per dataset; the Markdown gives each perplexity with its 95%
bootstrap interval and, per sparsity, each method's paired ratio (same windows) to ``global``
and to the best local method, with intervals (``eval/intervals.py``), and checks issue 11's and
issue 27's targets. ``global`` gets the same calibration and its score (``global_score``) chosen per
sparsity on held-out C4 calibration text (``get_heldout_calibration``), unless the spec names one
(``global+global_score=fisher``: e.g. to re-run an old row's choice on today's code; the table then
pairs the two).

The JSON is rewritten (atomically) after every row, so a kill loses at most the row in progress;
``--resume`` keeps the finished rows, the dense evaluation included (same protocol settings
required), so one table can be filled across sessions:

    python benchmarks/baselines.py --protocol cpu --eval-dtype bfloat16 --threads 2 --out benchmarks/results/baselines_cpu_smollm2
    python benchmarks/baselines.py --protocol cpu --eval-dtype bfloat16 --threads 2 --resume --out benchmarks/results/baselines_cpu_smollm2
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without install

from structprune import PruneConfig, load_model, prune  # noqa: E402
from structprune.bench import hardware_name  # noqa: E402
from structprune.config import GLOBAL_SCORES, effective_fields, field_value  # noqa: E402
from structprune.data import get_calibration, load_text  # noqa: E402
from structprune.data.calibration import get_heldout_calibration  # noqa: E402
from structprune.errors import StructPruneError  # noqa: E402
from structprune.eval.intervals import at_most, paired_ratio  # noqa: E402
from structprune.eval.perplexity import evaluate_datasets, perplexity_from_ids  # noqa: E402
from structprune.eval.protocol import TITLES as DATASET_TITLES, get_protocol  # noqa: E402

log = logging.getLogger("baselines")

SPARSITIES = "0.2,0.3,0.4,0.5"
ABLATION_SPARSITIES = (0.3, 0.5)
ADMM_ITERATIONS = 0  # K of an ADMM main row (0: none; ADMM K = 2 is an ablation, tune_cpu_*.md compare K on held-out text)
LOCAL_METHODS = ("obs-local", "flap", "wanda-sp", "magnitude-sp")  # layer-wise: no cross-layer signal
DEFAULT_LABEL = "structprune"  # the row the targets are about
TARGET_VS_GLOBAL = 1.02  # upper end of StructPrune / global, every sparsity (issue 11)
TARGET_VS_LOCAL = 0.8  # upper end of StructPrune / best local at 40% and 50% (issue 11)
TARGET_LOCAL_SPARSITIES = (0.4, 0.5)
# Issue 27's targets: StructPrune / global upper end <= 1.00 at 20-50%, and StructPrune / dense
# upper end <= 2.1 at 30% and <= 4.0 at 50% (the protocol's "at most" rule: the paired interval's upper end).
TARGET27_VS_GLOBAL = 1.0
TARGET27_VS_GLOBAL_SPARSITIES = (0.2, 0.3, 0.4, 0.5)
TARGET27_VS_DENSE = {0.3: 2.1, 0.5: 4.0}
# What issue 27 tried against its targets, on SmolLM2 at the CPU protocol (tune_cpu_*.md).
TARGET27_TRIED = (
    "Tried for issue 27's targets (SmolLM2, CPU protocol, held-out text; a candidate is adopted only where its paired "
    "interval ends below 1 in both held-out domains, and none did): a hotter temperature (`tune_cpu_temperature_2dom.md`, "
    "50%: T = 1/8, 1/4, 1 give 0.89-0.91 on WikiText-2 validation and 1.09-1.15 on held-out C4, only T = 1's C4 interval "
    "excluding 1), one shared or a robust energy scale (`tune_cpu_energy_scale.md`: the same plans / worse in both), "
    "refitting the MLP's kept input rows (`tune_cpu_inner_iterations.md`: 0.992 on C4, 1.008 off-domain) or the "
    "attention's kept value rows (`tune_cpu_value_iterations.md`: 1.000 on C4, 1.009 off-domain), cross-layer ADMM "
    "with a sound schedule (`tune_cpu_admm_fixed.md`: 1.052 on C4) and dense targets (`tune_cpu_target*.md`, "
    "held-out C4 only: 1.012 / 1.074 at 30% / 50%); docs/experiments.md has the numbers.")
# Held-out C4 windows (of the calibration length) scoring global's score options per sparsity:
# a quarter of the calibration, from documents disjoint from calibration and evaluation.
HELDOUT_WINDOWS = {"cpu": 8, "gpu": 32}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Settings that must agree for rows of one table to be comparable (checked by --resume).
SETTING_KEYS = ("model", "dtype", "eval_dtype", "protocol", "datasets", "seed", "batch_size", "mlp_multiple", "heldout")
# Rows also evaluated on WikiText-2 in the compute dtype when the evaluation dtype differs
# (--eval-dtype): the paired ratio between the two shows what the cheaper evaluation costs.
EVAL_DTYPE_CHECKS = (("dense", 0.0), (DEFAULT_LABEL, 0.5))


def main_specs(admm_iterations: int = 0) -> list[str]:
    """Issue 11's main rows, in table order; an ADMM row with ``admm_iterations`` > 1 (ADMM is
    not the default, so by default it is measured among the ablations)."""
    admm = [f"structprune+iterations={admm_iterations}"] if admm_iterations > 1 else []
    return [DEFAULT_LABEL, "structprune+iterations=1", *admm, "global", "obs-local", "flap", "wanda-sp"]


def ablation_specs(temperatures: list[float], iterations: list[int]) -> list[str]:
    """Issue 11's ablations (at 30% and 50%): allocation, temperature, ADMM iterations."""
    return (["structprune:uniform", "structprune:threshold", "structprune:softmax"]
            + [f"structprune:softmax+temperature={t:g}" for t in temperatures]
            + [f"structprune+iterations={k}" for k in iterations])


def parse_spec(spec: str) -> tuple[str, str, dict]:
    """``method[:allocation][+field=value...]`` -> ``(method, allocation, overrides)``."""
    head, *sets = spec.split("+")
    method, _, allocation = head.partition(":")
    overrides = {}
    for kv in sets:
        k, sep, v = kv.partition("=")
        if not sep:
            raise StructPruneError(f"bad override {kv!r} in method spec {spec!r}: use field=value")
        overrides[k] = field_value(v)
    return method, allocation or "auto", overrides


def build_config(spec: str, sparsity: float, settings: dict) -> PruneConfig:
    method, allocation, overrides = parse_spec(spec)
    cal = settings["protocol"]["calibration"]
    return PruneConfig(method=method, allocation=allocation, sparsity=sparsity, nsamples=cal["nsamples"],
                       seqlen=cal["seqlen"], seed=settings["seed"], batch_size=settings["batch_size"],
                       mlp_multiple=settings["mlp_multiple"], **overrides)


# -- measuring ------------------------------------------------------------------------------------

def evaluate(model, tok, protocol, device, datasets=None) -> dict:
    """The protocol's evaluation: per dataset ``PerplexityResult.to_dict()`` (ppl, ppl_interval,
    window_nlls, nwindows, ntokens, seqlen), in the model's current dtype."""
    res = evaluate_datasets(model.to(device), tok, datasets or protocol.readable_datasets()[0], seqlen=protocol.eval_seqlen,
                            limit=dict(protocol.eval_limits), device=device, progress=False)
    model.to("cpu")
    return {k: v.to_dict() for k, v in res.items()}


def evaluate_row(model, tok, protocol, device, settings: dict, check: bool) -> tuple[dict, dict | None]:
    """``(ppl, ppl_compute_dtype)``: the protocol's evaluation in ``settings['eval_dtype']`` (the
    model is converted in place) and, when ``check`` and that dtype is not the compute dtype,
    WikiText-2 in the compute dtype first (else None)."""
    ref = None
    if settings["eval_dtype"] != settings["dtype"]:
        if check:
            ref = evaluate(model, tok, protocol, device, datasets=["wikitext2"])
        model.to(DTYPES[settings["eval_dtype"]])
    return evaluate(model, tok, protocol, device, datasets=settings["datasets"]), ref


def heldout_ppl(model, held: torch.Tensor, device) -> dict:
    """Perplexity of the held-out calibration windows ``[n, seqlen]`` with interval and NLLs."""
    r = perplexity_from_ids(model.to(device), held.reshape(1, -1), held.shape[1], device=device, progress=False,
                            dataset="c4-heldout")
    model.to("cpu")
    return r.to_dict()


def _machine() -> dict:
    """What the row's seconds were measured under (the CPU is shared: the load matters)."""
    return {"threads": torch.get_num_threads(), "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg")
            else None, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def dense_row(model, tok, protocol, device, settings: dict) -> dict:
    from structprune.adapters import get_adapter
    from structprune.api import prunable_params

    t0 = time.perf_counter()
    copied = settings["eval_dtype"] != settings["dtype"]  # the dense model is pruned afterwards: keep it
    ppl, ref = evaluate_row(copy.deepcopy(model) if copied else model, tok, protocol, device, settings,
                            ("dense", 0.0) in EVAL_DTYPE_CHECKS)
    row = {"label": "dense", "method": "dense", "allocation": None, "sparsity_target": 0.0,
           "sparsity_achieved": 0.0, "params": sum(p.numel() for p in model.parameters()),
           "prunable_params": prunable_params(get_adapter(model)), "ppl": ppl, "peak_gpu_mem_bytes": None,
           "prune_seconds": 0.0, "eval_seconds": time.perf_counter() - t0, **_machine()}
    if ref is not None:
        row["ppl_compute_dtype"] = ref
    return row


def _prune_copy(base, calib, config, device, quiet, cache):
    model = copy.deepcopy(base)
    # One cache per dense model and calibration set: StructPrune's sensitivities and dense paths,
    # and global's gradient scores, are shared by the rows that need them.
    result = prune(model, calib, config, device=device, progress=not quiet, cache=cache)
    return model, result.report


def select_global_score(base, calib, held, config, device, quiet, cache) -> tuple:
    """``global`` at ``config.sparsity`` with each ``global_score`` option; the one with the lowest
    held-out perplexity is kept. Returns ``(model, report, selection)``, ``selection`` holding
    every option's held-out perplexity (interval, window NLLs), the choice, and the paired ratio
    of each option to the chosen one on the held-out windows."""
    scored = {}
    t0 = time.perf_counter()
    for kind in GLOBAL_SCORES:
        cfg = PruneConfig.from_dict({**config.to_dict(), "global_score": kind})
        model, report = _prune_copy(base, calib, cfg, device, quiet, cache)
        scored[kind] = (model, report, heldout_ppl(model, held, device))
        log.info("global %s at %.2f: held-out ppl %.3f", kind, config.sparsity, scored[kind][2]["ppl"])
    chosen = min(GLOBAL_SCORES, key=lambda k: scored[k][2]["ppl"])
    best = scored[chosen][2]["window_nlls"]
    options = {}
    for k, (_, report, h) in scored.items():
        r = paired_ratio(h["window_nlls"], best)
        options[k] = {"heldout": h, "ratio_to_chosen": {"value": r.value, "low": r.low, "high": r.high},
                      "prune_seconds": report["prune_seconds"]}
    selection = {"chosen": chosen, "rule": "lowest held-out perplexity", "options": options,
                 "heldout": {"source": "c4 held-out documents (C4_HELDOUT_DOCS)", "nsamples": held.shape[0],
                             "seqlen": held.shape[1], "seed": 1},
                 "seconds": time.perf_counter() - t0}
    model, report, _ = scored[chosen]
    return model, report, selection


def method_row(base, tok, calib, held, spec, sparsity, settings, protocol, device, quiet, cache) -> dict:
    config = build_config(spec, sparsity, settings)
    selection = None
    # A spec naming its score (global+global_score=fisher) gets that score; otherwise it is chosen.
    if config.method == "global" and "global_score" not in parse_spec(spec)[2]:
        model, r, selection = select_global_score(base, calib, held, config, device, quiet, cache)
    else:
        model, r = _prune_copy(base, calib, config, device, quiet, cache)
    t0 = time.perf_counter()
    ppl, ref = evaluate_row(model, tok, protocol, device, settings, (spec, sparsity) in EVAL_DTYPE_CHECKS)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    row = {"label": spec, "method": config.method, "allocation": config.allocation, "sparsity_target": sparsity,
           "sparsity_achieved": r["sparsity_achieved"], "params": r["params_after"],
           "prunable_params": r["prunable_params_after"], "ppl": ppl, "peak_gpu_mem_bytes": r["peak_gpu_mem_bytes"],
           "prune_seconds": r["prune_seconds"] if selection is None else selection["seconds"],
           "eval_seconds": time.perf_counter() - t0, "layers": r["layers"], "config": r["config"],
           "spec_config": config.to_dict(), **_machine()}
    if selection is not None:
        row["global_selection"] = selection
    if ref is not None:
        row["ppl_compute_dtype"] = ref
    return row


def same_config_row(rows: list[dict], spec: str, sparsity: float, settings: dict) -> dict | None:
    """A finished row at ``sparsity`` whose spec resolves to the same PruneConfig as ``spec``
    (e.g. ``structprune`` and ``structprune+iterations=1`` while one iteration is the default):
    pruning is deterministic, so its numbers are this row's and need not be measured twice.
    Never for ``global``, whose final config is chosen on held-out text."""
    config = build_config(spec, sparsity, settings)
    if config.method == "global":
        return None
    want = config.effective_dict()
    return next((r for r in rows if r["method"] != "dense" and r["sparsity_target"] == sparsity
                 and "spec_config" in r and effective_fields(r["spec_config"]) == want and "same_as" not in r), None)



# -- comparisons ----------------------------------------------------------------------------------

def ratio_interval(row_a: dict, row_b: dict, dataset: str):
    """Paired ratio ``ppl(a) / ppl(b)`` on ``dataset``'s windows (an ``Interval``), or None when
    either row lacks finite NLLs there."""
    a = row_a["ppl"].get(dataset, {}).get("window_nlls")
    b = row_b["ppl"].get(dataset, {}).get("window_nlls")
    if not a or not b or len(a) != len(b) or not all(math.isfinite(x) for x in (*a, *b)):
        return None
    return paired_ratio(a, b)


def _interval_dict(r) -> dict | None:
    return None if r is None else {"value": r.value, "low": r.low, "high": r.high, "level": r.level,
                                   "nwindows": r.nwindows}


def ratio(row_a: dict, row_b: dict, dataset: str) -> dict | None:
    """:func:`ratio_interval` as JSON-ready ``{value, low, high, level, nwindows}``."""
    return _interval_dict(ratio_interval(row_a, row_b, dataset))


def best_local(rows: list[dict], sparsity: float, dataset: str = "wikitext2") -> dict | None:
    """The local (layer-wise) method row with the lowest ``dataset`` perplexity at ``sparsity``."""
    cands = [r for r in rows if r["method"] in LOCAL_METHODS and r["sparsity_target"] == sparsity
             and math.isfinite(r["ppl"].get(dataset, {}).get("ppl", math.nan))]
    return min(cands, key=lambda r: r["ppl"][dataset]["ppl"], default=None)


def _row(rows, label, sparsity):
    return next((r for r in rows if r["label"] == label and r["sparsity_target"] == sparsity), None)


def targets(rows: list[dict], sparsities: list[float], dataset: str = "wikitext2") -> list[dict]:
    """The targets on ``dataset``. Issue 11: StructPrune / global upper end <= 1.02 at every sparsity,
    StructPrune / best local upper end <= 0.8 at 40% and 50%. Issue 27: StructPrune / global upper end
    <= 1.00 at 20-50%, StructPrune / dense upper end <= 2.1 at 30% and <= 4.0 at 50%. Each entry: issue,
    what, sparsity, bound, the ratio with its interval, and ``status`` met / missed / not measured."""
    out = []
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for s in sparsities:
        sp = _row(rows, DEFAULT_LABEL, s)
        checks = [(11, "StructPrune / global", _row(rows, "global", s), TARGET_VS_GLOBAL)]
        if s in TARGET_LOCAL_SPARSITIES:
            checks.append((11, "StructPrune / best local", best_local(rows, s, dataset), TARGET_VS_LOCAL))
        if s in TARGET27_VS_GLOBAL_SPARSITIES:
            checks.append((27, "StructPrune / global", _row(rows, "global", s), TARGET27_VS_GLOBAL))
        if s in TARGET27_VS_DENSE:
            checks.append((27, "StructPrune / dense", dense, TARGET27_VS_DENSE[s]))
        intervals: dict = {}  # issues 11 and 27 bound the same pair: one bootstrap for both
        for issue, what, other, bound in checks:
            key = None if other is None else other["label"]
            if key not in intervals:
                intervals[key] = ratio_interval(sp, other, dataset) if sp is not None and other is not None else None
            ri = intervals[key]
            r = _interval_dict(ri)
            status = "not measured" if ri is None else ("met" if at_most(ri, bound) else "missed")
            out.append({"issue": issue, "what": what, "sparsity": s, "dataset": dataset, "bound": bound, "ratio": r,
                        "status": status, "against": None if other is None else other["label"]})
    return out


def format_target(t: dict) -> str:
    r = t["ratio"]
    head = f"issue {t.get('issue', 11)}: {t['what']} at {t['sparsity']:.0%} ({DATASET_TITLES.get(t['dataset'], t['dataset'])}"
    head += f", against {t['against']})" if t["against"] else ")"
    if r is None:
        return f"{head}: not measured yet (bound {t['bound']})"
    gap = "" if t["status"] == "met" else f", missed by {r['high'] - t['bound']:+.4f} on the upper end"
    return (f"{head}: {t['status'].upper()}: {r['value']:.4f} [{r['low']:.4f}, {r['high']:.4f}], "
            f"upper end {'<=' if t['status'] == 'met' else '>'} {t['bound']}{gap}")


# -- output ---------------------------------------------------------------------------------------

def _fmt_ppl(d: dict | None) -> str:
    if not d or d.get("ppl") is None:
        return "n/a"
    x = d["ppl"]
    if math.isinf(x) or math.isnan(x):
        return str(x)
    ci = d.get("ppl_interval")
    return f"{x:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _fmt_ratio(r: dict | None) -> str:
    return "n/a" if r is None else f"{r['value']:.4f} [{r['low']:.4f}, {r['high']:.4f}]"


def eval_dtype_note(record: dict) -> str:
    """How the evaluation dtype changes WikiText-2, per checked row: the paired ratio of its
    perplexity in the evaluation dtype to the compute dtype's (same windows)."""
    checked = [r for r in record["rows"] if r.get("ppl_compute_dtype", {}).get("wikitext2")]
    if not checked:
        return ""
    parts = []
    for r in checked:
        q = paired_ratio(r["ppl"]["wikitext2"]["window_nlls"], r["ppl_compute_dtype"]["wikitext2"]["window_nlls"])
        name = r["label"] if r["method"] == "dense" else f"{r['label']} at {r['sparsity_target']:.0%}"
        parts.append(f"{name} {q.value:.5f} [{q.low:.5f}, {q.high:.5f}]")
    s = record["settings"]
    return (f" (WikiText-2 perplexity ratio {s['eval_dtype']} / {s['dtype']} weights, paired: "
            + "; ".join(parts) + ")")


def markdown(record: dict) -> str:
    s, rows = record["settings"], record["rows"]
    p = s["protocol"]
    ds = s.get("datasets", list(p["eval_windows"]))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    cal = p["calibration"]
    wins = ", ".join(f"{'all' if n is None else f'the first {n}'} of {DATASET_TITLES.get(d, d)}"
                     for d, n in ((d, p["eval_windows"].get(d)) for d in ds))
    lines = [f"# Baselines on {s['model']}: {p['name']} protocol", "",
             f"- protocol `{p['name']}` (docs/protocol.md): calibration C4, {cal['nsamples']} windows of "
             f"{cal['seqlen']} tokens, seed {cal['seed']} (the same windows for every row); evaluation on windows of "
             f"{p['eval_seqlen']}: {wins}",
             "- perplexity with its 95% percentile bootstrap interval over windows; ratios are paired (same windows) "
             "with their 95% paired bootstrap interval",
             f"- `global`: score ({', '.join(GLOBAL_SCORES)}) chosen per sparsity by the lowest perplexity on "
             f"{s['heldout']} held-out C4 calibration windows of {cal['seqlen']} (documents disjoint from calibration "
             "and evaluation)",
             f"- sparsity: fraction of prunable decoder parameters removed (q, k, v, o, MLP of all "
             f"{record['num_layers']} layers); embeddings and LM head kept; MLP widths rounded to multiples of "
             f"{s['mlp_multiple']}",
             f"- pruned in {s['dtype']}, evaluated in {s.get('eval_dtype', s['dtype'])}"
             f"{eval_dtype_note(record)}, torch {record['versions']['torch']}, transformers {record['versions']['transformers']}"
             + "".join(f" (rows finished up to {v['until']}: torch {v['torch']}, transformers {v['transformers']})"
                       for v in record.get("versions_earlier", []))
             + "; device and threads per row in the JSON",
             *[f"- command: `{c}`" for c in dict.fromkeys(record["commands"])], ""]
    if dense is not None:
        lines += [f"Dense: {dense['params']:,} parameters, {dense['prunable_params']:,} prunable; "
                  + ", ".join(f"{DATASET_TITLES.get(d, d)} {_fmt_ppl(dense['ppl'].get(d))}" for d in ds) + ".", ""]
    head = ["method", "target", "achieved"] + [f"{DATASET_TITLES.get(d, d)} ppl" for d in ds] + ["prune s", "eval s"]
    lines += ["## Perplexity", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order: dict[str, int] = {}
    for r in rows:
        order.setdefault(r["label"], len(order))
    for r in sorted(rows, key=lambda r: (r["method"] != "dense", r["sparsity_target"], order[r["label"]])):
        label = r["label"] + (f" (= {r['same_as']})" if "same_as" in r else "")
        if r["method"] == "global" and "global_selection" in r:
            label += f" ({r['global_selection']['chosen']})"
        cells = [label, f"{r['sparsity_target']:.2f}", f"{r['sparsity_achieved']:.4f}"] + \
                [_fmt_ppl(r["ppl"].get(d)) for d in ds] + [f"{r['prune_seconds']:.0f}", f"{r['eval_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    sparsities = sorted({r["sparsity_target"] for r in rows if r["method"] != "dense"})
    lines += ["## Paired ratios", "",
              "Each method against `global` at the same sparsity (same windows), and at "
              + "/".join(f"{x:.0%}" for x in TARGET_LOCAL_SPARSITIES)
              + " against the best local method (lowest WikiText-2 perplexity among "
              + ", ".join(LOCAL_METHODS) + "). Below 1: better.", ""]
    for sp in sparsities:
        at = [r for r in rows if r["sparsity_target"] == sp and r["method"] != "dense"]
        ref = _row(rows, "global", sp)
        loc = best_local(rows, sp) if sp in TARGET_LOCAL_SPARSITIES else None
        refs = [("global", ref)] + ([(f"best local ({loc['label']})" if loc else "best local", loc)]
                                     if sp in TARGET_LOCAL_SPARSITIES else [])
        head = ["method"] + [f"{DATASET_TITLES.get(d, d)} / {name}" for name, _ in refs for d in ds]
        lines += [f"### {sp:.0%}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in sorted(at, key=lambda r: order[r["label"]]):
            cells = [r["label"]] + [_fmt_ratio(ratio(r, other, d) if other else None) for _, other in refs for d in ds]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    sel = [r for r in rows if "global_selection" in r]
    if sel:
        lines += ["## `global`: score chosen on held-out text", "",
                  "| row | sparsity | " + " | ".join(f"held-out ppl ({k})" for k in GLOBAL_SCORES) + " | chosen |",
                  "|---|---|" + "---|" * len(GLOBAL_SCORES) + "---|"]
        for r in sorted(sel, key=lambda r: (r["sparsity_target"], order[r["label"]])):
            g = r["global_selection"]
            lines.append(f"| {r['label']} | {r['sparsity_target']:.2f} | "
                         + " | ".join(_fmt_ppl(g["options"][k]["heldout"]) for k in GLOBAL_SCORES)
                         + f" | {g['chosen']} |")
        lines.append("")
    reruns = [(r, g) for r in rows if r["method"] == "global"
              for g in [_row(rows, "global", r["sparsity_target"])]
              if g is not None and parse_spec(r["label"])
              == ("global", "auto", {"global_score": (g.get("global_selection") or {}).get("chosen")})]
    if reruns:  # the same method and score measured again (a later code): how far apart, paired
        lines += ["## `global` measured again", ""]
        for r, g in reruns:
            lines.append(f"- `{r['label']}` at {r['sparsity_target']:.0%} (finished {r.get('finished_at', '?')}) is "
                         f"`global` with the score it chose, run again: against the `global` row (finished "
                         f"{g.get('finished_at', '?')}), " + ", ".join(
                             f"{DATASET_TITLES.get(d, d)} {_fmt_ratio(ratio(r, g, d))}" for d in ds))
        lines.append("")
    lines += ["## Targets (WikiText-2)", ""] + [f"- {format_target(t)}" for t in record["targets"]] + [""]
    if (p["name"], s["model"]) == ("cpu", "smollm2-135m") and any(
            t.get("issue") == 27 and t["status"] == "missed" for t in record["targets"]):
        lines += [TARGET27_TRIED, ""]  # the sweeps it names are this protocol's and model's
    return "\n".join(lines)


def write(record: dict, out: Path) -> None:
    """JSON and Markdown, each written to a temporary file and renamed: a kill during the write
    leaves the previous complete file, never a truncated one (``--resume`` must be able to read it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    record["targets"] = targets(record["rows"], sorted({r["sparsity_target"] for r in record["rows"]
                                                         if r["method"] != "dense"}))
    for suffix, text in ((".json", json.dumps(record, indent=2) + "\n"), (".md", markdown(record))):
        path = out.with_suffix(suffix)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def plot(record: dict, path: Path) -> None:
    """WikiText-2 perplexity against sparsity for the rows measured at three sparsities or more."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed (pip install structprune[plot]): no plot written")
        return
    rows = record["rows"]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    labels = list(dict.fromkeys(r["label"] for r in rows if r["method"] != "dense"))
    colors = plt.get_cmap("tab20").colors
    for i, label in enumerate(labels):
        pts = sorted((r["sparsity_achieved"], r["ppl"]["wikitext2"]["ppl"], *(r["ppl"]["wikitext2"].get("ppl_interval")
                      or [math.nan, math.nan])) for r in rows if r["label"] == label and "wikitext2" in r["ppl"])
        if len(pts) < 3:  # ablations measured at one or two sparsities are in the table only
            continue
        main = label == DEFAULT_LABEL
        x, y = [q[0] for q in pts], [q[1] for q in pts]
        err = [[q[1] - q[2] for q in pts], [q[3] - q[1] for q in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", label=label, capsize=2,
                    color="black" if main else colors[i % len(colors)], linewidth=2.5 if main else 1.2)
    dense = next((r for r in rows if r["method"] == "dense" and "wikitext2" in r["ppl"]), None)
    if dense is not None:
        ax.axhline(dense["ppl"]["wikitext2"]["ppl"], color="gray", linestyle="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (fraction of prunable decoder parameters removed)")
    ax.set_ylabel("WikiText-2 perplexity (log), 95% interval")
    ax.set_title(f"{record['settings']['model']}: structured pruning, {record['settings']['protocol']['name']} "
                 "protocol", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- driver ---------------------------------------------------------------------------------------

def plan_rows(a) -> list[tuple[str, float]]:
    """``(spec, sparsity)`` in the order they are measured: the main rows sparsity by sparsity
    (so an interrupted table is complete at the low sparsities first), then the ablations."""
    sparsities = [float(x) for x in a.sparsities.split(",")]
    specs = ([s.strip() for s in a.methods.split(",") if s.strip()] if a.methods
             else main_specs(a.admm_iterations))
    todo = [(spec, s) for s in sparsities for spec in specs]
    if a.ablations:
        temps = [float(t) for t in a.ablation_temperatures.split(",")]
        iters = [int(k) for k in a.ablation_iterations.split(",")]
        todo += [(spec, s) for s in ABLATION_SPARSITIES for spec in ablation_specs(temps, iters)]
    return list(dict.fromkeys(todo))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--protocol", choices=("cpu", "gpu"), default=None,
                   help="docs/protocol.md; default: gpu when CUDA is available, else cpu")
    p.add_argument("--methods", default="",
                   help="comma-separated method specs method[:allocation][+field=value...] (default: issue 11's rows)")
    p.add_argument("--sparsities", default=SPARSITIES)
    p.add_argument("--eval", default=None,
                   help="comma-separated evaluation sets (default: the protocol's, less any that cannot be read "
                        "here, such as PTB, which does not ship; a set named here must be readable)")
    p.add_argument("--admm-iterations", type=int, default=ADMM_ITERATIONS, help="K of an ADMM main row (0: none, the default)")
    p.add_argument("--ablations", action="store_true", help="add the ablation rows at 30%% and 50%%")
    p.add_argument("--ablation-temperatures", default="1", help="softmax temperatures besides the default")
    p.add_argument("--ablation-iterations", default="2", help="ADMM iterations (K > 1) measured among the ablations")
    p.add_argument("--heldout", type=int, default=0,
                   help="held-out C4 windows for global's score choice (0: %s by protocol)" % HELDOUT_WINDOWS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--mlp-multiple", type=int, default=8, help="as the CLI's default")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="the model's dtype while pruning")
    p.add_argument("--eval-dtype", default=None, choices=sorted(DTYPES),
                   help="weights' dtype for the evaluation (default: --dtype); docs/protocol.md's CPU protocol "
                        "evaluates in bfloat16, with a paired check against --dtype on WikiText-2")
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads, set explicitly (recorded per row with the load average)")
    p.add_argument("--out", type=Path, default=None,
                   help="output prefix (.json, .md, .png); default benchmarks/results/baselines_<protocol>")
    p.add_argument("--resume", action="store_true", help="keep the rows already in the output JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="[%(name)s] %(message)s")
    torch.set_num_threads(a.threads)
    a.protocol = a.protocol or ("gpu" if a.device.startswith("cuda") else "cpu")
    out = a.out or Path(f"benchmarks/results/baselines_{a.protocol}")
    out = out.with_suffix("") if out.suffix in (".json", ".md", ".png") else out
    try:
        protocol = get_protocol(a.protocol)
        if a.eval is None:
            datasets, notes = protocol.readable_datasets()
            for note in notes:
                print(f"baselines: {note}", file=sys.stderr)
        else:
            datasets = [d.strip() for d in a.eval.split(",") if d.strip()]
            for d in datasets:  # a named set must be there: refuse now, not after hours of pruning
                load_text(d)
        settings = {"model": a.model, "dtype": a.dtype, "eval_dtype": a.eval_dtype or a.dtype, "protocol": protocol.to_dict(),
                    "datasets": datasets, "seed": a.seed,
                    "batch_size": a.batch_size, "mlp_multiple": a.mlp_multiple,
                    "heldout": a.heldout or HELDOUT_WINDOWS.get(protocol.name, HELDOUT_WINDOWS["cpu"])}
        todo = plan_rows(a)
        for spec, s in todo:  # fail on a bad spec before hours of work
            build_config(spec, s, settings)
        return run(a, protocol, settings, todo, out, argv)
    except StructPruneError as e:
        print(f"baselines: error: {e}", file=sys.stderr)
        return 2


def run(a, protocol, settings: dict, todo: list[tuple[str, float]], out: Path, argv) -> int:
    import transformers

    rows, commands = [], []
    if a.resume and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        old_settings = {"eval_dtype": old.get("settings", {}).get("dtype"),  # before --eval-dtype
                        "datasets": list(old.get("settings", {}).get("protocol", {}).get("eval_windows", {})),  # before --eval
                        **old.get("settings", {})}
        diff = [k for k in SETTING_KEYS if old_settings.get(k) != settings[k]]
        if diff:
            raise StructPruneError(f"--resume: {out}.json was measured with other settings ({', '.join(diff)}); "
                                   "use the same settings or another --out")
        rows, commands = old["rows"], old.get("commands", [])
        # A default the row's method reads changed since (e.g. StructPrune's iterations): the label
        # no longer names what was measured, and mixing both in one table would mislabel rows.
        stale = [f"{r['label']}@{r['sparsity_target']}" for r in rows if "spec_config" in r
                 and build_config(r["label"], r["sparsity_target"], settings).effective_dict()
                 != effective_fields(r["spec_config"])]
        if stale:
            raise StructPruneError(f"--resume: rows {', '.join(stale)} of {out}.json were measured with another "
                                   "resolved config (a default changed); start a new --out")
    done = {(r["label"], r["sparsity_target"]) for r in rows}
    command = shlex.join(["python", "benchmarks/baselines.py", *(argv if argv is not None else sys.argv[1:])])
    record = {"settings": settings, "rows": rows,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "device_name": hardware_name(a.device),
              "commands": commands + [command]}  # a resumed table lists every command that added rows

    base, tok = load_model(a.model, dtype=DTYPES[a.dtype], device="cpu")
    from structprune.adapters import get_adapter
    record["num_layers"] = len(get_adapter(base).layers())
    cal = settings["protocol"]["calibration"]
    calib = get_calibration(tok, "c4", nsamples=cal["nsamples"], seqlen=cal["seqlen"], seed=a.seed)
    held = get_heldout_calibration(tok, "c4", nsamples=settings["heldout"], seqlen=cal["seqlen"], seed=1)
    t_start = time.perf_counter()
    cache: dict = {}
    if ("dense", 0.0) not in done:  # evaluated once per table; a resumed run reads it from the JSON
        rows.insert(0, dense_row(base, tok, protocol, a.device, settings))
        write(record, out)
    for spec, s in todo:
        if (spec, s) in done:
            continue
        same = same_config_row(rows, spec, s, settings)
        if same is not None:
            row = {**copy.deepcopy(same), "label": spec, "same_as": same["label"], **_machine()}
        else:
            log.info("row %s at sparsity %.2f", spec, s)
            row = method_row(base, tok, calib, held, spec, s, settings, protocol, a.device, a.quiet, cache)
        rows.append(row)
        done.add((spec, s))
        write(record, out)
        print(f"{spec:<36} s={s:.2f} achieved={row['sparsity_achieved']:.4f} "
              f"wikitext2={_fmt_ppl(row['ppl'].get('wikitext2'))} prune={row['prune_seconds']:.1f}s "
              f"eval={row['eval_seconds']:.1f}s" + (f" (= {row['same_as']})" if "same_as" in row else ""), flush=True)
    record["total_seconds_this_run"] = time.perf_counter() - t_start
    write(record, out)
    plot(record, out.with_suffix(".png"))
    for t in record["targets"]:
        print(format_target(t))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
