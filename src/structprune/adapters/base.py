"""The adapter protocol: what a model family exposes to the pruning engine.

An adapter declares, for one decoder layer, the two prunable modules and their
structures (which rows/columns go together and what they cost), so the engine never
needs to trace the model and can work with one layer loaded. Everything else (the
streaming loop, scorers, solvers) is family-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class AttentionShape:
    """Shape of one layer's attention: ``num_kv_heads`` groups of ``group_size`` query heads."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    qkv_bias: bool

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def cost(self, kv_kept: int, per_group: int) -> int:
        """Parameters of q, k, v, o kept with ``kv_kept`` groups of ``per_group`` heads.

        The output projection's bias has ``hidden_size`` entries whatever is kept,
        so it is not part of the prunable cost.
        """
        d, dh = self.hidden_size, self.head_dim
        q_heads = kv_kept * per_group
        per_q = 2 * d * dh + (dh if self.qkv_bias else 0)  # q rows + o columns
        per_kv = 2 * d * dh + (2 * dh if self.qkv_bias else 0)  # k and v rows
        return q_heads * per_q + kv_kept * per_kv

    def options(self) -> list[tuple[int, int]]:
        """Every legal ``(kv_kept, per_group)``: same head count in every kept group."""
        return [(g, m) for g in range(1, self.num_kv_heads + 1) for m in range(1, self.group_size + 1)]


@dataclass(frozen=True)
class MLPShape:
    """Shape of one layer's MLP: ``channels`` inner channels of ``cost_per_channel`` parameters."""

    channels: int
    hidden_size: int
    gated: bool  # SwiGLU (gate, up, down) vs a plain fc1 -> act -> fc2
    bias: bool  # bias on the input projection(s)

    @property
    def cost_per_channel(self) -> int:
        n_in = 2 if self.gated else 1
        return (n_in + 1) * self.hidden_size + (n_in if self.bias else 0)

    def cost(self, kept: int) -> int:
        return kept * self.cost_per_channel


@dataclass
class LayerPlan:
    """Kept structures of one decoder layer (indices into the layer's current structures).

    ``heads`` are query-head indices, ``kv_heads`` KV-group indices, ``channels``
    MLP channel indices. Stored as kept indices (not removed ones) so a plan can
    be replayed on a fresh copy of the dense model.
    """

    heads: list[int]
    kv_heads: list[int]
    channels: list[int]

    def to_dict(self) -> dict:
        return {"heads": list(self.heads), "kv_heads": list(self.kv_heads), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerPlan":
        return cls(list(d["heads"]), list(d["kv_heads"]), list(d["channels"]))


class Adapter:
    """Base class of the per-family adapters (LLaMA family, OPT).

    Subclasses say where the decoder layers live, which linear layers form each
    prunable module, and how to cut a layer to a :class:`LayerPlan`.
    """

    #: ``model_type`` values handled by the adapter.
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- where things are ---------------------------------------------------------------
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def pre_layer_modules(self) -> list[nn.Module]:
        """Modules that run before the first decoder layer (embeddings, rotary, ...)."""
        raise NotImplementedError

    def head_modules(self) -> list[nn.Module]:
        """Modules after the last decoder layer, applied in order to get logits (final norm, LM head)."""
        raise NotImplementedError

    def attn_linears(self, layer: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
        """``([q, k, v], o)`` of a layer's attention."""
        raise NotImplementedError

    def mlp_linears(self, layer: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
        """``([gate, up] or [fc1], down/fc2)`` of a layer's MLP."""
        raise NotImplementedError

    def mlp_activation(self, layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    # -- shapes ---------------------------------------------------------------------------
    def attention_shape(self, layer: nn.Module) -> AttentionShape:
        raise NotImplementedError

    def mlp_shape(self, layer: nn.Module) -> MLPShape:
        (ins, out) = self.mlp_linears(layer)
        return MLPShape(
            channels=out.in_features,
            hidden_size=out.out_features,
            gated=len(ins) == 2,
            bias=ins[0].bias is not None,
        )

    def layer_widths(self, layer: nn.Module) -> dict:
        a = self.attention_shape(layer)
        return {"heads": a.num_heads, "kv_heads": a.num_kv_heads, "mlp": self.mlp_shape(layer).channels}

    # -- cutting --------------------------------------------------------------------------
    def set_attention_heads(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        """Update the attention module's bookkeeping after its projections were sliced."""
        raise NotImplementedError

    def prunable_linears(self, layer: nn.Module) -> list[nn.Linear]:
        qkv, o = self.attn_linears(layer)
        ins, out = self.mlp_linears(layer)
        return [*qkv, o, *ins, out]


def count_params(modules: list[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())
