"""FLAP's fluctuation metric (An et al. 2024, "Fluctuation-based Adaptive Structured Pruning").

For an output projection ``W`` ([d, n]) fed by inner activations ``z``, channel ``j``
scores ``Var_tokens(z_j) * ||W[:, j]||^2``: how much the module's output moves when the
channel is replaced by its mean (the mean itself is kept, as a bias). A head's score is
the sum over its ``head_dim`` channels. For the global threshold FLAP standardises the
channel scores of each module of each layer ("AL-AM"); a head's key is then the mean of
its channels' standardised scores.
"""

from __future__ import annotations

import torch

from ..adapters import Adapter
from .basic import mlp_column_sums, per_head


def fluctuation_channels(adapter: Adapter, layer, stats) -> dict[str, torch.Tensor]:
    """Per-channel fluctuation of both modules: ``{"attn": [H*dh], "mlp": [n]}`` (on CPU)."""
    _, o = adapter.attn_linears(layer)
    attn = stats["attn"].variance.cpu() * o.weight.float().pow(2).sum(0).cpu()
    mlp = stats["mlp"].variance.cpu() * mlp_column_sums(adapter, layer, 2)
    return {"attn": attn, "mlp": mlp}


def fluctuation(adapter: Adapter, layer, stats) -> dict[str, torch.Tensor]:
    """FLAP's fluctuation per head and per MLP channel (a scorer: higher = keep)."""
    ch = fluctuation_channels(adapter, layer, stats)
    return {"attn": per_head(ch["attn"], adapter.attention_shape(layer).head_dim), "mlp": ch["mlp"]}


def standardise(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` over one module's structures (FLAP's per-layer, per-module step)."""
    x = x.double()
    std = x.std()
    # A constant module (all channels equal) has no ranking information: all keys 0.
    return ((x - x.mean()) / std if std > 0 else torch.zeros_like(x)).float()


def flap_keys(adapter: Adapter, layer, stats) -> dict[str, torch.Tensor]:
    """AL-AM keys for the global threshold: standardised per module, heads averaged over channels."""
    ch = fluctuation_channels(adapter, layer, stats)
    dh = adapter.attention_shape(layer).head_dim
    return {"attn": standardise(ch["attn"]).reshape(-1, dh).mean(1), "mlp": standardise(ch["mlp"])}
