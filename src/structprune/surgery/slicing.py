"""Cut heads and channels out of a decoder layer, in place.

``slice_linear`` keeps given rows (outputs, ``dim=0``) or columns (inputs, ``dim=1``)
of an ``nn.Linear``. ``apply_layer_plan`` cuts every projection of a layer to a
:class:`~structprune.adapters.LayerPlan` and updates the attention bookkeeping.
``mask_layer_plan`` is the reference used by tests: it zeroes the removed structures'
output-projection columns instead of removing them, which must give the same logits.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..adapters.base import Adapter, LayerPlan
from ..adapters.parts import slice_linear, split_channels

__all__ = ["apply_layer_plan", "head_rows", "mask_layer_plan", "set_output_projection", "slice_linear",
           "validate_plan"]


def head_rows(heads: Sequence[int], head_dim: int, device=None) -> torch.Tensor:
    """Row indices of the given heads in a ``[num_heads * head_dim, ...]`` projection (columns of
    the output projection), on ``device``."""
    h = torch.as_tensor(list(heads), dtype=torch.long, device=device)
    return (h[:, None] * head_dim + torch.arange(head_dim, device=device)[None, :]).reshape(-1)


def validate_plan(adapter: Adapter, layer: nn.Module, plan: LayerPlan) -> None:
    """Raise ``ValueError`` if ``plan`` is not a legal cut of ``layer``."""
    shape = adapter.attention_shape(layer)
    g = shape.group_size
    heads, kv = sorted(plan.heads), sorted(plan.kv_heads)
    if not heads or not kv:
        raise ValueError("a layer must keep at least one head and one KV group")
    if len(set(heads)) != len(heads) or not all(0 <= h < shape.num_heads for h in heads):
        raise ValueError(f"bad head indices {heads}")
    per_group = {k: 0 for k in kv}
    for h in heads:
        if h // g not in per_group:
            raise ValueError(f"head {h} kept but its KV group {h // g} is removed")
        per_group[h // g] += 1
    if len(set(per_group.values())) != 1:
        raise ValueError(f"kept KV groups must keep the same number of heads, got {per_group}")
    m = adapter.mlp_shape(layer)
    n = m.channels
    if not plan.channels or len(set(plan.channels)) != len(plan.channels) or not all(0 <= c < n for c in plan.channels):
        raise ValueError("MLP channel indices must be distinct, within range, and at least one")
    kept = [len(k) for k in split_channels(plan.channels, m.sizes)]
    if min(kept) < 1:
        raise ValueError(f"every MLP part (expert) must keep at least one channel, got {kept}")
    if m.tied > 1 and len(set(kept[:m.tied])) != 1:
        raise ValueError(f"the experts of a layer must keep the same number of channels, got {kept[:m.tied]}")


@torch.no_grad()
def apply_layer_plan(adapter: Adapter, layer: nn.Module, plan: LayerPlan) -> None:
    """Physically remove every head, KV group and MLP channel not kept by ``plan``."""
    validate_plan(adapter, layer, plan)
    shape = adapter.attention_shape(layer)
    heads, kv = sorted(plan.heads), sorted(plan.kv_heads)
    _, o = adapter.attn_linears(layer)
    q_rows = head_rows(heads, shape.head_dim)
    kv_rows = head_rows(kv, shape.head_dim)
    # Fused projections (Phi-3's qkv_proj) get the rows of every segment at once.
    for lin, rows in adapter.attn_input_rows(layer, q_rows, kv_rows):
        slice_linear(lin, rows, 0)
    slice_linear(o, q_rows, 1)
    adapter.set_attention_heads(layer, len(heads), len(kv))

    adapter.cut_mlp(layer, split_channels(plan.channels, adapter.mlp_shape(layer).sizes))


@torch.no_grad()
def mask_layer_plan(adapter: Adapter, layer: nn.Module, plan: LayerPlan) -> None:
    """Zero the output-projection columns of every removed structure (reference for tests)."""
    shape = adapter.attention_shape(layer)
    _, o = adapter.attn_linears(layer)
    keep = torch.zeros(o.in_features, dtype=torch.bool)
    keep[head_rows(plan.heads, shape.head_dim)] = True
    o.weight[:, ~keep.to(o.weight.device)] = 0
    parts = adapter.mlp_parts(layer)
    for part, keep in zip(parts, split_channels(plan.channels, [p.size for p in parts])):
        removed = torch.ones(part.size, dtype=torch.bool)
        removed[keep] = False
        part.mask(removed.nonzero().squeeze(1))


@torch.no_grad()
def set_output_projection(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Replace an output projection's weight (and bias) with refitted values.

    A bias is created if the layer had none: refitting with a constant input row
    absorbs the mean contribution of removed structures (FLAP's bias compensation).
    """
    assert weight.shape == linear.weight.shape, (weight.shape, linear.weight.shape)
    if not bool(torch.isfinite(weight).all()) or (bias is not None and not bool(torch.isfinite(bias).all())):
        from ..errors import StructPruneError  # a refit that diverged must not be written silently

        raise StructPruneError("a least-squares refit produced NaN or Inf weights (ill-conditioned statistics); "
                               "raise the dampening (--damp) or use more calibration windows")
    linear.weight.copy_(weight.to(linear.weight.dtype))
    if bias is not None:
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                   device=linear.weight.device), requires_grad=False)
        linear.bias.copy_(bias.to(linear.bias.dtype))
