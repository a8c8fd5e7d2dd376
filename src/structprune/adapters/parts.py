"""MLP parts: the modules of a decoder layer whose inner channels are structures.

A dense layer has one part (its MLP). A mixture-of-experts layer has one part per routed
expert, plus a shared expert where the family has one. A part adds ``W @ z`` to the
residual stream, ``W`` = :meth:`MLPPart.out_weight` (``[d, n]``) and ``z`` its ``n`` inner
activations *as the forward weights them* (an expert's channels times the token's routing
weight, zero on tokens not routed to it), so every scorer and solver written for one MLP
applies to each part. Channel ``j`` of part ``p`` is channel ``offset(p) + j`` of the layer
(:class:`~structprune.adapters.LayerPlan` stores layer channel indices).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


@torch.no_grad()
def slice_linear(linear: nn.Linear, keep: Sequence[int] | torch.Tensor, dim: int) -> None:
    """Keep rows (``dim=0``) or columns (``dim=1``) ``keep`` of ``linear``, in place."""
    idx = torch.as_tensor(keep, dtype=torch.long) if not isinstance(keep, torch.Tensor) else keep
    idx = idx.to(linear.weight.device)
    w = linear.weight.index_select(dim, idx).contiguous()
    linear.weight = nn.Parameter(w, requires_grad=linear.weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.index_select(0, idx).contiguous(), requires_grad=False)
        linear.out_features = w.shape[0]
    else:
        linear.in_features = w.shape[1]


def fused_rows(segments: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Row indices of a fused matrix from ``(offset, local rows)`` per logical projection."""
    return torch.cat([off + rows.to(torch.long).cpu() for off, rows in segments])


class MLPPart:
    """One prunable MLP module: ``n`` channels, input projections (rows) and an output projection (columns)."""

    #: whether a refit may give the output projection a bias (experts have nowhere to hold one)
    bias_ok: bool = True

    @property
    def size(self) -> int:
        return self.out_weight().shape[1]

    def in_weights(self) -> list[torch.Tensor]:
        """``[n, d]`` views of the input projections (gate and up, or fc1), one row per channel."""
        raise NotImplementedError

    def in_biases(self) -> list[torch.Tensor | None]:
        return [None for _ in self.in_weights()]

    def out_weight(self) -> torch.Tensor:
        """``[d, n]`` view of the output projection (one column per channel)."""
        raise NotImplementedError

    def out_bias(self) -> torch.Tensor | None:
        return None

    def out_parameter(self) -> nn.Parameter:
        """The parameter holding :meth:`out_weight` (for gradients)."""
        raise NotImplementedError

    def out_view(self, t: torch.Tensor) -> torch.Tensor:
        """The ``[d, n]`` view of a tensor shaped like :meth:`out_parameter` (e.g. its gradient)."""
        return t

    def keep(self, idx: torch.Tensor) -> None:
        """Cut the part to channels ``idx`` (sorted), in place."""
        raise NotImplementedError

    def mask(self, removed: torch.Tensor) -> None:
        """Zero the output columns of ``removed`` channels (the test reference of a cut)."""
        with torch.no_grad():
            self.out_weight()[:, removed.to(self.out_weight().device)] = 0

    def set_output(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Replace the output projection's weight (and bias) with refitted values."""
        raise NotImplementedError


class LinearMLPPart(MLPPart):
    """An MLP of ``nn.Linear`` layers; input projections may be fused (Phi-3's ``gate_up_proj``).

    ``ins`` lists ``(linear, [offset of each logical projection in it])``: ``(gate, [0])``,
    ``(up, [0])`` for LLaMA, ``(gate_up_proj, [0, n])`` for Phi-3 (gate rows, then up rows).
    """

    def __init__(self, ins: list[tuple[nn.Linear, list[int]]], out: nn.Linear):
        self.ins, self.out = ins, out

    def in_weights(self):
        n = self.out.in_features
        return [lin.weight[off:off + n] for lin, offs in self.ins for off in offs]

    def in_biases(self):
        n = self.out.in_features
        return [None if lin.bias is None else lin.bias[off:off + n] for lin, offs in self.ins for off in offs]

    def out_weight(self):
        return self.out.weight

    def out_bias(self):
        return self.out.bias

    def out_parameter(self):
        return self.out.weight

    def keep(self, idx):
        idx = idx.to(torch.long).cpu()
        for lin, offs in self.ins:
            slice_linear(lin, fused_rows([(off, idx) for off in offs]), 0)
        slice_linear(self.out, idx, 1)

    @torch.no_grad()
    def set_output(self, weight, bias):
        lin = self.out
        assert weight.shape == lin.weight.shape, (weight.shape, lin.weight.shape)
        lin.weight.copy_(weight.to(lin.weight.dtype))
        if bias is not None:
            if lin.bias is None:  # a refit's constant row absorbs the removed channels' mean
                lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                    device=lin.weight.device), requires_grad=False)
            lin.bias.copy_(bias.to(lin.bias.dtype))


def part_offsets(parts: Sequence[MLPPart]) -> list[int]:
    """First layer channel index of every part (and the total at the end)."""
    out = [0]
    for p in parts:
        out.append(out[-1] + p.size)
    return out


def split_channels(channels: Sequence[int], sizes: Sequence[int]) -> list[torch.Tensor]:
    """Layer channel indices -> sorted local indices per part."""
    ch = torch.as_tensor(sorted(channels), dtype=torch.long)
    out, start = [], 0
    for n in sizes:
        sel = ch[(ch >= start) & (ch < start + n)]
        out.append(sel - start)
        start += n
    return out
