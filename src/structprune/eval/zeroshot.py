"""Zero-shot accuracy with lm-evaluation-harness, run in-process on the model object.

Secondary protocol (docs/protocol.md): boolq, piqa, hellaswag, winogrande, arc_easy,
arc_challenge, openbookqa, zero-shot. lm-eval is an optional dependency
(``pip install 'structprune[eval]'``) and downloads its task data from the Hugging
Face hub, so either can be missing; each case is a :class:`StructPruneError` that
says which.
"""

from __future__ import annotations

import logging

from ..errors import StructPruneError

log = logging.getLogger(__name__)

PROTOCOL_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# The metric the pruning literature (Wanda, SparseGPT, LLM-Pruner) reports per task.
PRIMARY_METRIC = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc",
                  "arc_easy": "acc", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
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
                               "pip install 'structprune[eval]' (lm-eval>=0.4)") from exc
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


def zero_shot(model, tokenizer, tasks: list[str] | tuple[str, ...] = PROTOCOL_TASKS, *, batch_size: int = 1,
              limit: int | None = None, num_fewshot: int = 0) -> dict:
    """Run lm-eval ``tasks`` on ``model`` (already on its device) and return accuracies.

    Returns ``{"tasks": {task: {"acc": .., "acc_norm": .., "primary": metric}}, "lm_eval_version": ..}``.
    ``limit`` caps examples per task (a smoke test, not a protocol number).
    """
    lm_eval, HFLM = import_lm_eval()
    tasks = list(tasks)
    if not tasks:
        raise StructPruneError("no zero-shot tasks given")
    try:
        from lm_eval.tasks import TaskManager

        manager = TaskManager()
        unknown = [t for t in tasks if t not in manager.all_tasks]
    except ImportError:  # an lm-eval without TaskManager: let simple_evaluate judge the names
        manager, unknown = None, []
    if unknown:
        raise StructPruneError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    kwargs = {"task_manager": manager} if manager is not None else {}
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      log_samples=False, **kwargs)
    except Exception as exc:
        if _is_network_error(exc):
            raise StructPruneError(
                f"task data for {', '.join(tasks)} is unreachable: lm-eval downloads it from the Hugging Face "
                f"hub, which cannot be reached from here ({type(exc).__name__})") from exc
        raise
    results = {}
    for task in tasks:
        r = (out or {}).get("results", {}).get(task, {})
        acc = {m: r[f"{m},none"] for m in ("acc", "acc_norm") if f"{m},none" in r}
        results[task] = {**acc, "primary": PRIMARY_METRIC.get(task, "acc")}
    return {"tasks": results, "num_fewshot": num_fewshot, "limit": limit,
            "lm_eval_version": getattr(lm_eval, "__version__", "unknown")}


def format_zero_shot(res: dict) -> list[str]:
    lines = []
    for task, r in res["tasks"].items():
        val = r.get(r["primary"])
        lines.append(f"{task:<15} {r['primary']:<8} " + (f"{100 * val:.2f}" if val is not None else "n/a"))
    lines.append(f"(lm-eval {res['lm_eval_version']}, {res['num_fewshot']}-shot"
                 + (f", first {res['limit']} examples per task" if res["limit"] else "") + ")")
    return lines
