"""Kept widths per layer and the uniform allocation.

Attention keeps ``kv_heads`` groups of ``per_group`` query heads (the same count in
every kept group, so the layer stays a valid GQA layer); heads are coarse, so the MLP
absorbs the remainder of each layer's budget and the achieved sparsity lands on target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..adapters.base import AttentionShape, MLPShape


@dataclass(frozen=True)
class LayerWidths:
    """Kept widths of one layer; ``parts``: kept channels of each MLP part (experts), else None."""

    kv_heads: int
    per_group: int
    channels: int
    parts: tuple[int, ...] | None = None

    @property
    def heads(self) -> int:
        return self.kv_heads * self.per_group

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.parts is None:
            d.pop("parts")
        else:
            d["parts"] = list(self.parts)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerWidths":
        """Inverse of :meth:`to_dict` (widths travel between solver passes as plain data)."""
        parts = d.get("parts")
        return cls(int(d["kv_heads"]), int(d["per_group"]), int(d["channels"]),
                   None if parts is None else tuple(int(x) for x in parts))


def mlp_widths(mlp: MLPShape, kv_heads: int, per_group: int, channels: float, multiple: int = 1) -> LayerWidths:
    """Widths keeping about ``channels`` MLP channels: rounded to ``multiple``, or, with several
    parts (experts), the same fraction of every part (see :meth:`MLPShape.split`)."""
    if not mlp.parts:
        return LayerWidths(kv_heads, per_group, round_channels(channels, mlp.channels, multiple))
    parts = mlp.split(channels, multiple)
    return LayerWidths(kv_heads, per_group, sum(parts), parts)


def moved(mlp: MLPShape, w: LayerWidths, sign: int, multiple: int = 1) -> LayerWidths | None:
    """``w`` with one MLP step (:meth:`MLPShape.step_channels`) more (``sign=1``) or fewer kept,
    or None where no legal step is left. Several parts: the tied experts move together."""
    if not mlp.parts:
        step = min(multiple, mlp.channels)
        c = w.channels + sign * step
        return LayerWidths(w.kv_heads, w.per_group, c) if step <= c <= mlp.channels else None
    parts = list(w.parts)
    for i in range(max(mlp.tied, 1)):
        m = mlp.part_multiple(i, multiple)
        parts[i] += sign * m
        if not min(m, mlp.sizes[i]) <= parts[i] <= mlp.sizes[i]:
            return None
    return LayerWidths(w.kv_heads, w.per_group, sum(parts), tuple(parts))


def layer_cost(attn: AttentionShape, mlp: MLPShape, w: LayerWidths) -> int:
    return attn.cost(w.kv_heads, w.per_group) + mlp.cost(w.channels)


def nearest_attention_option(attn: AttentionShape, target_cost: float) -> tuple[int, int]:
    """The legal ``(kv_heads, per_group)`` whose cost is nearest ``target_cost``.

    Ties go to more KV groups (grouped heads share K/V, so dropping query heads first
    loses less capacity per parameter)."""
    return min(attn.options(), key=lambda o: (abs(attn.cost(*o) - target_cost), -o[0]))


def round_channels(c: float, n: int, multiple: int) -> int:
    c = int(round(c / multiple)) * multiple if multiple > 1 else int(round(c))
    return max(min(c, n), min(multiple, n), 1)


def widths_for_budget(attn: AttentionShape, mlp: MLPShape, attn_keep_frac: float, budget: float,
                      multiple: int = 1) -> LayerWidths:
    """Widths of one layer: attention nearest ``attn_keep_frac`` of its cost, MLP fills ``budget``."""
    g, m = nearest_attention_option(attn, attn_keep_frac * attn.cost(attn.num_kv_heads, attn.group_size))
    rest = budget - attn.cost(g, m)
    return mlp_widths(mlp, g, m, rest / mlp.cost_per_channel, multiple)


def uniform_widths(shapes: list[tuple[AttentionShape, MLPShape]], sparsity: float,
                   multiple: int = 1) -> list[LayerWidths]:
    """Every layer removes ``sparsity`` of its prunable parameters (attention and MLP alike)."""
    out = []
    for attn, mlp in shapes:
        full = attn.cost(attn.num_kv_heads, attn.group_size) + mlp.cost(mlp.channels)
        out.append(widths_for_budget(attn, mlp, 1 - sparsity, (1 - sparsity) * full, multiple))
    return out
