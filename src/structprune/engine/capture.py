"""Capture the inputs of the first decoder layer (SparseGPT's "catcher").

Only the modules before the first layer (embeddings, rotary) go to the compute
device; the catcher stops the forward pass as soon as layer 0 is reached, so no
decoder layer is ever loaded here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import Adapter


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self, layer: nn.Module, sink: list):
        super().__init__()
        self.layer = layer
        self.sink = sink
        # Some model forwards read attributes of the layer (e.g. attention_type).
        self.attention_type = getattr(layer, "attention_type", None)

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder layers are expected to receive keyword arguments only")
        self.sink.append((hidden_states, kwargs))
        raise _Stop


def to_device(obj, device):
    """Move tensors inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@dataclass
class LayerInputs:
    """Hidden states entering a decoder layer, chunked, on CPU, plus each chunk's layer kwargs."""

    hidden: list[torch.Tensor]  # chunk c: [batch, seqlen, hidden]
    kwargs: list[dict]

    def clone(self) -> "LayerInputs":
        return LayerInputs([h.clone() for h in self.hidden], self.kwargs)


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, adapter: Adapter, calib: torch.Tensor,
                               device: torch.device, batch_size: int = 1,
                               store_device="cpu") -> LayerInputs:
    """Run ``calib`` ([n, seqlen] token ids) up to the first decoder layer, chunk by chunk."""
    layers = adapter.layers()
    pre = adapter.pre_layer_modules()
    pre_devices = [next(m.parameters(), torch.empty(0)).device for m in pre]
    for m in pre:
        m.to(device)
    first = layers[0]
    sink: list = []
    layers[0] = _Catcher(first, sink)
    hidden, kwargs = [], []
    try:
        for start in range(0, calib.shape[0], batch_size):
            ids = calib[start:start + batch_size].to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
            h, kw = sink.pop()
            kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value")}
            kw["use_cache"] = False
            hidden.append(h.detach().to(store_device))
            kwargs.append(to_device(kw, store_device))
    finally:
        layers[0] = first
        for m, d in zip(pre, pre_devices):
            m.to(d)
    return LayerInputs(hidden, kwargs)


def run_layer(layer: nn.Module, inputs: LayerInputs, device, store_device="cpu") -> LayerInputs:
    """Outputs of ``layer`` on every chunk of ``inputs``, stored back on ``store_device``."""
    out = []
    with torch.no_grad():
        for h, kw in zip(inputs.hidden, inputs.kwargs):
            y = layer(h.to(device), **to_device(kw, device))
            y = y[0] if isinstance(y, (tuple, list)) else y
            out.append(y.to(store_device))
    return LayerInputs(out, inputs.kwargs)
