"""Turn per-structure scores and kept widths into a :class:`LayerPlan`."""

from __future__ import annotations

import torch

from ..adapters.base import AttentionShape, LayerPlan
from ..allocation import LayerWidths


def select_heads(shape: AttentionShape, head_scores: torch.Tensor, kv_heads: int, per_group: int):
    """Best ``per_group`` heads inside each group, then the ``kv_heads`` groups whose kept heads
    score highest. Returns sorted ``(heads, kv_groups)``."""
    s = head_scores.float().cpu().reshape(shape.num_kv_heads, shape.group_size)
    top = s.topk(per_group, dim=1)
    groups = top.values.sum(1).topk(kv_heads).indices.sort().values
    heads = (top.indices[groups] + groups[:, None] * shape.group_size).reshape(-1).sort().values
    return heads.tolist(), groups.tolist()


def select_channels(scores: torch.Tensor, kept: int) -> list[int]:
    return scores.float().cpu().topk(kept).indices.sort().values.tolist()


def select_plan(shape: AttentionShape, scores: dict[str, torch.Tensor], widths: LayerWidths) -> LayerPlan:
    heads, kv = select_heads(shape, scores["attn"], widths.kv_heads, widths.per_group)
    return LayerPlan(heads=heads, kv_heads=kv, channels=select_channels(scores["mlp"], widths.channels))
