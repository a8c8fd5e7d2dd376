"""Give a meta (weightless) decoder layer the shapes of a pruned one, without its weights.

A resumed streamed run (engine/journal.py) skips the layers a killed run had already cut and
written; the model skeleton must still describe them as pruned, so that later passes read them
back from the written shards and the export sees their widths. The layer's shapes are recorded
when it is written; replaying them here (plus the attention bookkeeping an adapter derives from
the projections' shapes) gives the same skeleton the cut itself left.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters.base import Adapter


def layer_shapes(layer: nn.Module) -> dict[str, list[int]]:
    """``{state-dict key: shape}`` of ``layer`` (works on meta layers)."""
    return {k: list(t.shape) for k, t in layer.state_dict(keep_vars=True).items()}


@torch.no_grad()
def reshape_meta_layer(adapter: Adapter, layer: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Make the meta tensors of ``layer`` have ``shapes`` (creating tensors it lacks, such as an
    output bias a refit added) and update the attention module's head bookkeeping."""
    for key, shape in shapes.items():
        modname, _, attr = key.rpartition(".")
        mod = layer.get_submodule(modname) if modname else layer
        old = getattr(mod, attr, None)
        if old is not None and list(old.shape) == list(shape):
            continue
        if old is not None and not old.is_meta:
            raise ValueError(f"{key} holds real weights: only a meta layer can be reshaped")
        like = old if old is not None else next(t for t in mod.parameters(recurse=False))
        new = torch.empty(shape, dtype=like.dtype, device="meta")
        if attr in mod._buffers:
            mod._buffers[attr] = new
        else:
            setattr(mod, attr, nn.Parameter(new, requires_grad=False))
        if isinstance(mod, nn.Linear) and attr == "weight":
            mod.out_features, mod.in_features = shape
    a = adapter.attention_shape(layer)
    adapter.set_attention_heads(layer, a.num_heads, a.num_kv_heads)
