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

import torch

from ..adapters.base import LayerPlan
from ..adapters.parts import split_channels
from ..allocation import cost_normalised, outlier_ratio, owl_widths, threshold_widths, uniform_widths
from ..errors import StructPruneError
from ..scoring import SCORERS
from ..surgery import apply_layer_plan, head_rows, set_output_projection
from .obs import obs_prune_attention, obs_prune_mlp, refit
from .parts import kept_after, part_block, parts_path, problems, refit_parts, set_part_outputs
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
    widths = allocate_widths(run, cost_normalised_scorer(scorer))
    plans = []
    if run.calib is None:  # a data-free scorer: borrow the layers, no activations
        passes = ((i, layer, None) for i, layer in run.layers(desc=cfg.method, cuts=True))
    else:
        passes = ((ctx.index, ctx.layer, ctx.collect(gram=False)) for ctx in run.stream(cfg.method, cuts=True))
    for i, layer, stats in passes:
        scores = scorer(run.adapter, layer, stats)
        plan = select_plan(run.adapter.attention_shape(layer), scores, widths[i], run.adapter.mlp_shape(layer))
        apply_layer_plan(run.adapter, layer, plan)
        plans.append(plan)
    return plans


def _detached(t):
    return None if t is None else t.detach()


# -- cut one module at a time, with a least-squares refit of its output projection ------------

def cut_attention(adapter, layer, heads, kv_heads, weight, bias) -> None:
    """Keep ``heads``/``kv_heads`` (MLP untouched) and set the refitted output projection."""
    n = adapter.mlp_shape(layer).channels
    apply_layer_plan(adapter, layer, LayerPlan(list(heads), list(kv_heads), list(range(n))))
    set_output_projection(adapter.attn_linears(layer)[1], weight, bias)


def cut_mlp(adapter, layer, channels, weight, bias) -> None:
    """Keep MLP ``channels`` of a single-part MLP (attention untouched) and set the refitted output projection."""
    cut_mlp_parts(adapter, layer, channels, [(weight, bias)])


def cut_mlp_parts(adapter, layer, channels, fits) -> None:
    """Keep MLP ``channels`` (layer indices, every part) and set each part's refitted ``(W, bias)``."""
    a = adapter.attention_shape(layer)
    apply_layer_plan(adapter, layer, LayerPlan(list(range(a.num_heads)), list(range(a.num_kv_heads)), list(channels)))
    set_part_outputs(adapter, layer, fits)


def refit_layer(run, ctx, plan: LayerPlan) -> None:
    """Cut ``ctx.layer`` to ``plan`` module by module, refitting each output projection by least
    squares on the pruned model's inputs; the MLP's statistics see the already-cut attention."""
    cfg, adapter, layer = run.config, run.adapter, ctx.layer
    st = ctx.collect(modules=("attn",), gram=True)["attn"]
    o = adapter.attn_linears(layer)[1]
    keep = head_rows(sorted(plan.heads), adapter.attention_shape(layer).head_dim)
    w, b = refit(st.gram, st.zsum, st.count, keep, W=o.weight.detach(), bias=_detached(o.bias),
                 fit_bias=cfg.refit_bias, damp=cfg.damp)
    cut_attention(adapter, layer, sorted(plan.heads), sorted(plan.kv_heads), w, b)
    st = ctx.collect(modules=("mlp",), gram=True)["mlp"]
    channels = sorted(plan.channels)
    fits = refit_parts(adapter.mlp_parts(layer), st, channels, cfg.refit_bias, cfg.damp)  # one fit per part
    cut_mlp_parts(adapter, layer, channels, fits)


def obs_prune_parts(adapter, layer, stats, widths, cfg):
    """Greedy OBS over an MLP's parts (experts) down to ``widths`` per part; returns
    ``(kept layer channels, [(W_K, bias)] per part)`` with the OBS-updated weights."""
    mshape = adapter.mlp_shape(layer)
    parts = adapter.mlp_parts(layer)
    probs = problems(parts, stats, cfg.refit_bias, cfg.damp)
    blocks = [part_block(n, 64, mshape.part_multiple(i, cfg.mlp_multiple)) for i, n in enumerate(mshape.sizes)]
    path = parts_path(probs, mshape, list(widths), blocks)
    channels = kept_after(path, len(path.steps), mshape.channels)
    fits = []
    for prob, keep in zip(probs, split_channels(channels, mshape.sizes)):
        Wn, b = prob.weights()
        fits.append((Wn[:, keep.to(Wn.device)], b))
    return channels, fits


def prune_obs_local(run) -> list[LayerPlan]:
    """obs-local: greedy block-OBS per module (solvers/obs.py) at uniform widths, one pass.

    Sequential inside a layer: the attention is cut and refitted first, then the MLP's
    statistics are collected on the pruned attention's outputs.
    """
    cfg = run.config
    if cfg.allocation != "uniform":
        raise StructPruneError(f"obs-local supports allocation 'uniform' only, not {cfg.allocation!r}")
    widths = uniform_widths(layer_shapes(run.adapter), cfg.sparsity, cfg.mlp_multiple)
    adapter, plans = run.adapter, []
    for ctx in run.stream(desc="obs-local", cuts=True):
        layer, w = ctx.layer, widths[ctx.index]
        st = ctx.collect(modules=("attn",), gram=True)["attn"]
        o = adapter.attn_linears(layer)[1]
        heads, groups, wk, b = obs_prune_attention(o.weight.detach(), st.gram, st.zsum, st.count,
                                                   adapter.attention_shape(layer), w.kv_heads, w.per_group,
                                                   bias=_detached(o.bias), fit_bias=cfg.refit_bias, damp=cfg.damp)
        cut_attention(adapter, layer, heads, groups, wk, b)
        st = ctx.collect(modules=("mlp",), gram=True)["mlp"]
        if w.parts is None:
            out = adapter.mlp_parts(layer)[0]
            channels, wk, b = obs_prune_mlp(out.out_weight().detach(), st.gram, st.zsum, st.count, w.channels,
                                            bias=_detached(out.out_bias()), fit_bias=cfg.refit_bias and out.bias_ok,
                                            damp=cfg.damp)
            cut_mlp(adapter, layer, channels, wk, b)
        else:
            channels, fits = obs_prune_parts(adapter, layer, st, w.parts, cfg)
            cut_mlp_parts(adapter, layer, channels, fits)
        plans.append(LayerPlan(list(heads), list(groups), list(channels)))
    return plans
