"""Zero-shot accuracy with lm-evaluation-harness, run in-process on the model object, on local task data.

Secondary protocol (docs/protocol.md, "Zero-shot accuracy"): boolq, piqa, hellaswag, winogrande,
arc_easy, arc_challenge, openbookqa, zero-shot. The scores are lm-eval's: for each task a small YAML
``include``s lm-eval's own task definition (by absolute path, so its prompts, target delimiters,
``process_docs`` and metrics apply) and only points its data at a local JSON-lines file
(data/tasks.py: a user folder, the packaged copy); the local task replaces the built-in one of the
same name (``TaskManager(include_path=...)``). A task with no local file (OpenBookQA, unless the user
supplies it) is lm-eval's built-in one, which downloads from the hub.

Subsets are seeded random samples of documents (``limit``), not lm-eval's first N (HellaSwag's first
3,243 rows are all ActivityNet): the sampled rows are written to the task file lm-eval reads, and
their indices in the full file are recorded, so two models scored with the same seed and limit
answer the same documents and can be compared pair by pair (:func:`compare_zero_shot`).

lm-eval is an optional dependency (``pip install 'structprune[eval]'``, lm-eval >= 0.4.10: the first
that imports with transformers 5).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import random
import tempfile
from pathlib import Path

from ..data.tasks import OPENBOOKQA_ABSENT, TASK_FILES, TaskData, load_task_data
from ..errors import StructPruneError
from .intervals import LEVEL, paired_difference, stratified_mean_difference

log = logging.getLogger(__name__)

PROTOCOL_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
#: The six tasks whose data ships with the package (OpenBookQA has no licence we found).
SHIPPED_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge")
# The metric the pruning literature (Wanda, SparseGPT, LLM-Pruner) reports per task.
PRIMARY_METRIC = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc",
                  "arc_easy": "acc", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
# Accuracy of guessing: uniform over the choices (BoolQ's majority class, "yes", is 62.2%).
CHANCE = {"boolq": 0.5, "piqa": 0.5, "hellaswag": 0.25, "winogrande": 0.5, "arc_easy": 0.25,
          "arc_challenge": 0.25, "openbookqa": 0.25}
MAJORITY = {"boolq": 0.622}
# lm-eval's own definition of each task, relative to lm_eval/tasks (unchanged from 0.4.0 to 0.4.13).
BUILTIN_YAML = {"boolq": "super_glue/boolq/default.yaml", "piqa": "piqa/piqa.yaml",
                "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
                "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                "openbookqa": "openbookqa/openbookqa.yaml"}
CPU_LIMIT = 500  # documents per task on a CPU by default (docs/protocol.md); every document on a GPU
BATCH_SIZE = 16  # requests per forward (batch 16 measured ~1.7x faster than 1 on the 2-core CPU)
Z95 = 1.959963984540054
# Exception class names that mean "the task data could not be fetched".
_NETWORK_ERRORS = ("Connection", "Timeout", "Offline", "LocalEntryNotFound", "DatasetNotFound", "HfHub",
                   "HTTPError", "MaxRetry", "NameResolution")


def import_lm_eval():
    """``(lm_eval, HFLM)``, or a :class:`StructPruneError` saying how to install lm-evaluation-harness."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise StructPruneError("zero-shot evaluation needs lm-evaluation-harness, which is not installed: "
                               "pip install 'structprune[eval]' (lm-eval>=0.4.10)") from exc
    return lm_eval, HFLM


