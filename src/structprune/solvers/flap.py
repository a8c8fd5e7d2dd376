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
from ..adapters.parts import split_channels
from ..allocation import LayerWidths
from ..scoring import flap_keys, fluctuation
from ..surgery import apply_layer_plan, head_rows, set_output_projection
from .local import allocate_widths
from .passes import run_pass
from .select import select_plan

log = logging.getLogger(__name__)


@torch.no_grad()
def mean_compensation(linear, mean: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``W[:, removed] @ mean[removed]``: what the removed inputs added on average ([d], float32).

    ``linear``: an ``nn.Linear`` or its ``[d, n]`` weight (an MLP part's output projection)."""
    weight = linear if isinstance(linear, torch.Tensor) else linear.weight
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed[keep.to(removed.device)] = False
    w = weight.float()[:, removed]
    return w @ mean.to(w.device, w.dtype)[removed]  # statistics are float64 accumulators


@torch.no_grad()
def cut_with_bias_compensation(adapter, layer, plan: LayerPlan, stats) -> None:
    """Apply ``plan`` and fold the removed structures' mean output into each output projection's bias."""
    shape = adapter.attention_shape(layer)
    _, o = adapter.attn_linears(layer)
    comp_o = mean_compensation(o, stats["attn"].mean, head_rows(plan.heads, shape.head_dim))
    parts = adapter.mlp_parts(layer)
    sizes = [p.size for p in parts]
    means = stats["mlp"].mean.split(sizes)
    # Parts whose output cannot hold a bias (experts, Qwen2-MoE's gated shared expert) go uncompensated.
    comps = [mean_compensation(p.out_weight(), m, keep) if p.bias_ok else None
             for p, m, keep in zip(parts, means, split_channels(plan.channels, sizes))]
    apply_layer_plan(adapter, layer, plan)
    bias = comp_o if o.bias is None else o.bias.float() + comp_o.to(o.bias.device)
    set_output_projection(o, o.weight, bias)
    for part, comp in zip(adapter.mlp_parts(layer), comps):
        if comp is not None:
            b = part.out_bias()
            part.set_output(part.out_weight(), comp if b is None else b.float() + comp.to(b.device))


def prune_flap(run) -> list[LayerPlan]:
    """FLAP: widths from the allocation (default: the AL-AM threshold), fluctuation picks, bias compensation."""
    widths = [w.to_dict() for w in allocate_widths(run, flap_keys, threshold_name="flap-al-am")]
    results, _ = run_pass(run, "flap", flap_step(run, widths), cuts=True)
    return [LayerPlan.from_dict(r) for r in results]


def flap_step(run, widths: list[dict]):
    """Pass step of FLAP: fluctuation scores on the pruned trajectory, the allocated widths, compensation."""
    def step(ctx, carry):
        stats = ctx.collect(gram=False)
        scores = fluctuation(run.adapter, ctx.layer, stats)
        plan = select_plan(run.adapter.attention_shape(ctx.layer), scores, LayerWidths.from_dict(widths[ctx.index]),
                           run.adapter.mlp_shape(ctx.layer))
        cut_with_bias_compensation(run.adapter, ctx.layer, plan, stats)
        return plan.to_dict(), carry
    return step
