"""One global threshold over every structure of every layer, and exact budget landing.

A global allocation ranks all heads and MLP channels of the model by one key
(cost-normalised score for ``--allocation threshold`` and the ``global`` method,
FLAP's standardised fluctuation for ``flap``) and keeps the best until the kept
parameters meet the budget. Each layer then gets legal GQA widths: its attention
takes the option nearest the cost of the heads it won, and its MLP absorbs the rest
of the layer's share, so attention rounding never moves the global budget.
"""

from __future__ import annotations

import logging

import torch

from ..adapters.base import AttentionShape, MLPShape
from .widths import LayerWidths, layer_cost, moved, widths_for_budget

log = logging.getLogger(__name__)

Shapes = list[tuple[AttentionShape, MLPShape]]


def full_cost(attn: AttentionShape, mlp: MLPShape) -> int:
    return attn.cost(attn.num_kv_heads, attn.group_size) + mlp.cost(mlp.channels)


def head_cost(attn: AttentionShape) -> float:
    """Parameters per query head, K/V rows shared out over the heads of their group."""
    return attn.cost(attn.num_kv_heads, attn.group_size) / attn.num_heads


def cost_normalised(scores: dict[str, torch.Tensor], attn: AttentionShape, mlp: MLPShape) -> dict[str, torch.Tensor]:
    """Score per parameter: ``score_j / c_j`` (the key of the threshold allocation)."""
    return {"attn": scores["attn"].float().cpu() / head_cost(attn),
            "mlp": scores["mlp"].float().cpu() / mlp.cost_per_channel}


def threshold_counts(shapes: Shapes, keys: list[dict[str, torch.Tensor]], sparsity: float) -> list[tuple[int, int]]:
    """Kept ``(heads, channels)`` per layer: the highest keys whose summed cost is nearest the budget."""
    vals, costs, owner = [], [], []
    for i, ((attn, mlp), k) in enumerate(zip(shapes, keys)):
        vals += [k["attn"].float().cpu(), k["mlp"].float().cpu()]
        costs += [torch.full((attn.num_heads,), head_cost(attn), dtype=torch.float64),
                  torch.full((mlp.channels,), float(mlp.cost_per_channel), dtype=torch.float64)]
        owner += [torch.full((attn.num_heads,), 2 * i), torch.full((mlp.channels,), 2 * i + 1)]
    vals, costs, owner = torch.cat(vals), torch.cat(costs), torch.cat(owner)
    if not torch.isfinite(vals).all():
        raise ValueError("non-finite structure scores in the global threshold")
    budget = (1 - sparsity) * sum(full_cost(a, m) for a, m in shapes)
    order = torch.sort(vals, descending=True, stable=True).indices
    cum = costs[order].cumsum(0)
    # Like FLAP: the prefix whose cost is nearest the budget (the threshold is its last key).
    n_keep = int((cum - budget).abs().argmin()) + 1
    kept = torch.bincount(owner[order[:n_keep]], minlength=2 * len(shapes))
    return [(int(kept[2 * i]), int(kept[2 * i + 1])) for i in range(len(shapes))]


def counts_to_widths(shapes: Shapes, counts: list[tuple[int, int]], sparsity: float,
                     multiple: int = 1) -> list[LayerWidths]:
    """Legal widths from per-layer kept counts, then the budget landed exactly (see :func:`fit_budget`)."""
    out = []
    for (attn, mlp), (h, c) in zip(shapes, counts):
        attn_full = attn.cost(attn.num_kv_heads, attn.group_size)
        share = h * head_cost(attn) + c * mlp.cost_per_channel
        out.append(widths_for_budget(attn, mlp, h * head_cost(attn) / attn_full, share, multiple))
    budget = (1 - sparsity) * sum(full_cost(a, m) for a, m in shapes)
    return fit_budget(shapes, out, budget, multiple)


def threshold_widths(shapes: Shapes, keys: list[dict[str, torch.Tensor]], sparsity: float,
                     multiple: int = 1) -> list[LayerWidths]:
    """One global threshold on ``keys`` (higher = keep) meeting ``sparsity`` of the prunable parameters."""
    return counts_to_widths(shapes, threshold_counts(shapes, keys, sparsity), sparsity, multiple)


def fit_budget(shapes: Shapes, widths: list[LayerWidths], budget: float, multiple: int = 1) -> list[LayerWidths]:
    """Move MLP channels (``multiple`` at a time) until the total cost is nearest ``budget``.

    Per-layer rounding (GQA options, channel multiples, the one-structure minimum) can
    add up across layers; the correction is spread round-robin so no layer's share
    moves by more than a few channels.
    """
    ws = list(widths)
    total = sum(layer_cost(a, m, w) for (a, m), w in zip(shapes, ws))
    i, stuck = 0, 0
    while stuck < len(ws):
        attn, mlp = shapes[i]
        w = ws[i]
        up = moved(mlp, w, 1, multiple) if total < budget else None
        down = moved(mlp, w, -1, multiple) if total > budget else None
        nxt = up or down
        if nxt is not None:
            d = (nxt.channels - w.channels) * mlp.cost_per_channel
        if nxt is not None and abs(total + d - budget) < abs(total - budget):
            ws[i] = nxt
            total, stuck = total + d, 0
        else:
            stuck += 1
        i = (i + 1) % len(ws)
    return ws
