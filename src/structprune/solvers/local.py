"""Local structured pruning: score each layer's structures, keep the best, cut.

Each layer is scored on the pruned model's own activations (the inputs it will
really see) and cut before its outputs feed the next layer. Kept widths come from
the allocation: ``uniform`` needs nothing else (one pass); ``owl`` and ``threshold``
need something from every layer before the first cut, so a dense profiling pass
(:mod:`.profile`) runs first and fixes the widths; the pruning pass keeps them and
only re-chooses *which* structures on the pruned inputs.
"""

from __future__ import annotations

import logging

from ..adapters.base import LayerPlan
from ..allocation import LayerWidths, cost_normalised, outlier_ratio, owl_widths, threshold_widths, uniform_widths
from ..errors import StructPruneError
from ..scoring import SCORERS
from ..surgery import apply_layer_plan
from .modules import attention_path, cut_attention, cut_mlp, heads_of_path, mlp_path
from .parts import kept_after, path_block
from .passes import run_pass
from .profile import profile_layers
from .select import select_plan

log = logging.getLogger(__name__)

LOCAL_ALLOCATIONS = ("uniform", "owl", "threshold")


def layer_shapes(adapter):
    return [(adapter.attention_shape(l), adapter.mlp_shape(l)) for l in adapter.layers()]


def cost_normalised_scorer(scorer):
    """Threshold key of a local scorer: score per parameter, ``score_j / c_j``."""
    return lambda a, l, s: cost_normalised(scorer(a, l, s), a.attention_shape(l), a.mlp_shape(l))


def allocate_widths(run, threshold_key, threshold_name: str = "threshold") -> list:
    """Kept widths per layer for ``run.config.allocation`` (profiling the dense model if needed).

    ``threshold_key(adapter, layer, stats) -> {"attn": [H], "mlp": [n]}`` ranks structures
    for the global threshold (higher = keep).
    """
    cfg = run.config
    shapes = layer_shapes(run.adapter)
    if cfg.allocation not in LOCAL_ALLOCATIONS:
        raise StructPruneError(f"allocation {cfg.allocation!r} is not available for method {cfg.method}: "
                               f"choose one of {', '.join(LOCAL_ALLOCATIONS)}")
    if cfg.allocation != "uniform" and cfg.uniform_widths:
        raise StructPruneError(f"uniform_widths needs allocation 'uniform', not {cfg.allocation!r}")
    if cfg.allocation == "uniform":
        return uniform_widths(shapes, cfg.sparsity, cfg.mlp_multiple)
    if cfg.allocation == "owl":
        ratios = profile_layers(run, lambda a, l, s: outlier_ratio(a, l, s, cfg.owl_m), desc="owl profile")
        widths = owl_widths(shapes, ratios, cfg.sparsity, cfg.owl_lambda, cfg.mlp_multiple)
        run.log.append({"stage": "owl profile", "outlier_ratio": ratios})
    else:
        keys = profile_layers(run, threshold_key, desc=f"{threshold_name} profile")
        widths = threshold_widths(shapes, keys, cfg.sparsity, cfg.mlp_multiple)
    name = threshold_name if cfg.allocation == "threshold" else cfg.allocation
    log.info("%s widths: %s", name, " ".join(f"{w.heads}h/{w.kv_heads}kv/{w.channels}" for w in widths))
    run.log.append({"stage": "allocation", "allocation": name, "widths": [w.to_dict() for w in widths]})
    return widths


def prune_local(run) -> list[LayerPlan]:
    """Score with ``run.config.method``'s scorer, widths from the allocation, cut layer by layer."""
    cfg = run.config
    scorer = SCORERS[cfg.method]
    widths = [w.to_dict() for w in allocate_widths(run, cost_normalised_scorer(scorer))]
    results, _ = run_pass(run, cfg.method, local_step(run, scorer, widths), cuts=True)
    return [LayerPlan.from_dict(r) for r in results]


def local_step(run, scorer, widths: list[dict]):
    """Pass step of the local scorers: score the layer on its (pruned-trajectory) statistics, keep the
    best structures at the allocated ``widths`` (``LayerWidths.to_dict()`` per layer), cut.
    A data-free scorer gets no statistics (``ctx.inputs`` is None)."""
    def step(ctx, carry):
        stats = None if ctx.inputs is None else ctx.collect(gram=False)
        scores = scorer(run.adapter, ctx.layer, stats)
        plan = select_plan(run.adapter.attention_shape(ctx.layer), scores, LayerWidths.from_dict(widths[ctx.index]),
                           run.adapter.mlp_shape(ctx.layer))
        apply_layer_plan(run.adapter, ctx.layer, plan)
        return plan.to_dict(), carry
    return step


def refit_layer(run, ctx, plan: LayerPlan) -> None:
    """Cut ``ctx.layer`` to ``plan`` module by module, refitting each output projection by least
    squares on the pruned model's inputs; the MLP's statistics see the already-cut attention."""
    cfg, adapter, layer = run.config, run.adapter, ctx.layer
    cut_attention(adapter, layer, ctx.collect(modules=("attn",), gram=True)["attn"], plan.heads, plan.kv_heads, cfg)
    cut_mlp(adapter, layer, ctx.collect(modules=("mlp",), gram=True)["mlp"], plan.channels, cfg)


def prune_obs_local(run) -> list[LayerPlan]:
    """obs-local: greedy block-OBS per module (solvers/obs.py) at uniform widths, one pass.

    Sequential inside a layer: the attention is cut and refitted first, then the MLP's
    statistics are collected on the pruned attention's outputs. Paths run in float64 with 64
    steps per MLP part (one channel per step below 64 channels); the cut and refit are the ones
    StructPrune uses (solvers/modules.py).
    """
    cfg = run.config
    if cfg.allocation != "uniform":
        raise StructPruneError(f"obs-local supports allocation 'uniform' only, not {cfg.allocation!r}")
    widths = [w.to_dict() for w in uniform_widths(layer_shapes(run.adapter), cfg.sparsity, cfg.mlp_multiple)]
    results, _ = run_pass(run, "obs-local", obs_local_step(run, widths), cuts=True)
    return [LayerPlan.from_dict(r) for r in results]


def obs_local_step(run, widths: list[dict]):
    """Pass step of obs-local: each module's greedy path to its uniform width, then cut and refit."""
    cfg, adapter = run.config, run.adapter

    def step(ctx, carry):
        layer, w = ctx.layer, widths[ctx.index]
        st = ctx.collect(modules=("attn",), gram=True)["attn"]
        path = attention_path(adapter, layer, st, cfg, target=(w["kv_heads"], w["per_group"]))
        heads, groups = heads_of_path(path, len(path.steps))
        cut_attention(adapter, layer, st, heads, groups, cfg)
        st = ctx.collect(modules=("mlp",), gram=True)["mlp"]
        mshape = adapter.mlp_shape(layer)
        if w.get("parts") is None:
            floor, blocks = [w["channels"]], [max(1, mshape.channels // 64)]
        else:
            floor = list(w["parts"])
            blocks = [path_block(n, 64, mshape.part_multiple(i, cfg.mlp_multiple)) for i, n in enumerate(mshape.sizes)]
        path = mlp_path(adapter, layer, st, cfg, floor, blocks)
        channels = kept_after(path, len(path.steps), mshape.channels)
        cut_mlp(adapter, layer, st, channels, cfg)
        return {"heads": heads, "kv_heads": groups, "channels": channels}, carry
    return step
