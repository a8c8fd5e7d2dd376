"""OWL allocation (Yin et al. 2024, "Outlier Weighed Layerwise sparsity"), made structured.

Layer ``l``'s outlier ratio ``D_l`` is the fraction of its Wanda metric entries
``|W_ij| * ||x_j||`` (every prunable linear of the layer) above ``M`` times the layer's
mean metric. Layers with more outliers keep more: following OWL's code, ``D`` is
min-max scaled into ``[0, 2*lambda]`` and shifted to mean ``1 - s``, which is each
layer's retention ratio (so sparsities lie in ``[s - lambda, s + lambda]``). Retention
ratios become parameter budgets, rescaled so the global budget holds exactly even when
layers differ in size, clipped to what a layer can hold, and turned into legal widths.
"""

from __future__ import annotations

import logging

import torch

from ..adapters import Adapter
from .threshold import Shapes, fit_budget, full_cost
from .widths import LayerWidths, widths_for_budget

log = logging.getLogger(__name__)


def _weight_inputs(adapter: Adapter, layer, stats):
    """Each prunable weight matrix with the L2 norms of its input features over the calibration
    tokens (an expert's inputs: the tokens routed to it)."""
    qkv, o = adapter.attn_linears(layer)
    a, m = stats["attn"], stats["mlp"]
    pairs = [(lin.weight, a.xnorm) for lin in qkv] + [(o.weight, a.norm)]
    part_stats = m.parts or [m]
    for part, st in zip(adapter.mlp_parts(layer), part_stats):
        pairs += [(w, st.xnorm) for w in part.in_weights()] + [(part.out_weight(), st.norm)]
    return pairs


@torch.no_grad()
def outlier_ratio(adapter: Adapter, layer, stats, m: float = 5.0) -> float:
    """Fraction of the layer's ``|W| * ||x||`` entries above ``m`` times their mean (OWL's ``D_l``)."""
    pairs = _weight_inputs(adapter, layer, stats)
    # Two passes (mean, then count) instead of one concatenation: a 7B layer has 200M entries.
    total, n = 0.0, 0
    for w, xn in pairs:
        total += (w.float().abs() * xn.to(w.device)[None, :]).sum().item()
        n += w.numel()
    thr = m * total / n
    above = sum(int(((w.float().abs() * xn.to(w.device)[None, :]) > thr).sum()) for w, xn in pairs)
    return above / n


def _clip_budgets(budgets: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, total: float) -> torch.Tensor:
    """Clip per-layer budgets to ``[lo, hi]`` and hand the excess to the unclipped layers, pro rata."""
    b = budgets.clone()
    for _ in range(len(b) + 1):
        b = torch.minimum(torch.maximum(b, lo), hi)
        gap = total - b.sum()
        free = (b < hi) if gap > 0 else (b > lo)
        if abs(gap) < 1e-6 * total or not free.any():
            break
        b[free] += gap * b[free] / b[free].sum()
    return b


def owl_retention(ratios: list[float], sparsity: float, lam: float = 0.08) -> torch.Tensor:
    """OWL's per-layer retention ratio: min-max scaled outlier ratios, spread ``2*lam``, mean ``1 - s``."""
    d = torch.tensor(ratios, dtype=torch.float64)
    spread = d.max() - d.min()
    scaled = (d - d.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(d)
    return scaled - scaled.mean() + (1 - sparsity)


def owl_widths(shapes: Shapes, ratios: list[float], sparsity: float, lam: float = 0.08,
               multiple: int = 1) -> list[LayerWidths]:
    """Per-layer widths from outlier ratios, landing the global budget exactly."""
    full = torch.tensor([float(full_cost(a, m)) for a, m in shapes], dtype=torch.float64)
    budget = (1 - sparsity) * full.sum().item()
    r = owl_retention(ratios, sparsity, lam)
    b = r * full
    b = b * budget / b.sum()  # layers of unequal size: rescale so the budget holds
    lo = torch.tensor([float(a.cost(1, 1) + m.cost_per_channel * m.min_channels(multiple)) for a, m in shapes],
                      dtype=torch.float64)
    b = _clip_budgets(b, lo, full, budget)
    ws = [widths_for_budget(a, m, float(bi / fi), float(bi), multiple) for (a, m), bi, fi in zip(shapes, b, full)]
    log.info("OWL retention per layer: %s", " ".join(f"{x:.3f}" for x in (b / full).tolist()))
    return fit_budget(shapes, ws, budget, multiple)
