"""Local structured pruning: score each layer's structures, keep the best, cut.

One streaming pass. Each layer is scored on the pruned model's own activations
(the inputs it will really see), its kept widths come from the allocation, and
it is cut before its outputs feed the next layer.
"""

from __future__ import annotations

import logging

from ..adapters.base import LayerPlan
from ..allocation import uniform_widths
from ..engine import LayerStream
from ..errors import StructPruneError
from ..scoring import SCORERS
from ..surgery import apply_layer_plan
from .select import select_plan

log = logging.getLogger(__name__)


def layer_shapes(adapter):
    return [(adapter.attention_shape(l), adapter.mlp_shape(l)) for l in adapter.layers()]


def prune_local(run) -> list[LayerPlan]:
    """Score with ``run.config.method``'s scorer, uniform widths, one pass."""
    cfg = run.config
    if cfg.allocation != "uniform":
        raise StructPruneError(f"method {cfg.method} supports allocation 'uniform' only in this version")
    scorer = SCORERS[cfg.method]
    widths = uniform_widths(layer_shapes(run.adapter), cfg.sparsity, cfg.mlp_multiple)
    plans = []
    for ctx in run.stream(desc=f"{cfg.method}"):
        stats = ctx.collect(gram=False)
        scores = scorer(run.adapter, ctx.layer, stats)
        plan = select_plan(run.adapter.attention_shape(ctx.layer), scores, widths[ctx.index])
        apply_layer_plan(run.adapter, ctx.layer, plan)
        plans.append(plan)
    return plans