def _is_network_error(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)) or any(
                n in cls.__name__ for cls in type(exc).__mro__ for n in _NETWORK_ERRORS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def builtin_yaml(task: str) -> Path:
    """The path of lm-eval's own YAML for ``task`` in the installed lm-eval."""
    import lm_eval.tasks

    path = Path(os.path.dirname(lm_eval.tasks.__file__)) / BUILTIN_YAML[task]
    if not path.is_file():
        raise StructPruneError(f"this lm-eval ({_version()}) has no {BUILTIN_YAML[task]}; install lm-eval>=0.4.10")
    return path


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # noqa: BLE001 - a version string is informative only
        return "unknown"


def check_tasks(tasks) -> list[str]:
    """The task names, checked before anything slow: known to this module (the seven protocol tasks)
    or to the installed lm-eval; raises a one-line :class:`StructPruneError` otherwise."""
    tasks = list(dict.fromkeys(t.strip() for t in tasks if t.strip()))
    if not tasks:
        raise StructPruneError("no zero-shot tasks given")
    other = [t for t in tasks if t not in TASK_FILES]
    if other:
        import_lm_eval()
        from lm_eval.tasks import TaskManager

        unknown = [t for t in other if t not in TaskManager().all_tasks]
        if unknown:
            raise StructPruneError(f"unknown zero-shot task(s): {', '.join(unknown)}; use lm-eval task names, e.g. "
                                   f"{','.join(PROTOCOL_TASKS)}")
    return tasks


def select_documents(n: int, limit: int | None, seed: int, task: str) -> list[int]:
    """Indices (ascending) of the documents scored: all ``n``, or a random sample of ``limit`` drawn with
    ``random.Random(f"{seed}/{task}")`` (the same documents for every model, any Python >= 3.2)."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise StructPruneError(f"--zero-shot-limit must be at least 1 (0: every document), got {limit}")
    return sorted(random.Random(f"{seed}/{task}").sample(range(n), limit))


def _task_yaml(task: str, data_file: Path, split: str, cache_dir: Path) -> str:
    lines = [f"include: {builtin_yaml(task).as_posix()}", f"task: {task}", "dataset_path: json",
             "dataset_name: null", "dataset_kwargs:", "  data_files:", f"    {split}: {data_file.as_posix()}",
             f"  cache_dir: {cache_dir.as_posix()}", "training_split: null", "fewshot_split: null"]
    for name in ("validation", "test"):
        lines.append(f"{name}_split: {split if name == split else 'null'}")
    return "\n".join(lines) + "\n"


def write_local_tasks(folder: Path, data: dict[str, TaskData], documents: dict[str, list[int]]) -> None:
    """For each task in ``data``: its chosen documents as ``<task>.jsonl`` and the YAML that includes
    lm-eval's definition and reads that file, in ``folder`` (a ``TaskManager`` include path)."""
    for task, td in data.items():
        rows = td.rows
        path = folder / f"{task}.jsonl"
        path.write_text("".join(rows[i] + "\n" for i in documents[task]), encoding="utf-8")
        (folder / f"{task}.yaml").write_text(_task_yaml(task, path, td.split, folder / "hf-cache"), encoding="utf-8")


def _interval(value: float, stderr: float | None) -> list[float] | None:
    if stderr is None or not math.isfinite(stderr):
        return None
    return [max(0.0, value - Z95 * stderr), min(1.0, value + Z95 * stderr)]


def _number(x):
    return float(x) if isinstance(x, (int, float)) and math.isfinite(float(x)) else None


@contextlib.contextmanager
def _quiet_lm_eval(quiet: bool):
    if not quiet:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def zero_shot(model, tokenizer, tasks=PROTOCOL_TASKS, *, limit: int | None = None, seed: int = 0,
              batch_size: int = BATCH_SIZE, data_dir=None, num_fewshot: int = 0, quiet: bool = False) -> dict:
    """Run lm-eval ``tasks`` on ``model`` (already on its device) and return accuracies.

    ``limit``: score a seeded random sample of that many documents per task (``seed``; None: every
    document). Returns ``{"tasks": {task: {...}}, "mean": {...}, ...}``: per task lm-eval's ``acc`` and
    ``acc_norm`` with lm-eval's standard errors, the task's primary metric with a 95% normal interval
    (value +- 1.96 SE), the number of documents, where the data came from (its SHA-256), the indices
    of the documents scored in the full file and each one's 0/1 score (for paired comparisons); and
    the mean of the primary metrics over tasks with its standard error (tasks independent).
    """
    lm_eval, HFLM = import_lm_eval()
    from lm_eval.tasks import TaskManager

    tasks = check_tasks(tasks)
    if num_fewshot:
        raise StructPruneError("zero-shot evaluation is 0-shot: the local task files hold only the evaluated split")
    local: dict[str, TaskData] = {}
    hub: list[str] = []
    for task in tasks:
        td = load_task_data(task, data_dir)
        if td is None:
            hub.append(task)
        else:
            local[task] = td
    documents = {t: select_documents(len(td.rows), limit, seed, t) for t, td in local.items()}
    kwargs = {}
    if hub and limit is not None:
        if "samples" not in inspect.signature(lm_eval.simple_evaluate).parameters:
            raise StructPruneError(f"--zero-shot-limit on a task read from the hub ({', '.join(hub)}) needs "
                                   "lm-eval>=0.4.9 (its 'samples' argument); supply the task file or drop the limit")
        kwargs["samples"] = None  # filled below, once lm-eval knows the hub tasks' sizes
    with tempfile.TemporaryDirectory(prefix="structprune-zeroshot-") as tmp:
        folder = Path(tmp)
        write_local_tasks(folder, local, documents)
        manager = TaskManager(include_path=str(folder)) if local else TaskManager()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            if hub and limit is not None:
                sizes = _hub_sizes(hub, manager)
                documents.update({t: select_documents(sizes[t], limit, seed, t) for t in hub})
                kwargs["samples"] = {t: documents[t] for t in hub}
            with _quiet_lm_eval(quiet):
                out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, log_samples=True,
                                              task_manager=manager, **kwargs)
        except Exception as exc:
            if _is_network_error(exc):
                if "openbookqa" in hub:
                    raise StructPruneError(OPENBOOKQA_ABSENT + f" ({type(exc).__name__})") from exc
                raise StructPruneError(
                    f"task data for {', '.join(hub) or ', '.join(tasks)} is unreachable: no local file and lm-eval "
                    f"downloads it from the Hugging Face hub, which cannot be reached from here "
                    f"({type(exc).__name__}); pass --zero-shot-data DIR") from exc
            raise
    results = {}
    for task in tasks:
        r = (out or {}).get("results", {}).get(task, {})
        samples = sorted((out or {}).get("samples", {}).get(task, []), key=lambda s: s["doc_id"])
        primary = PRIMARY_METRIC.get(task, "acc" if "acc,none" in r and "acc_norm,none" not in r else "acc_norm")
        if f"{primary},none" not in r:
            primary = "acc"
        if "acc,none" not in r:
            raise StructPruneError(f"lm-eval task {task} reports no accuracy (acc/acc_norm); StructPrune's zero-shot "
                                   "evaluation reports multiple-choice accuracy")
        entry = {"primary": primary}
        for m in ("acc", "acc_norm"):
            if f"{m},none" in r:
                entry[m] = _number(r[f"{m},none"])
                entry[f"{m}_stderr"] = _number(r.get(f"{m}_stderr,none"))
        entry["value"], entry["stderr"] = entry[primary], entry[f"{primary}_stderr"]
        entry["interval"] = _interval(entry["value"], entry["stderr"])
        entry["n"] = len(samples)
        if task in local:
            entry["data"] = {**local[task].describe()}
            ids = [documents[task][s["doc_id"]] for s in samples]
        else:
            entry["data"] = {"source": "hub (lm-eval's built-in task)"}
            ids = [documents[task][s["doc_id"]] if task in documents else s["doc_id"] for s in samples]
        entry["data"]["selection"] = (f"seeded random sample of {limit} (seed {seed})"
                                      if limit is not None and len(samples) < entry["data"].get("documents", 1 << 62)
                                      else "every document")
        entry["chance"] = CHANCE.get(task)
        entry["documents"] = ids
        entry["correct"] = {m: [int(round(float(s[m]))) for s in samples] for m in ("acc", "acc_norm")
                            if samples and m in samples[0]}
        results[task] = entry
    return {"tasks": results, "mean": task_mean(results), "limit": limit, "seed": seed, "num_fewshot": 0,
            "batch_size": batch_size, "lm_eval_version": getattr(lm_eval, "__version__", None) or _version(),
            "interval": f"{int(LEVEL * 100)}% normal interval from lm-eval's standard error"}


