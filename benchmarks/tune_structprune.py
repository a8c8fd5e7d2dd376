"""Choose StructPrune's hyper-parameters on held-out calibration text (never evaluation sets),
with intervals (issue 11, item 4).

For each value of one ``PruneConfig`` field (``--sweep``) and each sparsity: prune the model with
the protocol's calibration (C4 calibration documents, seed 0), then score held-out windows from
C4 documents disjoint from calibration and evaluation (``get_heldout_calibration``, seed 1; the
same windows `benchmarks/baselines.py` tunes `global` on). Every row keeps its per-window NLLs;
the table gives each perplexity with its 95% bootstrap interval over windows and the paired ratio
to the reference value (``--reference``, the current default) on the same windows, and a decision
per sparsity by the protocol's rule: a value replaces the reference only where the upper end of
its paired interval is below 1 (docs/protocol.md, ``at_most``).

    # CPU protocol (32x2048 calibration, 8 held-out windows of 2048), resumable across sessions
    python benchmarks/tune_structprune.py --protocol cpu --sparsity 0.3,0.5 \\
        --sweep temperature=0.25,0.5,1,2,inf --reference 1 --threads 2 --resume \\
        --out benchmarks/results/tune_cpu_temperature

Rows are saved (atomically) after each one; ``--resume`` keeps the finished rows of a JSON made
with the same settings and refuses one made with others.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without install
from structprune import PruneConfig, load_model, prune  # noqa: E402
from structprune.bench import hardware_name  # noqa: E402
from structprune.config import INPUT_REFIT_KNOBS, effective_fields, field_value, refits_inputs  # noqa: E402
from structprune.data import get_calibration  # noqa: E402
from structprune.data.calibration import get_heldout_calibration  # noqa: E402
from structprune.eval.intervals import paired_ratio  # noqa: E402
from structprune.eval.perplexity import perplexity_from_ids  # noqa: E402
from structprune.eval.protocol import get_protocol  # noqa: E402

# Per ADMM iteration, from the report's solver log (StructPrune's section 3 in docs/structprune.md).
ITERATION_FIELDS = ("iteration", "objective", "consensus_objective", "primal_residual", "dual_residual",
                    "eps_primal", "eps_dual", "rho", "lambda", "converged", "kept_sets_changed", "seconds")
# Held-out windows per protocol (of the protocol's calibration length), as baselines.py uses.
HELDOUT = {"cpu": 8, "gpu": 32}


def _label(v) -> str | int | float:
    """JSON-safe value (``inf`` as a string)."""
    return "inf" if isinstance(v, float) and math.isinf(v) else v


def heldout_nlls(model, held: torch.Tensor, device, domain: str = "c4") -> dict:
    """Perplexity of the held-out windows ``[n, seqlen]``: ``PerplexityResult.to_dict()``."""
    r = perplexity_from_ids(model.to(device), held.reshape(1, -1), held.shape[1], device=device, progress=False,
                            dataset=f"{domain}-heldout")
    model.to("cpu")
    return r.to_dict()


def domain_rows(r: dict) -> dict:
    """``{domain: PerplexityResult dict}`` of a row: C4 (``heldout``) and any other domain."""
    return {"c4": r["heldout"], **r.get("heldout_domains", {})}


#: ``--rule equivalent`` (a change made for speed, issue 30): adopted where the paired interval lies
#: within these bounds in every domain, i.e. where it measurably changes nothing.
EQUIVALENT = (0.99, 1.01)


def compare(rows: list[dict], name: str, reference, rule: str = "better") -> list[dict]:
    """Per sparsity: each row's paired ratio to the reference row in every held-out domain, and
    the decision. ``rule="better"``: among the values whose paired interval's upper end is below 1
    in *every* domain, the one with the lowest geometric mean of its domain ratios (docs/protocol.md:
    a change is adopted only where it is better out of domain too); else the reference.
    ``rule="equivalent"``: the values whose interval lies within :data:`EQUIVALENT` in every domain
    are equivalent to the reference (a faster computation may replace it)."""
    out = []
    for s in sorted({r["sparsity"] for r in rows}):
        at = [r for r in rows if r["sparsity"] == s]
        ref = next((r for r in at if r[name] == _label(reference)), None)
        for r in at:
            if ref is None:
                r["ratio_to_reference"], r["ratios"] = None, {}
                continue
            mine, theirs = domain_rows(r), domain_rows(ref)
            r["ratios"] = {d: paired_ratio(mine[d]["window_nlls"], theirs[d]["window_nlls"]).to_dict()
                           for d in mine if d in theirs}
            r["ratio_to_reference"] = r["ratios"]["c4"]
        if ref is None:
            out.append({"sparsity": s, "best": None, "decision": f"reference {name}={reference} not measured "
                                                                  "at this sparsity"})
            continue
        gm = lambda r: math.exp(sum(math.log(q["value"]) for q in r["ratios"].values()) / len(r["ratios"]))  # noqa: E731
        qtext = lambda r: "; ".join(f"{d} {q['value']:.4f} [{q['low']:.4f}, {q['high']:.4f}]"  # noqa: E731
                                    for d, q in r["ratios"].items())
        if rule == "equivalent":
            lo, hi = EQUIVALENT
            same = [r for r in at if r is not ref and r["ratios"] and all(lo <= q["low"] and q["high"] <= hi
                                                                          for q in r["ratios"].values())]
            others = [r for r in at if r is not ref and r not in same]
            decision = "; ".join([f"{name}={r[name]} equivalent (within [{lo}, {hi}] in every domain: {qtext(r)})"
                                  for r in same] + [f"{name}={r[name]} not equivalent ({qtext(r)})" for r in others])
            out.append({"sparsity": s, "best": [r[name] for r in same], "decision": decision})
            continue
        wins = [r for r in at if r is not ref and all(q["high"] < 1.0 for q in r["ratios"].values())]
        doms = ", ".join(ref["ratios"])
        if wins:
            best = min(wins, key=gm)
            qs = "; ".join(f"{d} {q['value']:.4f} [{q['low']:.4f}, {q['high']:.4f}]" for d, q in best["ratios"].items())
            decision = f"{name}={best[name]}: lower than the reference in every domain ({qs})"
        else:
            best = min(at, key=gm)
            if best is ref:
                decision = f"keep {name}={reference}: no value is lower in the geometric mean over {doms}"
            else:
                qs = "; ".join(f"{d} {q['value']:.4f} [{q['low']:.4f}, {q['high']:.4f}]"
                               for d, q in best["ratios"].items())
                decision = (f"keep {name}={reference}: {name}={best[name]} has the lowest geometric mean "
                            f"({qs}), but not every interval excludes 1")
        out.append({"sparsity": s, "best": best[name], "decision": decision})
    return out


def joint_decision(rows: list[dict], name: str) -> dict | None:
    """The rule that sets one default from several sparsities (docs/structprune.md): among the
    values measured at every sparsity of the sweep, the lowest geometric mean of held-out
    perplexity. None with fewer than two sparsities."""
    sparsities = sorted({r["sparsity"] for r in rows})
    if len(sparsities) < 2:
        return None
    by_value: dict = {}
    for r in rows:
        by_value.setdefault(r[name], {})[r["sparsity"]] = r["heldout"]["ppl"]
    gm = {v: math.exp(sum(math.log(p) for p in at.values()) / len(at))
          for v, at in by_value.items() if set(at) == set(sparsities)}
    if not gm:
        return None
    ranked = sorted(gm, key=gm.get)
    return {"sparsities": sparsities, "best": ranked[0], "geomean": {str(v): gm[v] for v in ranked}}


def sweep_config(a, fixed: dict, name: str, sparsity: float, value) -> PruneConfig:
    """The config of one row: StructPrune at ``sparsity`` with the fixed fields and ``name = value``.

    A fixed knob of the input-row refits (``input_damp``) is left out of a row that refits no
    inputs (e.g. the ``value_iterations=0`` reference), which would refuse it: it could not change
    that row."""
    fields = {"method": "structprune", **fixed, name: value}
    if not refits_inputs(fields):
        fields = {k: v for k, v in fields.items() if k not in INPUT_REFIT_KNOBS or k == name}
    return PruneConfig(sparsity=sparsity, nsamples=a.nsamples, seqlen=a.seqlen, **fields)


def settings_of(a, protocol) -> dict:
    out = {"model": a.model, "dtype": a.dtype, "protocol": protocol, "nsamples": a.nsamples, "seqlen": a.seqlen,
           "heldout": a.heldout, "sweep": a.sweep.split("=")[0], "fixed": a.fixed, "reference": a.reference}
    if a.heldout_domains != "c4":  # tables made before the second domain keep resuming
        out["heldout_domains"] = a.heldout_domains
    if a.rule != "better":  # likewise for tables made before the rule was an option
        out["rule"] = a.rule
    return out


def machine(device) -> str:
    """The processor and the kernels' instruction set: rows measured on different ones are not
    bit-comparable."""
    isa = torch.backends.cpu.get_cpu_capability() if str(device).startswith("cpu") else f"torch {torch.__version__}"
    return f"{hardware_name(device)} ({isa})"


def _residuals(e: dict) -> str:
    """``primal / dual`` of one iteration (the one-shot pass has no dual residual: no earlier consensus)."""
    f = lambda x: "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"  # noqa: E731
    return f"{f(e.get('primal_residual'))} / {f(e.get('dual_residual'))}"


def write(record: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out.with_suffix(".json"))
    s, name = record["settings"], record["settings"]["sweep"]
    d = record["dense"]
    extra = [d for d in s.get("heldout_domains", "c4").split(",") if d != "c4"]
    lines = [f"# Sweep of `{name}` on held-out text ({', '.join(['C4', *extra])})", "",
             f"Command: `{record['command']}`", "",
             f"Model {s['model']}, {record['device']} {s['dtype']}, calibration {s['nsamples']}x{s['seqlen']} "
             f"(C4 calibration documents, seed 0), scored on {s['heldout']} held-out windows of {s['seqlen']} "
             f"(disjoint C4 documents, seed 1)"
             + "".join(f", and {s['heldout']} windows of {x} held-out text (WikiText-2 validation, seed 1)"
                       for x in extra)
             + f". Dense held-out perplexity: C4 {d['ppl']:.3f} [{d['ppl_interval'][0]:.3f}, {d['ppl_interval'][1]:.3f}]"
             + "".join(f", {x} {record['dense_domains'][x]['ppl']:.3f}" for x in extra)
             + f". Fixed: {s['fixed'] or 'defaults'}. "
             f"Intervals: 95% bootstrap over windows; ratios paired on the same windows against "
             f"{name}={s['reference']} (the reference). Hardware: "
             f"{', '.join(sorted({r.get('hardware', 'not recorded') for r in record['rows']})) or 'none yet'}.", "",
             f"| sparsity | {name} | held-out ppl [95%] | ratio to reference [95%] | "
             + "".join(f"{x} ppl | {x} ratio [95%] | " for x in extra)
             + "achieved | objective per iteration | primal / dual residual per iteration | kept iterate | seconds |",
             "| --- | --- | --- | --- | " + "--- | --- | " * len(extra) + "--- | --- | --- | --- | --- |"]
    for r in record["rows"]:
        h, q = r["heldout"], r.get("ratio_to_reference")
        obj = ", ".join(f"{o:.4f}" for o in r["objective"])
        res = ", ".join(_residuals(e) for e in r.get("admm_trace", []))
        fmt = lambda q: "" if q is None else f"{q['value']:.4f} [{q['low']:.4f}, {q['high']:.4f}]"  # noqa: E731
        rat = fmt(q)
        more = "".join(f"{r['heldout_domains'][x]['ppl']:.3f} | {fmt((r.get('ratios') or {}).get(x))} | "
                       if x in r.get("heldout_domains", {}) else " | | " for x in extra)
        lines.append(f"| {r['sparsity']:.2f} | {r[name]} | {h['ppl']:.3f} [{h['ppl_interval'][0]:.3f}, "
                     f"{h['ppl_interval'][1]:.3f}] | {rat} | {more}{r['achieved']:.4f} | {obj} | {res} | "
                     f"{r.get('chosen_iteration', '')} | {r['seconds']:.0f} |")
    if record["settings"].get("rule", "better") == "equivalent":
        lines += ["", f"Decision per sparsity (a faster computation may replace the reference where its paired "
                  f"interval lies within [{EQUIVALENT[0]}, {EQUIVALENT[1]}] in every held-out domain):", ""]
    else:
        lines += ["", "Decision per sparsity (a value replaces the reference only where the upper end of its paired "
                  "interval is below 1 in every held-out domain):", ""]
    lines += [f"* {c['sparsity']:.2f}: {c['decision']}" for c in record["decisions"]]
    joint = joint_decision(record["rows"], name) if record["settings"].get("rule", "better") == "better" else None
    if joint:
        ranked = ", ".join(f"{v} {g:.2f}" for v, g in joint["geomean"].items())
        lines += ["", f"One default for all sparsities (the rule of docs/structprune.md: the lowest geometric mean "
                  f"of held-out perplexity over {', '.join(f'{x:.2f}' for x in joint['sparsities'])}, among the "
                  f"values measured at each): **{name}={joint['best']}**. Geometric means: {ranked}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def compare_code(specs: list[str], rule: str, command: str) -> dict:
    """A record comparing two results files measured with the same settings by two code versions
    (``path:label`` each, the first the reference): their rows, the swept field replaced by ``code``
    = the label, paired as a sweep of ``code``; the commands that made both files are kept."""
    (ref_path, ref_label), (cand_path, cand_label) = (spec.rsplit(":", 1) for spec in specs)
    ref, cand = json.loads(Path(ref_path).read_text()), json.loads(Path(cand_path).read_text())
    same = ("model", "dtype", "protocol", "nsamples", "seqlen", "heldout", "sweep", "fixed", "heldout_domains")
    diff = [k for k in same if ref["settings"].get(k) != cand["settings"].get(k)]
    if diff:
        raise SystemExit(f"--compare-code: the two files were measured with other settings ({', '.join(diff)})")
    swept = ref["settings"]["sweep"]
    rows = []
    for label, rec in ((ref_label, ref), (cand_label, cand)):
        for r in rec["rows"]:
            rows.append({**{k: v for k, v in r.items() if k not in ("ratios", "ratio_to_reference")},
                         "code": label, "swept": {swept: r[swept]}})
    settings = {**ref["settings"], "sweep": "code", "reference": ref_label, "rule": rule}
    record = {"command": f"{command} (reference: {ref['command']}; candidate: {cand['command']})",
              "settings": settings, "device": ref["device"], "rows": rows, "dense": ref["dense"],
              "dense_domains": ref.get("dense_domains", {})}
    record["decisions"] = compare(rows, "code", ref_label, rule)
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--protocol", choices=("cpu", "gpu"), default=None,
                   help="calibration size and held-out windows of docs/protocol.md (else --nsamples/--seqlen/"
                        "--heldout)")
    p.add_argument("--sparsity", default="0.3,0.5")
    p.add_argument("--sweep", help="name=v1,v2,... of a PruneConfig field (required unless --render)")
    p.add_argument("--reference", default=None, help="the sweep's reference value (default: the field's default)")
    p.add_argument("--fixed", default="", help="name=value;name=value of other PruneConfig fields")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--heldout", type=int, default=8, help="held-out windows (of --seqlen tokens) per domain")
    p.add_argument("--heldout-domains", default="c4,wikitext2",
                   help="held-out text: C4 documents disjoint from calibration and evaluation, and WikiText-2 "
                        "validation (a second domain; evaluation reads its test split)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--out", required=True, help="output path prefix (.md and .json are added)")
    p.add_argument("--resume", action="store_true", help="keep the finished rows of --out's JSON")
    p.add_argument("--rule", choices=("better", "equivalent"), default="better",
                   help="better: adopt a value only where it is lower than the reference in every domain; "
                        "equivalent: where it is within [0.99, 1.01] of it (a change made for speed)")
    p.add_argument("--render", action="store_true",
                   help="only rewrite --out's Markdown (decisions included) from its JSON; measures nothing")
    p.add_argument("--compare-code", nargs=2, metavar="JSON:LABEL",
                   help="measures nothing: compare the rows of two results files of this script made with the "
                        "same settings by two code versions (a change with no config knob), the first the "
                        "reference, into --out (a sweep of `code`)")
    a = p.parse_args(argv)
    out = ROOT / a.out if not Path(a.out).is_absolute() else Path(a.out)
    if a.compare_code:
        write(compare_code(a.compare_code, a.rule, shlex.join(["python", "benchmarks/tune_structprune.py",
                                                                 *(argv or sys.argv[1:])])), out)
        return 0
    if a.render:
        record = json.loads(out.with_suffix(".json").read_text())
        name = record["settings"]["sweep"]
        record["decisions"] = compare(record["rows"], name, field_value(str(record["settings"]["reference"])),
                                      record["settings"].get("rule", "better"))
        write(record, out)
        return 0
    if not a.sweep:
        p.error("--sweep is required")

    if a.protocol:
        proto = get_protocol(a.protocol)
        a.nsamples, a.seqlen, a.heldout = proto.calib_nsamples, proto.calib_seqlen, HELDOUT[a.protocol]
    name, values = a.sweep.split("=")
    values = [field_value(v) for v in values.split(",")]
    if name not in PruneConfig.__dataclass_fields__:
        p.error(f"--sweep: {name} is not a PruneConfig field")
    if a.reference is None:
        a.reference = _label(PruneConfig.__dataclass_fields__[name].default)
    reference = field_value(str(a.reference))
    if _label(reference) not in [_label(v) for v in values]:
        values.insert(0, reference)  # every comparison is paired against it
    fixed = {k: field_value(v) for k, v in (kv.split("=") for kv in a.fixed.split(";") if kv)}
    if a.threads:
        torch.set_num_threads(a.threads)
    settings = settings_of(a, a.protocol)
    record = {"command": shlex.join(["python", "benchmarks/tune_structprune.py", *(argv or sys.argv[1:])]),
              "settings": settings, "device": a.device, "rows": [], "decisions": []}
    if a.resume and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        if old["settings"] != settings:
            raise SystemExit(f"--resume: {out.with_suffix('.json')} was measured with other settings "
                             f"({old['settings']}); use another --out")
        record["rows"], record["dense"] = old["rows"], old["dense"]
        record["dense_domains"] = old.get("dense_domains", {})
        # A default the sweep reads changed since (e.g. the temperature): its rows measured another
        # config than the one their labels now name, and mixing them would mislabel the table.
        stale = [f"{r['sparsity']}@{r[name]}" for r in record["rows"] if "config" in r
                 and sweep_config(a, fixed, name, r["sparsity"], field_value(str(r[name]))).effective_dict() != effective_fields(r["config"])]
        if stale:
            raise SystemExit(f"--resume: rows {', '.join(stale)} of {out.with_suffix('.json')} were measured with "
                             "another resolved config (a default changed); use another --out")
    model, tok = load_model(a.model, dtype=getattr(torch, a.dtype))
    calib = get_calibration(tok, "c4", nsamples=a.nsamples, seqlen=a.seqlen, seed=0)
    domains = a.heldout_domains.split(",")
    if domains[0] != "c4":
        p.error("--heldout-domains must start with c4 (the reference domain of every table)")
    helds = {d: get_heldout_calibration(tok, d, nsamples=a.heldout, seqlen=a.seqlen, seed=1) for d in domains}
    held = helds["c4"]
    if "dense" not in record:
        record["dense"] = heldout_nlls(model, held, a.device)
    record.setdefault("dense_domains", {})
    for d in domains[1:]:
        if d not in record["dense_domains"]:
            record["dense_domains"][d] = heldout_nlls(model, helds[d], a.device, d)
    done = {(r["sparsity"], r[name]) for r in record["rows"]}
    cache: dict = {}  # sensitivities and dense paths are shared by every setting (same model, same windows)
    for s in [float(x) for x in a.sparsity.split(",")]:
        for v in values:
            if (s, _label(v)) in done:
                continue
            m = copy.deepcopy(model)
            cfg = sweep_config(a, fixed, name, s, v)
            t = time.perf_counter()
            r = prune(m, calib, cfg, device=a.device, progress=False, cache=cache)
            seconds = time.perf_counter() - t
            iters = [e for e in r.report["solver_log"] if "iteration" in e]
            record["rows"].append({"sparsity": s, name: _label(v), "config": cfg.effective_dict(),
                                   "heldout": heldout_nlls(m, held, a.device),
                                   "heldout_domains": {d: heldout_nlls(m, helds[d], a.device, d) for d in domains[1:]},
                                   "achieved": r.report["sparsity_achieved"],
                                   "objective": [e["objective"] for e in iters], "seconds": seconds,
                                   "phase_seconds": {k: v["seconds"] for k, v in r.report.get("timings", {}).items()
                                                     if isinstance(v, dict) and "seconds" in v},
                                   # ADMM's trace (item 1): residuals, rho and the iterate kept, per iteration
                                   "admm_trace": [{k: e.get(k) for k in ITERATION_FIELDS} for e in iters],
                                   # ADMM's fixed point on its last supports (None for one-shot)
                                   "fixed_point": next(({k: e[k] for k in ("supports_of", "objective", "seconds")}
                                                        for e in r.report["solver_log"] if e.get("fixed_point")), None),
                                   # the in-layer refits' per-layer logs (errors, adopted, seconds), per iteration
                                   "layer_refits": [{k: e[k] for k in ("inner", "values") if k in e} for e in iters],
                                   "chosen_iteration": next((e["chosen_iteration"] for e in r.report["solver_log"]
                                                             if "chosen_iteration" in e), None),
                                   "threads": torch.get_num_threads(),
                                   # float kernels differ between CPUs: the same config can round to
                                   # another discrete choice on another machine (experiment log)
                                   "hardware": machine(a.device),
                                   "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None})
            del m
            record["decisions"] = compare(record["rows"], name, reference, a.rule)
            write(record, out)
            row = record["rows"][-1]
            print(json.dumps({"sparsity": s, name: row[name], "heldout_ppl": row["heldout"]["ppl"],
                              "seconds": round(seconds)}), flush=True)
    record["decisions"] = compare(record["rows"], name, reference, a.rule)
    write(record, out)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
