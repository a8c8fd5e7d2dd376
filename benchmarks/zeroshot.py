"""Zero-shot accuracy of the dense and pruned models (issue 29): a table (Markdown + JSON).

Rows: the dense model, then each method at each sparsity, pruned in-process at the CPU protocol's
calibration (32x2048 C4, seed 0: the calibration of benchmarks/results/baselines_cpu_smollm2.md)
with the same helpers as benchmarks/baselines.py, then scored zero-shot by lm-eval
(structprune.eval.zeroshot) on the same seeded random sample of documents per task for every row.
Each row gets per task lm-eval's accuracy with its standard error and 95% interval, the mean over
tasks, and the paired difference to dense on the same documents (95% paired bootstrap over
documents; the mean's resamples documents within each task).

The JSON is rewritten (atomically) after every task of every row, so a kill loses at most one task
of one row; ``--resume`` keeps what is finished (same settings required) and re-prunes the row in
progress (pruning is deterministic), so one table can be filled across sessions:

    nohup nice -n 10 python benchmarks/zeroshot.py --threads 2 --resume --out benchmarks/results/zeroshot_cpu_smollm2 > zs.log 2>&1 &

``global`` uses the score (taylor/fisher) that baselines_cpu_smollm2.json chose on held-out text at
the same sparsity (``--global-score`` overrides), so its selection is not re-run here.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without install
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import DTYPES, build_config  # noqa: E402
from structprune import PruneConfig, load_model, prune  # noqa: E402
from structprune.bench import hardware_name  # noqa: E402
from structprune.data import get_calibration  # noqa: E402
from structprune.errors import StructPruneError  # noqa: E402
from structprune.eval.intervals import paired_difference, stratified_mean_difference  # noqa: E402
from structprune.eval.protocol import get_protocol  # noqa: E402
from structprune.eval.zeroshot import (CHANCE, MAJORITY, SHIPPED_TASKS, compare_zero_shot, task_mean,  # noqa: E402
                                       zero_shot)

log = logging.getLogger("zeroshot")

METHODS = "structprune,global,obs-local,flap,wanda-sp"
SPARSITIES = "0.3,0.5"
TITLES = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
          "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}
SETTING_KEYS = ("model", "dtype", "eval_dtype", "protocol", "seed", "batch_size", "mlp_multiple", "tasks", "limit",
                "doc_seed", "zero_shot_batch_size")


def global_scores(path: Path) -> dict[float, str]:
    """``{sparsity: score}`` that the perplexity table chose for ``global`` on held-out text."""
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {r["sparsity_target"]: r["global_selection"]["chosen"] for r in rows
            if r.get("method") == "global" and r.get("global_selection") and r["label"] == "global"}


def _machine() -> dict:
    return {"threads": torch.get_num_threads(), "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg")
            else None, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write(record: dict, out: Path) -> None:
    finished = [r for r in record["rows"] if r.get("complete")]
    dense = next((r for r in finished if r["label"] == "dense"), None)
    for r in finished:
        if dense is not None and r is not dense:
            r["vs_dense"] = compare_zero_shot(dense["zero_shot"], r["zero_shot"])
            for t in r["vs_dense"]["tasks"].values():  # the per-document lists are in each row already
                t.pop("documents", None)
                t.pop("correct", None)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out.with_suffix(".json"))
    out.with_suffix(".md").write_text(markdown(record))


def _pct(v, iv=None) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}" + (f" [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]" if iv else "")


def _diff(d) -> str:
    return "" if not d else f"{100 * d['value']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def markdown(record: dict) -> str:
    s = record["settings"]
    tasks = s["tasks"]
    cal = s["protocol"]["calibration"]
    rows = [r for r in record["rows"] if r.get("complete")]
    pending = [f"{r['label']} {r['sparsity_target']:.0%}" for r in record["rows"] if not r.get("complete")]
    lines = [f"# Zero-shot accuracy on {s['model']}: CPU protocol calibration, {s['limit']} documents per task", "",
             f"- lm-eval {record['versions'].get('lm_eval')}, 0-shot, its own task definitions (prompts, `acc`, "
             "`acc_norm`, standard errors) reading the task data shipped with StructPrune (`structprune.data.tasks`; "
             "SHA-256 per file in the JSON)",
             f"- documents: a seeded random sample of {s['limit']} per task (`random.Random(f\"{s['doc_seed']}/{{task}}\")`), "
             "the same documents for every row (indices in the JSON)",
             "- metric per task: acc_norm for HellaSwag and ARC-c, acc otherwise (as Wanda, SparseGPT, LLM-Pruner "
             "report); accuracy in % with its 95% normal interval from lm-eval's standard error; mean = the mean over "
             "tasks, its interval from the tasks' standard errors",
             "- Δ dense: the paired difference pruned - dense on the same documents, in points, with its 95% paired "
             "percentile bootstrap interval over documents (10,000 resamples; the mean's within each task)",
             f"- pruning: calibration C4 {cal['nsamples']}x{cal['seqlen']} seed {cal['seed']} (the CPU protocol, as in "
             "baselines_cpu_smollm2.md), float32; evaluated in "
             f"{s['eval_dtype']} (as the perplexity table, where bf16 / fp32 WikiText-2 perplexity is 1.0004 paired for "
             "dense; the accuracies here were not re-measured in float32), batch "
             f"{s['zero_shot_batch_size']}; `global` with the score the perplexity table chose on held-out text "
             "(its `global_selection`), not re-selected here",
             f"- {record['device_name']}, torch {record['versions']['torch']}, transformers "
             f"{record['versions']['transformers']}; threads and load per row in the JSON (the CPU is shared)"]
    lines += [f"- command: `{c}`" for c in record["commands"]]
    if pending or record.get("missing"):
        todo = list(dict.fromkeys(record.get("missing", []) + pending))  # in run order
        lines += ["", f"**Not finished yet:** {', '.join(todo)}. Complete the table with the last command above "
                  "(it has `--resume`: finished rows and tasks are kept)."]
    head = "| method | sparsity | " + " | ".join(TITLES.get(t, t) for t in tasks) + " | mean | Δ dense (mean) |"
    lines += ["", "## Accuracy", "", head, "|" + "---|" * (len(tasks) + 4)]
    for r in rows:
        z = r["zero_shot"]
        delta = _diff(r.get("vs_dense", {}).get("mean", {}).get("difference"))
        lines.append(f"| {r['label']} | {r['sparsity_target']:.0%} | "
                     + " | ".join(_pct(z["tasks"][t]["value"], z["tasks"][t]["interval"]) for t in tasks)
                     + f" | {_pct(z['mean']['value'], z['mean']['interval'])} | {delta} |")
    lines += ["", "## Paired differences to dense (points, same documents)", "",
              "| method | sparsity | " + " | ".join(TITLES.get(t, t) for t in tasks) + " | mean |",
              "|" + "---|" * (len(tasks) + 3)]
    for r in rows:
        if "vs_dense" in r:
            v = r["vs_dense"]
            lines.append(f"| {r['label']} | {r['sparsity_target']:.0%} | "
                         + " | ".join(_diff(v["tasks"][t]["difference"]) for t in tasks)
                         + f" | {_diff(v['mean']['difference'])} |")
    lines += informative_mean(rows, tasks)
    partial = [r for r in record["rows"] if not r.get("complete") and r.get("task_results")]
    dense_tasks = next((r["zero_shot"]["tasks"] for r in rows if r["label"] == "dense"), None)
    if partial and dense_tasks:
        lines += ["", "## Rows in progress (the tasks finished so far; not in the tables above)", "",
                  "Accuracy, then the paired difference to dense on the same documents (points).", "",
                  "| method | sparsity | " + " | ".join(TITLES.get(t, t) for t in tasks) + " |",
                  "|" + "---|" * (len(tasks) + 2)]
        for r in partial:
            cells = []
            for t in tasks:
                e = r["task_results"].get(t)
                if e is None:
                    cells.append("pending")
                    continue
                d = dense_tasks[t]
                m = e["primary"]
                diff = paired_difference(e["correct"][m], d["correct"][m]) if e["documents"] == d["documents"] else None
                cells.append(_pct(e["value"], e["interval"]) + ("; Δ " + _diff({"value": diff.value, "low": diff.low,
                                                                                  "high": diff.high}) if diff else ""))
            lines.append(f"| {r['label']} | {r['sparsity_target']:.0%} | " + " | ".join(cells) + " |")
    lines += ["", "## Rows", "", "| method | sparsity | achieved | parameters | prune s | zero-shot s | documents |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['sparsity_target']:.0%} | {r['sparsity_achieved']:.4f} | {r['params']:,} | "
                     f"{r['prune_seconds']:.0f} | {r['eval_seconds']:.0f} | {r['zero_shot']['mean']['n']} |")
    dense = next((r for r in rows if r["label"] == "dense"), None)
    if dense is not None:
        lines += ["", "## Cost", "",
                  f"The dense row's {dense['zero_shot']['mean']['n']:,} documents (500 per task: about 0.40 M tokens, "
                  "HellaSwag 39% of them, from the per-document token counts of ../shared/docs/zeroshot-data.md) took "
                  f"{dense['eval_seconds']:.0f} s on {dense['threads']} threads, one-minute load average "
                  f"{dense['loadavg_1min']:.1f} at its end (the 2-core CPU is shared). A pruned row adds its pruning "
                  "(5-30 min at 32x2048, baselines_cpu_smollm2.md) and evaluates faster the more is pruned (the "
                  "embeddings and LM head, 28 M parameters, stay)."]
        lines += ["", "## Chance", "",
                  "A task sits at chance when the dense model's 95% interval holds the chance accuracy (uniform over "
                  "the choices; BoolQ's majority class, yes, is 62.2%).", ""]
        for t in tasks:
            e = dense["zero_shot"]["tasks"][t]
            iv, ch = e["interval"], CHANCE.get(t)
            at = iv is not None and ch is not None and iv[0] <= ch <= iv[1]
            maj = MAJORITY.get(t)
            below_majority = maj is not None and iv is not None and iv[1] < maj
            lines.append(f"- {TITLES.get(t, t)}: dense {_pct(e['value'], iv)}, chance {100 * ch:.0f}%"
                         + (f", majority {100 * maj:.1f}%" if maj else "")
                         + (": **at chance**" if at else ": above chance" if iv and iv[0] > ch else ": below chance")
                         + ("; below the majority-class rate" if below_majority else ""))
            if t == "boolq":
                lines[-1] += f"; it answers yes on {100 * yes_rate(e):.1f}% of the documents (62.2% are yes)"
    return "\n".join(lines) + "\n"


def above_chance(dense_tasks: dict, tasks: list[str]) -> list[str]:
    """The tasks whose dense 95% interval lies above chance: the only ones where a pruned model can
    show a lost ability (at chance there is none to lose, below it the score moves with answer bias)."""
    return [t for t in tasks if dense_tasks[t]["interval"] is not None and CHANCE.get(t) is not None
            and dense_tasks[t]["interval"][0] > CHANCE[t]]


def informative_mean(rows: list[dict], tasks: list[str]) -> list[str]:
    """Markdown lines: per row the mean accuracy over the tasks above chance for the dense model and
    its paired difference to dense (documents resampled within each task), next to the mean over
    every task, which a task's answer bias can move (BoolQ's +25 points toward "yes")."""
    dense = next((r for r in rows if r["label"] == "dense"), None)
    if dense is None:
        return []
    keep = above_chance(dense["zero_shot"]["tasks"], tasks)
    if not keep:
        return []
    lines = ["", f"## Mean over the tasks above chance ({', '.join(TITLES.get(t, t) for t in keep)})", "",
             "The dense model is above chance on these (section Chance); the paired difference to dense resamples "
             "documents within each task; 'StructPrune − method' is StructPrune's row at the same sparsity "
             "against this one, paired the same way.", "",
             "| method | sparsity | mean | Δ dense | StructPrune − method |", "|---|---|---|---|---|"]

    def paired(a: dict, b: dict) -> str:
        za, zb = a["zero_shot"]["tasks"], b["zero_shot"]["tasks"]
        if not all(za[t]["documents"] == zb[t]["documents"] for t in keep):
            return ""
        d = stratified_mean_difference([(za[t]["correct"][za[t]["primary"]], zb[t]["correct"][za[t]["primary"]])
                                        for t in keep])
        return _diff({"value": d.value, "low": d.low, "high": d.high})

    for r in rows:
        z = r["zero_shot"]["tasks"]
        mean = sum(z[t]["value"] for t in keep) / len(keep)
        ours = next((o for o in rows if o["label"] == "structprune" and o["sparsity_target"] == r["sparsity_target"]),
                    None)
        vs_ours = paired(ours, r) if ours is not None and r is not ours and r is not dense else ""
        lines.append(f"| {r['label']} | {r['sparsity_target']:.0%} | {100 * mean:.1f} | "
                     f"{paired(r, dense) if r is not dense else ''} | {vs_ours} |")
    return lines


def yes_rate(entry: dict) -> float:
    """BoolQ: the share of documents the model answered yes, from its 0/1 scores and the gold labels
    (two choices: a wrong answer is the other one)."""
    from structprune.data.tasks import load_task_data

    rows = load_task_data("boolq").rows
    gold = [int(json.loads(rows[i])["label"]) for i in entry["documents"]]
    said_yes = [g if c else 1 - g for g, c in zip(gold, entry["correct"]["acc"])]
    return sum(said_yes) / len(said_yes)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default=METHODS, help="comma-separated method specs (benchmarks/baselines.py's form)")
    p.add_argument("--sparsities", default=SPARSITIES)
    p.add_argument("--tasks", default=",".join(SHIPPED_TASKS))
    p.add_argument("--limit", type=int, default=500, help="documents per task (a seeded random sample; 0: all)")
    p.add_argument("--doc-seed", type=int, default=0, help="seed of the document sample")
    p.add_argument("--zero-shot-batch-size", type=int, default=16)
    p.add_argument("--protocol", default="cpu", help="calibration sizes from docs/protocol.md")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="pruning dtype")
    p.add_argument("--eval-dtype", default="bfloat16", choices=sorted(DTYPES), help="zero-shot evaluation dtype")
    p.add_argument("--seed", type=int, default=0, help="calibration seed")
    p.add_argument("--batch-size", type=int, default=1, help="calibration windows per chunk")
    p.add_argument("--mlp-multiple", type=int, default=8)
    p.add_argument("--global-score", default=None, help="global's score (default: the perplexity table's choice)")
    p.add_argument("--baselines", type=Path, default=Path(__file__).parent / "results" / "baselines_cpu_smollm2.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/zeroshot_cpu_smollm2"))
    p.add_argument("--render", action="store_true", help="only rewrite the Markdown (and comparisons) from the JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="[%(name)s] %(message)s")
    torch.set_num_threads(a.threads)
    if a.render:
        out = a.out.with_suffix("") if a.out.suffix in (".json", ".md") else a.out
        write(json.loads(out.with_suffix(".json").read_text()), out)
        return 0
    try:
        return run(a, argv)
    except StructPruneError as e:
        print(f"zeroshot: error: {e}", file=sys.stderr)
        return 2


def run(a, argv) -> int:
    import lm_eval
    import transformers

    protocol = get_protocol(a.protocol)
    tasks = [t for t in a.tasks.split(",") if t]
    settings = {"model": a.model, "dtype": a.dtype, "eval_dtype": a.eval_dtype, "protocol": protocol.to_dict(),
                "seed": a.seed, "batch_size": a.batch_size, "mlp_multiple": a.mlp_multiple, "tasks": tasks,
                "limit": a.limit or None, "doc_seed": a.doc_seed, "zero_shot_batch_size": a.zero_shot_batch_size}
    chosen = global_scores(a.baselines)
    todo = [("dense", 0.0)] + [(m, float(s)) for s in a.sparsities.split(",") for m in a.methods.split(",") if m]
    for spec, s in todo[1:]:
        build_config(spec, s, settings)  # a bad spec fails before hours of work
    out = a.out.with_suffix("") if a.out.suffix in (".json", ".md") else a.out
    rows, commands = [], []
    if a.resume and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        diff = [k for k in SETTING_KEYS if old["settings"].get(k) != settings[k]]
        if diff:
            raise StructPruneError(f"--resume: {out}.json was measured with other settings ({', '.join(diff)})")
        rows, commands = old["rows"], old.get("commands", [])
    command = shlex.join(["python", "benchmarks/zeroshot.py", *(argv if argv is not None else sys.argv[1:])])
    record = {"settings": settings, "rows": rows, "device_name": hardware_name(a.device),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "lm_eval": getattr(lm_eval, "__version__", None), "python": platform.python_version()},
              "commands": commands + ([command] if command not in commands else []),
              "missing": [f"{spec} {s:.0%}" for spec, s in todo
                          if not any(r["label"] == spec and r["sparsity_target"] == s and r.get("complete")
                                     for r in rows)]}
    write(record, out)
    base, tok = load_model(a.model, dtype=DTYPES[a.dtype], device="cpu")
    cal = settings["protocol"]["calibration"]
    calib = None
    cache: dict = {}
    for spec, s in todo:
        row = next((r for r in rows if r["label"] == spec and r["sparsity_target"] == s), None)
        if row is not None and row.get("complete"):
            continue
        t0 = time.perf_counter()
        if spec == "dense":
            model, info = copy.deepcopy(base), {"sparsity_achieved": 0.0, "params": sum(p.numel() for p in
                                                                                      base.parameters()),
                                                 "prune_seconds": 0.0}
        else:
            if calib is None:
                calib = get_calibration(tok, "c4", nsamples=cal["nsamples"], seqlen=cal["seqlen"], seed=a.seed)
            config = build_config(spec, s, settings)
            if config.method == "global":
                score = a.global_score or chosen.get(s)
                if score:
                    config = PruneConfig.from_dict({**config.to_dict(), "global_score": score})
            model = copy.deepcopy(base)
            log.info("pruning %s at %.2f", spec, s)
            r = prune(model, calib, config, device=a.device, progress=not a.quiet, cache=cache).report
            info = {"sparsity_achieved": r["sparsity_achieved"], "params": r["params_after"],
                    "prune_seconds": time.perf_counter() - t0, "config": r["config"], "layers": r["layers"]}
        model.to(DTYPES[a.eval_dtype]).eval()
        if row is None:
            row = {"label": spec, "sparsity_target": s, "task_results": {}, "eval_seconds": 0.0}
            rows.append(row)
        row.update(info)
        for task in tasks:
            if task in row["task_results"]:
                continue
            t1 = time.perf_counter()
            log.info("%s at %.2f: %s", spec, s, task)
            res = zero_shot(model, tok, [task], limit=settings["limit"], seed=a.doc_seed,
                            batch_size=a.zero_shot_batch_size, quiet=a.quiet)
            row["task_results"][task] = res["tasks"][task]
            row["eval_seconds"] += time.perf_counter() - t1
            row.update(_machine())
            write(record, out)
            print(f"{spec} {s:.2f} {task}: {res['tasks'][task]['value']:.4f} ({time.perf_counter() - t1:.0f}s)",
                  flush=True)
        per_task = {t: row["task_results"][t] for t in tasks}
        row["zero_shot"] = {"tasks": per_task, "mean": task_mean(per_task), "limit": settings["limit"],
                            "seed": a.doc_seed, "lm_eval_version": record["versions"]["lm_eval"]}
        row["complete"] = True
        del row["task_results"]
        record["missing"] = [m for m in record["missing"] if m != f"{spec} {s:.0%}"]
        write(record, out)
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