def _hub_sizes(hub: list[str], manager) -> dict[str, int]:
    from lm_eval.tasks import get_task_dict

    sizes = {}
    for name, task in get_task_dict(hub, manager).items():
        docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
        sizes[getattr(name, "group_name", name)] = len(docs)
    return sizes


def task_mean(results: dict) -> dict:
    """Mean of the tasks' primary metrics; its standard error from the tasks' (independent samples)."""
    vals = [r["value"] for r in results.values() if r.get("value") is not None]
    ses = [r["stderr"] for r in results.values() if r.get("stderr") is not None]
    if not vals:
        return {"value": None, "stderr": None, "interval": None, "tasks": 0, "n": 0}
    value = sum(vals) / len(vals)
    se = math.sqrt(sum(s * s for s in ses)) / len(vals) if len(ses) == len(vals) else None
    return {"value": value, "stderr": se, "interval": _interval(value, se), "tasks": len(vals),
            "n": sum(r["n"] for r in results.values())}


def compare_zero_shot(dense: dict, pruned: dict) -> dict:
    """``report.json``'s zero-shot entry for two :func:`zero_shot` results on the same documents: per
    task both accuracies with their intervals and the paired difference pruned - dense (primary metric)
    with its 95% paired bootstrap interval over documents (eval/intervals.py); the same for the mean
    over tasks (documents resampled within each task). Refuses results on different documents."""
    tasks, rows, pairs = {}, [], []
    for task, p in pruned["tasks"].items():
        d = dense["tasks"].get(task)
        if d is None or d["documents"] != p["documents"]:
            raise StructPruneError(f"zero-shot {task}: the dense and pruned models were scored on different documents")
        m = p["primary"]
        a, b = p["correct"].get(m), d["correct"].get(m)
        diff = None
        if a and b:
            r = paired_difference(a, b)
            diff = {"value": r.value, "low": r.low, "high": r.high, "level": r.level}
            pairs.append((a, b))
        tasks[task] = {"metric": m, "n": p["n"], "dense": d["value"], "dense_interval": d["interval"],
                       "pruned": p["value"], "pruned_interval": p["interval"], "dense_stderr": d["stderr"],
                       "pruned_stderr": p["stderr"], "difference": diff, "chance": p.get("chance"),
                       "data": p["data"], "documents": p["documents"],
                       "correct": {"dense": b, "pruned": a}}
        rows.append(task)
    mean = None
    if pairs and len(pairs) == len(rows):
        r = stratified_mean_difference(pairs)
        mean = {"value": r.value, "low": r.low, "high": r.high, "level": r.level}
    return {"tasks": tasks, "mean": {"dense": dense["mean"]["value"], "dense_interval": dense["mean"]["interval"],
                                     "pruned": pruned["mean"]["value"], "pruned_interval": pruned["mean"]["interval"],
                                     "n": pruned["mean"]["n"], "difference": mean},
            "limit": pruned["limit"], "seed": pruned["seed"], "lm_eval_version": pruned["lm_eval_version"],
            "intervals": "accuracies: 95% normal interval from lm-eval's standard error; differences: 95% paired "
                         "percentile bootstrap over documents (the mean: documents resampled within each task)"}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _span(iv) -> str:
    return f" [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]" if iv else ""


