"""Magnitude-sp and Wanda-sp structure scores."""

from __future__ import annotations

import torch

from ..adapters import Adapter


def per_head(col_scores: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Sum per-column scores ``[H * head_dim]`` into per-head scores ``[H]``."""
    return col_scores.reshape(-1, head_dim).sum(1)


def magnitude_sp(adapter: Adapter, layer, stats=None) -> dict[str, torch.Tensor]:
    """Squared Frobenius norm of every weight a structure owns (no calibration data needed)."""
    shape = adapter.attention_shape(layer)
    (q, k, v), o = adapter.attn_linears(layer)
    dh = shape.head_dim
    q_rows = q.weight.float().pow(2).sum(1)  # [H*dh]
    o_cols = o.weight.float().pow(2).sum(0)  # [H*dh]
    heads = per_head(q_rows + o_cols, dh)
    # A head's k/v rows are shared by its group: spread them over the group's heads.
    kv = per_head(k.weight.float().pow(2).sum(1) + v.weight.float().pow(2).sum(1), dh)
    heads = heads + kv.repeat_interleave(shape.group_size) / shape.group_size
    ins, out = adapter.mlp_linears(layer)
    ch = out.weight.float().pow(2).sum(0)
    for lin in ins:
        ch = ch + lin.weight.float().pow(2).sum(1)
    return {"attn": heads, "mlp": ch}


def wanda_sp(adapter: Adapter, layer, stats) -> dict[str, torch.Tensor]:
    """Wanda-sp (FLAP's structured Wanda): sum over the output projection's column(s) of
    ``|W_ij| * ||z_j||``, with ``z`` the activations entering that projection."""
    shape = adapter.attention_shape(layer)
    _, o = adapter.attn_linears(layer)
    _, out = adapter.mlp_linears(layer)
    attn = (o.weight.float().abs() * stats["attn"].norm.to(o.weight.device)[None, :]).sum(0)
    mlp = (out.weight.float().abs() * stats["mlp"].norm.to(out.weight.device)[None, :]).sum(0)
    return {"attn": per_head(attn, shape.head_dim), "mlp": mlp}


SCORERS = {"magnitude-sp": magnitude_sp, "wanda-sp": wanda_sp}
