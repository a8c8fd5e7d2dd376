"""What a run may use of memory, what one resident layer needs of it, and the activation budget
that follows.

The limit is the tightest of ``--max-memory``, this process's cgroup (v1 ``memory.limit_in_bytes``
or v2 ``memory.max``, ancestors included: a container's cap) and the machine's physical memory.
Before any work the run estimates its fixed need: what the process holds now (interpreter,
libraries, the meta skeleton, the calibration) plus the largest of one decoder layer's working
set (its weights in the compute dtype, the float64 Grams of its module inputs, the widest module's
float64 solver workspace) and the LM head's (float32 weights and a bounded slice of logits with
their gradient), times :data:`WORKING_SET_FACTOR` for the temporaries and heap fragmentation the
sizes leave out. The activation budget is a share of what is left
(:data:`ACTIVATION_SHARE`); a limit that leaves less than :data:`MIN_ACTIVATIONS` is refused
before any work, with the estimate, instead of a kill hours later. The output writer holds no
tensor in memory (export/shards.py streams each tensor to disk), so no shard size enters the sum.

The factor is measured, not derived: on the 7B shape (8x512 calibration) the peak RSS was 1.4x the
sum of these sizes once the activations, the output shard and the empty process were taken out
(benchmarks/results/scale_cpu.md, the row before streaming shards); 1.5 leaves a margin.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import StructPruneError
from ..memory import cgroup_limit, current_rss, physical_memory

WORKING_SET_FACTOR = 1.5
ACTIVATION_SHARE = 0.5  # of what the limit leaves after the fixed need; the rest is headroom
MIN_ACTIVATIONS = 64 * 2**20  # below this a pass spills nearly every chunk: refuse instead
HEAD_SLICE_TEMPS = 3  # float32 logits of one slice, their softmax and gradient (engine/sensitivity.py)


def inner_refit_bytes(k: int, d: int) -> int:
    """Matrices of the MLP's input-projection refit (solvers/inner.py) alive at once, ``k`` kept
    channels, ``d`` hidden: the float64 Gram of its inputs, two float64 ``k x (d + 1)`` cross terms,
    the float32 ``k x k`` factor of the ``p``-step and its product."""
    return 8 * (d + 1) ** 2 + 2 * 8 * k * (d + 1) + 2 * 4 * k * k


#: What one batch of KV groups of the value refit (solvers/values.py) may hold at once: their float64
#: Grams and one chunk's ``P X`` of their heads. A layer whose groups do not fit is swept once per batch.
VALUE_BATCH_BYTES = 1 << 30


def value_group_bytes(per_group: int, d: int, chunk_tokens: int) -> int:
    """One KV group's share of a value-refit batch (solvers/values.py): its float64 ``(d + 1)^2`` Gram
    and that Gram's float32 product, and for one chunk of ``chunk_tokens`` its ``per_group`` heads'
    float32 ``[P_h X, 1]`` and the ``d``-wide values the attention function reads for them (eager
    repeats them per head)."""
    return 12 * (d + 1) ** 2 + 2 * 4 * per_group * chunk_tokens * (d + 1)


def value_batches(kv_heads: int, per_group: int, d: int, chunk_tokens: int,
                  batch_bytes: int | None = None) -> list[range]:
    """The KV groups of a layer in consecutive batches whose :func:`value_group_bytes` fit
    ``batch_bytes`` (default :data:`VALUE_BATCH_BYTES`; one group per batch at least)."""
    budget = VALUE_BATCH_BYTES if batch_bytes is None else batch_bytes
    per = max(1, min(kv_heads, budget // max(1, value_group_bytes(per_group, d, chunk_tokens))))
    return [range(g, min(g + per, kv_heads)) for g in range(0, kv_heads, per)]


def value_refit_bytes(kv_heads: int, per_group: int, head_dim: int, d: int, chunk_tokens: int,
                      batch_bytes: int | None = None) -> int:
    """Matrices of the attention's value refit (solvers/values.py) alive at once: the largest batch of
    groups (:func:`value_batches`), one Cholesky factor being formed, the value rows (current and new)
    and the batch's cross terms as float64 ``(d + 1)``-wide rows, the q-step's float32 ``k x k`` factor
    and its product and the output projection's float64 ``(k + 1)^2`` statistics (``k`` the kept
    attention width)."""
    groups = len(value_batches(kv_heads, per_group, d, chunk_tokens, batch_bytes)[0])
    k = kv_heads * per_group * head_dim
    rows = 8 * head_dim * (d + 1)
    return (groups * value_group_bytes(per_group, d, chunk_tokens) + 8 * (d + 1) ** 2
            + (2 * kv_heads + groups) * rows + 2 * 4 * k * k + 8 * (k + 1) ** 2)


def layer_sizes(adapter, widths: list[dict], dtype_size: int, method: str, inner: bool = False,
                values: bool = False, chunk_tokens: int = 0) -> dict:
    """Bytes of the largest layer's tensors by kind, from its shapes: ``layer_weights_bytes`` (in the
    compute dtype), ``statistics_bytes`` (float64 Grams of both modules' inputs: exact accumulators,
    engine/stats.py) and
    ``solver_workspace_bytes`` (a module solve's n x n float64 buffers: two, or 1.5 for StructPrune's
    float32 removal paths; solvers/obs.py; with ``inner``, StructPrune's refit of the MLP's input
    projections when it is larger: it runs after the path's buffers are freed; with ``values``, the
    refit of the attention's value rows on chunks of ``chunk_tokens``, likewise))."""
    solver_buffers = 1.5 if method == "structprune" else 2
    layer_bytes, gram_bytes, solver_bytes = 0, 0, 0
    for layer, w in zip(adapter.layers(), widths):
        a = adapter.attention_shape(layer)
        n_attn, n_mlp = w["heads"] * a.head_dim, w["mlp"]
        params = sum(p.numel() for p in layer.parameters())
        layer_bytes = max(layer_bytes, params * dtype_size)
        gram_bytes = max(gram_bytes, 8 * (n_attn ** 2 + n_mlp ** 2))
        solver_bytes = max(solver_bytes, int(solver_buffers * 8 * (max(n_attn, n_mlp) + 1) ** 2))
        if inner:
            solver_bytes = max(solver_bytes, inner_refit_bytes(n_mlp, a.hidden_size))
        if values:
            kv = w.get("kv_heads", a.num_kv_heads)
            solver_bytes = max(solver_bytes, value_refit_bytes(kv, max(1, w["heads"] // max(1, kv)), a.head_dim,
                                                               a.hidden_size, chunk_tokens))
    return {"layer_weights_bytes": layer_bytes, "statistics_bytes": gram_bytes, "solver_workspace_bytes": solver_bytes}


def head_bytes(adapter, calib_tokens: int, eval_tokens: int = 0) -> int:
    """The LM head's working set: in the sensitivity pass, float32 copies of the head modules and one
    slice of float32 logits (at most ``HEAD_SLICE_BYTES``, at most the calibration's ``calib_tokens``)
    with its softmax and gradient; in a streamed evaluation of windows of ``eval_tokens``, one
    window's float32 logits and the cross-entropy's temporaries."""
    from .sensitivity import HEAD_SLICE_BYTES

    params = sum(p.numel() for m in adapter.head_modules() for p in m.parameters())
    vocab = adapter.model.get_output_embeddings().weight.shape[0]
    sens = 4 * params + HEAD_SLICE_TEMPS * min(HEAD_SLICE_BYTES, 4 * vocab * calib_tokens)
    return max(sens, 4 * params + HEAD_SLICE_TEMPS * 4 * vocab * eval_tokens)


@dataclass(frozen=True)
class MemoryPlan:
    """The memory a run may use (``limit``, from ``limit_source``) and how it is spent."""

    limit: int | None
    limit_source: str
    baseline_bytes: int  # what the process held when the plan was made
    working_set_bytes: int  # the largest of one layer's and the head's, times the factor
    need_bytes: int  # baseline + working set + the smallest activation budget
    activation_budget: int | None  # chosen from the limit (None: the caller's own)
    sizes: dict

    def to_dict(self) -> dict:
        return {**asdict(self), "factor": WORKING_SET_FACTOR, "activation_share": ACTIVATION_SHARE}


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def memory_limit(max_memory: int | None = None) -> tuple[int | None, str]:
    """``(bytes, where it comes from)``: the tightest of ``max_memory``, the cgroup's limit and the
    physical memory (``(None, ...)`` where none can be read)."""
    options = []
    if max_memory is not None:
        options.append((max_memory, "--max-memory"))
    group = cgroup_limit()
    if group is not None:
        options.append(group)
    ram = physical_memory()
    if ram is not None:
        options.append((ram, "physical memory (MemTotal)"))
    if not options:
        return None, "unknown (no cgroup limit or /proc/meminfo readable)"
    return min(options, key=lambda o: o[0])


def plan_memory(adapter, widths: list[dict], dtype_size: int, method: str, calib_tokens: int,
                max_memory: int | None = None, budget_given: bool = False, eval_tokens: int = 0,
                inner: bool = False, values: bool = False, chunk_tokens: int = 0) -> MemoryPlan:
    """The run's :class:`MemoryPlan`; raises StructPruneError (one line, the estimate and the limit)
    when the limit cannot hold one layer's work. ``calib_tokens``: tokens of the calibration;
    ``eval_tokens``: the window length of a streamed evaluation (0: none). ``budget_given``: the
    caller set the activation budget itself (``--activation-budget``); it is then neither chosen
    nor counted here. ``inner``: StructPrune refits the MLPs' input projections (``inner_iterations``);
    ``values``: it refits the attentions' value rows (``value_iterations``) on chunks of ``chunk_tokens``."""
    limit, source = memory_limit(max_memory)
    sizes = layer_sizes(adapter, widths, dtype_size, method, inner, values, chunk_tokens)
    sizes["head_bytes"] = head_bytes(adapter, calib_tokens, eval_tokens)
    layer = sizes["layer_weights_bytes"] + sizes["statistics_bytes"] + sizes["solver_workspace_bytes"]
    working = int(WORKING_SET_FACTOR * max(layer, sizes["head_bytes"]))
    baseline = current_rss() or 0
    need = baseline + working + (0 if budget_given else MIN_ACTIVATIONS)
    if limit is not None and need > limit:
        raise StructPruneError(
            f"not enough memory for one layer: this run needs about {_gib(need)} (process now {_gib(baseline)}, "
            f"largest layer's work {_gib(working)}, activations at least {_gib(0 if budget_given else MIN_ACTIVATIONS)}) "
            f"but may use {_gib(limit)} ({source}); raise the limit, or compute in a narrower --dtype")
    budget = None
    if not budget_given and limit is not None:
        budget = max(MIN_ACTIVATIONS, int(ACTIVATION_SHARE * (limit - baseline - working)))
    return MemoryPlan(limit, source, baseline, working, need, budget, sizes)


def parse_memory(text: str | int | float | None) -> int | None:
    """Bytes of a ``--max-memory`` value such as ``6GiB``, ``1500M`` or a number of bytes (None: none)."""
    if text is None:
        return None
    from .activations import parse_size

    try:
        value = parse_size(text)
    except ValueError:
        raise StructPruneError(f"--max-memory {text!r} is not a size such as 6GiB, 1500M or 8G") from None
    if not math.isfinite(value) or value <= 0:
        raise StructPruneError(f"--max-memory must be a positive size such as 6GiB, got {text!r}")
    return int(value)