def format_zero_shot(res: dict) -> list[str]:
    lines = []
    for task, r in res["tasks"].items():
        se = f" +- {100 * r['stderr']:.2f}" if r.get("stderr") is not None else ""
        lines.append(f"{task:<15} {r['primary']:<8} {_pct(r['value'])}{se}{_span(r['interval'])} ({r['n']} documents, "
                     f"{r['data']['source'].split(' ')[0]})")
    m = res["mean"]
    lines.append(f"{'mean':<15} {'':<8} {_pct(m['value'])}{_span(m['interval'])} ({m['tasks']} tasks, {m['n']} documents)")
    lines.append(f"(lm-eval {res['lm_eval_version']}, 0-shot, "
                 + (f"a seeded random sample of {res['limit']} documents per task, seed {res['seed']}"
                    if res["limit"] else "every document") + "; intervals 95% from lm-eval's standard error)")
    return lines


def format_comparison(zs: dict) -> list[str]:
    """The summary's zero-shot lines for :func:`compare_zero_shot`'s entry."""
    lines = []
    for task, r in [*zs["tasks"].items(), ("mean", zs["mean"])]:
        d = r.get("difference")
        diff = f"; difference {100 * d['value']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] pts" if d else ""
        what = f"{r['metric']}, {r['n']} documents" if task != "mean" else f"{r['n']} documents"
        lines.append(f"0-shot {task:<13} dense {_pct(r['dense'])}{_span(r['dense_interval'])} -> pruned "
                     f"{_pct(r['pruned'])}{_span(r['pruned_interval'])} ({what}){diff}")
    return lines
