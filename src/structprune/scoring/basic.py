"""Magnitude-sp and Wanda-sp structure scores."""

from __future__ import annotations

import torch

from ..adapters import Adapter


def per_head(col_scores: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Sum per-column scores ``[H * head_dim]`` into per-head scores ``[H]``."""
    return col_scores.reshape(-1, head_dim).sum(1)


def mlp_column_sums(adapter: Adapter, layer, power: float) -> torch.Tensor:
    """``sum_i |W_ij|^power`` over each MLP channel's output-projection column, every part
    (expert) concatenated in layer channel order ([n], CPU, float32)."""
    return torch.cat([p.out_weight().detach().float().abs().pow(power).sum(0).cpu() for p in adapter.mlp_parts(layer)])


def magnitude_sp(adapter: Adapter, layer, stats=None) -> dict[str, torch.Tensor]:
    """Squared Frobenius norm of every weight a structure owns (no calibration data needed)."""
    shape = adapter.attention_shape(layer)
    _, o = adapter.attn_linears(layer)
    q, k, v = (w.detach().float() for w in adapter.qkv_weights(layer))  # views: fused q/k/v split
    dh = shape.head_dim
    q_rows = q.pow(2).sum(1)  # [H*dh]
    o_cols = o.weight.float().pow(2).sum(0)  # [H*dh]
    heads = per_head(q_rows + o_cols.to(q_rows.device), dh)
    # A head's k/v rows are shared by its group: spread them over the group's heads.
    kv = per_head(k.pow(2).sum(1) + v.pow(2).sum(1), dh)
    heads = heads + kv.repeat_interleave(shape.group_size) / shape.group_size
    ch = []
    for part in adapter.mlp_parts(layer):
        c = part.out_weight().detach().float().pow(2).sum(0)
        for w in part.in_weights():
            c = c + w.detach().float().pow(2).sum(1)
        ch.append(c.cpu())
    return {"attn": heads, "mlp": torch.cat(ch)}


def wanda_sp(adapter: Adapter, layer, stats) -> dict[str, torch.Tensor]:
    """Wanda-sp (FLAP's structured Wanda): sum over the output projection's column(s) of
    ``|W_ij| * ||z_j||``, with ``z`` the activations entering that projection."""
    shape = adapter.attention_shape(layer)
    _, o = adapter.attn_linears(layer)
    attn = (o.weight.float().abs() * stats["attn"].norm.to(o.weight.device)[None, :]).sum(0)
    # sum_i |W_ij| * ||z_j|| = ||z_j|| * sum_i |W_ij|: per part, no [d, n] temporary per expert
    mlp = stats["mlp"].norm.cpu() * mlp_column_sums(adapter, layer, 1)
    return {"attn": per_head(attn, shape.head_dim), "mlp": mlp}


SCORERS = {"magnitude-sp": magnitude_sp, "wanda-sp": wanda_sp}
