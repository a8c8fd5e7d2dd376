"""The adapter protocol: what a model family exposes to the pruning engine.

An adapter declares, for one decoder layer, the two prunable modules and their
structures (which rows/columns go together and what they cost), so the engine never
needs to trace the model and can work with one layer loaded. Everything else (the
streaming loop, scorers, solvers) is family-agnostic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .parts import LinearMLPPart, MLPPart


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
    #: channels of each MLP part (one per expert, then a shared expert); () for a single dense MLP
    parts: tuple[int, ...] = ()
    #: the first ``tied`` parts always keep the same width (routed experts share one 3D tensor)
    tied: int = 0
    #: widths of tied parts are multiples of this (16-byte rows for transformers' grouped_mm kernel)
    tied_multiple: int = 1

    def part_multiple(self, i: int, multiple: int) -> int:
        """Width granularity of part ``i`` under ``mlp_multiple``."""
        return math.lcm(multiple, self.tied_multiple) if i < self.tied else multiple

    def step_channels(self, multiple: int) -> int:
        """The smallest change of the layer's kept channels: one multiple, or one per tied expert."""
        return self.tied * self.part_multiple(0, multiple) if self.tied > 1 else multiple

    def min_channels(self, multiple: int = 1) -> int:
        """The fewest channels the layer can keep: one multiple in every part."""
        return sum(min(self.part_multiple(i, multiple), n) for i, n in enumerate(self.sizes))

    def split(self, channels: float, multiple: int = 1) -> tuple[int, ...]:
        """Per-part widths keeping the same fraction ``channels / self.channels`` of every part
        (tied parts equal), each a legal multiple and at least one multiple."""
        frac = channels / self.channels
        out = []
        for i, n in enumerate(self.sizes):
            m = self.part_multiple(i, multiple)
            k = int(round(frac * n / m)) * m
            out.append(max(min(k, n), min(m, n), 1))
        return tuple(out)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Channels of every part (``(channels,)`` for a dense MLP)."""
        return self.parts or (self.channels,)

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
        parts = self.mlp_parts(layer)
        first = parts[0]
        sizes = tuple(p.size for p in parts)
        return MLPShape(
            channels=sum(sizes),
            hidden_size=first.out_weight().shape[0],
            gated=len(first.in_weights()) == 2,
            bias=first.in_biases()[0] is not None,
            parts=sizes if len(parts) > 1 else (),
            tied=self.tied_parts(layer),
            tied_multiple=self.tied_multiple,
        )

    def layer_widths(self, layer: nn.Module) -> dict:
        a = self.attention_shape(layer)
        m = self.mlp_shape(layer)
        w = {"heads": a.num_heads, "kv_heads": a.num_kv_heads, "mlp": m.channels}
        if m.parts:
            w["mlp_parts"] = list(m.parts)
        return w

    # -- MLP parts (one dense MLP, or experts): see adapters/parts.py ------------------------
    def mlp_parts(self, layer: nn.Module) -> list[MLPPart]:
        """The layer's MLP modules whose channels are structures, in layer channel order.

        Rebuilt on every call: cuts replace the parameters a part views."""
        ins, out = self.mlp_linears(layer)
        return [LinearMLPPart([(lin, [0]) for lin in ins], out)]

    #: granularity of tied parts' widths (see :class:`MLPShape`)
    tied_multiple: int = 1

    def tied_parts(self, layer: nn.Module) -> int:
        """How many leading parts must keep the same width (0: every part is free)."""
        return 0

    def mlp_output_module(self, layer: nn.Module) -> nn.Module:
        """The module whose forward output is the MLP's whole contribution to the residual stream."""
        return self.mlp_linears(layer)[1]

    def cut_mlp(self, layer: nn.Module, keeps: list[torch.Tensor]) -> None:
        """Cut every part to its kept local channel indices (sorted)."""
        for part, keep in zip(self.mlp_parts(layer), keeps):
            part.keep(keep)

    def register_mlp_capture(self, layer: nn.Module, emit: Callable) -> list:
        """Hooks calling ``emit(part, z=..., x=...)`` with each part's inner activations ``z``
        ([tokens, n], weighted as the forward weights them) and its inputs ``x`` ([tokens, d]);
        returns the hook handles. ``z`` and ``x`` may come in separate calls; every call with
        ``z`` covers all tokens of the chunk (zeros where a part is not used)."""
        handles = []
        for i, part in enumerate(self.mlp_parts(layer)):
            first = part.ins[0][0]
            handles.append(part.out.register_forward_pre_hook(lambda m, a, i=i: emit(i, z=a[0])))
            handles.append(first.register_forward_pre_hook(lambda m, a, i=i: emit(i, x=a[0])))
        return handles

    # -- attention rows (fused q/k/v: Phi-3) ----------------------------------------------
    def qkv_weights(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[rows, d]`` views of the q, k and v projections' weights."""
        (q, k, v), _ = self.attn_linears(layer)
        return q.weight, k.weight, v.weight

    def attention_module(self, layer: nn.Module) -> nn.Module:
        """The layer's attention module (the one that calls transformers' attention function)."""
        return layer.self_attn

    def value_rows(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(weight [kv_heads * head_dim, d], bias or None)``: views of the value projection's rows,
        written in place by the value refit (solvers/values.py); None where the adapter exposes no
        value slice (then that refit skips the layer)."""
        lins, _ = self.attn_linears(layer)
        if len(lins) != 3:
            return None
        return lins[2].weight, lins[2].bias

    def attn_input_rows(self, layer: nn.Module, q_rows: torch.Tensor,
                        kv_rows: torch.Tensor) -> list[tuple[nn.Linear, torch.Tensor]]:
        """``(linear, rows to keep)`` for every attention input projection, given kept q and k/v rows."""
        (q, k, v), _ = self.attn_linears(layer)
        return [(q, q_rows), (k, kv_rows), (v, kv_rows)]

    # -- cutting --------------------------------------------------------------------------
    def set_attention_heads(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        """Update the attention module's bookkeeping after its projections were sliced."""
        raise NotImplementedError

    def prunable_linears(self, layer: nn.Module) -> list[nn.Module]:
        """The modules whose parameters sparsity counts (projections; experts modules for MoE)."""
        qkv, o = self.attn_linears(layer)
        ins, out = self.mlp_linears(layer)
        return [*qkv, o, *ins, out]


def count_params(modules: list[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def prunable_params(adapter: Adapter) -> int:
    """Parameters of every layer's q, k, v, o and MLP projections (what sparsity is a fraction of)."""
    return sum(count_params(adapter.prunable_linears(l)) for l in adapter.layers())


def module_costs(adapter: Adapter, layer: nn.Module) -> tuple[int, int]:
    """``(attention, MLP)`` removable cost of ``layer`` at its current widths: the parameters its
    structures carry (method.md's table). Output biases are not counted: they stay whatever is kept."""
    a, m = adapter.attention_shape(layer), adapter.mlp_shape(layer)
    return a.cost(a.num_kv_heads, a.group_size), m.cost(m.channels)


def removable_cost(adapter: Adapter) -> int:
    """Sum of :func:`module_costs` over the layers: what the structures of the model carry."""
    return sum(sum(module_costs(adapter, l)) for l in adapter.layers())
