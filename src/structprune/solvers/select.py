"""Turn per-structure scores and kept widths into a :class:`LayerPlan`."""

from __future__ import annotations

import torch

from ..adapters.base import AttentionShape, LayerPlan, MLPShape
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


def select_part_channels(sizes, scores: torch.Tensor, kept) -> list[int]:
    """The best ``kept[p]`` channels of every part ``p`` (layer channel indices, sorted)."""
    out, start = [], 0
    for n, k in zip(sizes, kept):
        out += [start + c for c in select_channels(scores[start:start + n], k)]
        start += n
    return out


def select_plan(shape: AttentionShape, scores: dict[str, torch.Tensor], widths: LayerWidths,
                mlp: MLPShape | None = None) -> LayerPlan:
    """Best heads and channels at ``widths``; with several MLP parts (experts: ``widths.parts``
    set, ``mlp`` their shape) the best channels of each part."""
    heads, kv = select_heads(shape, scores["attn"], widths.kv_heads, widths.per_group)
    if widths.parts is None:
        channels = select_channels(scores["mlp"], widths.channels)
    else:
        channels = select_part_channels(mlp.sizes, scores["mlp"], widths.parts)
    return LayerPlan(heads=heads, kv_heads=kv, channels=channels)
