"""FLAP (An et al., AAAI 2024): fluctuation scores, AL-AM global threshold, bias compensation.

FLAP computes everything on the dense model's activations in one pass. Here the
widths come from a dense profiling pass (fluctuation per channel, standardised per
module of each layer, one global threshold meeting the parameter budget with each
structure's real cost), and a second streaming pass prunes: each layer's fluctuation
is recomputed on the *pruned* model's inputs to choose which structures go (widths
kept), and the removed structures' mean contribution ``W[:, removed] @ mean(z[removed])``
is added to the output projection's bias (one is created if the model had none).
Both modules of a layer are scored from one collection, on the layer's dense
attention, as FLAP does; so the compensation also sees the pruned model's inputs.

FLAP's own allocation is the default (``--allocation threshold``, what ``auto`` means
for flap): one threshold on the standardised keys, each structure counted at its real
parameter cost (FLAP's code counts a head as 512/3 channels, LLaMA-7B's ratio). ``uniform``
gives FLAP's UL-UM variant and ``owl`` OWL's profile, with the same scores and compensation.
"""

from __future__ import annotations

import logging

import torch

from ..adapters.base import LayerPlan
from ..scoring import flap_keys, fluctuation
from ..surgery import apply_layer_plan, head_rows, set_output_projection
from .local import allocate_widths
from .select import select_plan

log = logging.getLogger(__name__)


@torch.no_grad()
def mean_compensation(linear, mean: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``W[:, removed] @ mean[removed]``: what the removed inputs added on average ([d], float32)."""
    removed = torch.ones(linear.in_features, dtype=torch.bool, device=linear.weight.device)
    removed[keep.to(removed.device)] = False
    w = linear.weight.float()[:, removed]
    return w @ mean.to(w.device)[removed]


@torch.no_grad()
def cut_with_bias_compensation(adapter, layer, plan: LayerPlan, stats) -> None:
    """Apply ``plan`` and fold the removed structures' mean output into each output projection's bias."""
    shape = adapter.attention_shape(layer)
    _, o = adapter.attn_linears(layer)
    _, out = adapter.mlp_linears(layer)
    comp_o = mean_compensation(o, stats["attn"].mean, head_rows(plan.heads, shape.head_dim))
    comp_out = mean_compensation(out, stats["mlp"].mean, torch.as_tensor(plan.channels, dtype=torch.long))
    apply_layer_plan(adapter, layer, plan)
    for lin, comp in ((o, comp_o), (out, comp_out)):
        bias = comp if lin.bias is None else lin.bias.float() + comp.to(lin.bias.device)
        set_output_projection(lin, lin.weight, bias)


def prune_flap(run) -> list[LayerPlan]:
    """FLAP: widths from the allocation (default: the AL-AM threshold), fluctuation picks, bias compensation."""
    widths = allocate_widths(run, flap_keys, threshold_name="flap-al-am")
    plans = []
    for ctx in run.stream(desc="flap", cuts=True):
        stats = ctx.collect(gram=False)
        scores = fluctuation(run.adapter, ctx.layer, stats)
        plan = select_plan(run.adapter.attention_shape(ctx.layer), scores, widths[ctx.index])
        cut_with_bias_compensation(run.adapter, ctx.layer, plan, stats)
        plans.append(plan)
    return plans
