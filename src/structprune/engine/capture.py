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
from .activations import ActivationStore


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


def _same(a, b) -> bool:
    """Equal layer kwargs (tensors equal in dtype, shape, device and values)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and a.device == b.device and torch.equal(a, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is None or isinstance(a, (bool, int, float, str)):
        return a == b
    return False  # other objects (caches, configs): shared only when identical


@dataclass
class LayerInputs:
    """Hidden states entering a decoder layer, chunked, plus each chunk's layer kwargs.

    ``hidden`` is an :class:`~structprune.engine.activations.ActivationStore` (RAM up to the
    activation budget, disk beyond; a list given here is wrapped in one). ``kwargs`` stay a
    list in RAM: rotary cos/sin and masks are small next to the hidden states, and chunks
    with equal kwargs share one dict (the capture deduplicates them)."""

    hidden: ActivationStore  # chunk c: [batch, seqlen, hidden]
    kwargs: list[dict]

    def __post_init__(self):
        if not isinstance(self.hidden, ActivationStore):
            self.hidden = ActivationStore(self.hidden)

    def clone(self) -> "LayerInputs":
        """A copy of the hidden states (into a new store: RAM within the budget, disk beyond)."""
        return LayerInputs(self.hidden.clone(), self.kwargs)

    def close(self) -> None:
        """Release the hidden states now (RAM budget, files) rather than at garbage collection."""
        self.hidden.close()


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, adapter: Adapter, calib: torch.Tensor,
                               device: torch.device, batch_size: int = 1,
                               dtype: torch.dtype | None = None) -> LayerInputs:
    """Run ``calib`` ([n, seqlen] token ids) up to the first decoder layer, chunk by chunk.

    Hidden states are kept in ``dtype`` (default: the model's, i.e. the compute dtype) in an
    activation store; chunks with equal kwargs share one kwargs dict."""
    layers = adapter.layers()
    pre = adapter.pre_layer_modules()
    pre_devices = [next(m.parameters(), torch.empty(0)).device for m in pre]
    for m in pre:
        m.to(device)
    first = layers[0]
    sink: list = []
    layers[0] = _Catcher(first, sink)
    hidden, kwargs, distinct = ActivationStore(dtype=dtype), [], []
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
            kw = to_device(kw, "cpu")
            # Every window of a size gets the same rotary tables and mask: keep one copy
            # (at seqlen 2048 they are MBs per chunk, an eager mask tens of MBs).
            same = next((d for d in distinct if _same(kw, d)), None)
            if same is None:
                distinct.append(kw)
            else:
                kw = same
            hidden.append(h.detach())
            kwargs.append(kw)
    except BaseException:
        hidden.close()
        raise
    finally:
        layers[0] = first
        for m, d in zip(pre, pre_devices):
            m.to(d)
    return LayerInputs(hidden, kwargs)


def run_layer(layer: nn.Module, inputs: LayerInputs, device, dtype: torch.dtype | None = None) -> LayerInputs:
    """Outputs of ``layer`` on every chunk of ``inputs``, in a new activation store (kept in
    ``dtype``, default the inputs store's); chunks stored in a reduced dtype are cast back to
    the dtype they were produced in."""
    out = ActivationStore(dtype=dtype or inputs.hidden.dtype)
    try:
        with torch.no_grad():
            for h, kw in zip(inputs.hidden, inputs.kwargs):
                y = layer(h.to(device, inputs.hidden.source_dtype or h.dtype), **to_device(kw, device))
                y = y[0] if isinstance(y, (tuple, list)) else y
                out.append(y)
    except BaseException:
        out.close()  # its files go now, not when the traceback is freed
        raise
    return LayerInputs(out, inputs.kwargs)
