"""Capture the inputs of the first decoder layer (SparseGPT's "catcher").

Only the modules before the first layer (embeddings, rotary) go to the compute
device; the catcher stops the forward pass as soon as layer 0 is reached, so no
decoder layer is ever loaded here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import Adapter
from .activations import ActivationStore
from .clock import timed


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self, layer: nn.Module, sink: list):
        super().__init__()
        self.layer = layer
        self.sink = sink
        # Some model forwards read attributes of the layer (e.g. attention_type).
        self.attention_type = attention_type(layer)

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder layers are expected to receive keyword arguments only")
        self.sink.append((hidden_states, kwargs))
        raise _Stop


class _PassThrough(nn.Module):
    """Stands in for a layer before the one whose kwargs are wanted: its output is never used."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


#: Key of a captured kwargs dict holding one kwargs dict per attention type (see :func:`layer_kwargs`).
BY_ATTENTION_TYPE = "structprune_kwargs_by_attention_type"


def attention_type(layer: nn.Module) -> str | None:
    """The attention type of a decoder layer (``"sliding_attention"``, ``"full_attention"``), or None.

    Models with alternating layers (Gemma 2/3, Qwen with sliding windows) give each type its
    own mask, and Gemma 3 its own rotary tables; transformers reads the type from the layer
    (``attention_type``) or from the config, which the attention module mirrors as ``layer_type``."""
    inner = getattr(layer, "module", None)  # wrappers such as sensitivity's Float32Module
    for obj in (layer, getattr(layer, "self_attn", None), inner, getattr(inner, "self_attn", None)):
        t = getattr(obj, "attention_type", None) or getattr(obj, "layer_type", None)
        if isinstance(t, str):
            return t
    return None


def layer_kwargs(layer: nn.Module, kwargs: dict) -> dict:
    """The kwargs ``layer`` is called with, from a captured chunk's kwargs (its attention type's)."""
    by_type = kwargs.get(BY_ATTENTION_TYPE)
    if by_type is None:
        return kwargs
    t = attention_type(layer)
    if t not in by_type:
        raise RuntimeError(f"no captured inputs for attention type {t!r} (captured: {sorted(by_type)})")
    return by_type[t]


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
    others = _first_layer_of_each_other_type(model, layers)
    first = layers[0]
    sink: list = []
    layers[0] = _Catcher(first, sink)
    hidden, kwargs, distinct = ActivationStore(dtype=dtype), [], []
    try:
        for start in range(0, calib.shape[0], batch_size):
            ids = calib[start:start + batch_size].to(device)
            h, kw = _run_to(model, layers, 0, sink, ids)
            if others:
                # Each attention type gets its own mask (and rotary tables): catch them at the
                # first layer of that type, the layers before it stood in for.
                by_type = {attention_type(first): kw}
                for t, j in others.items():
                    by_type[t] = _run_to(model, layers, j, sink, ids)[1]
                kw = {BY_ATTENTION_TYPE: by_type}
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


def _first_layer_of_each_other_type(model: nn.Module, layers) -> dict[str, int]:
    """``{attention type: index of its first layer}`` for the types other than layer 0's."""
    types = [attention_type(l) for l in layers]
    config_types = getattr(getattr(model, "config", None), "layer_types", None)
    if config_types is None:  # multimodal wrappers keep them in the text config
        get_text_config = getattr(getattr(model, "config", None), "get_text_config", None)
        config_types = getattr(get_text_config(), "layer_types", None) if get_text_config else None
    if config_types and len(set(config_types)) > 1 and None in types:
        raise RuntimeError("the config alternates attention types but the layers do not say theirs; "
                           "this transformers version is not supported")
    out: dict[str, int] = {}
    for j, t in enumerate(types):
        if t != types[0] and t not in out:
            out[t] = j
    return out


def _run_to(model: nn.Module, layers, j: int, sink: list, ids: torch.Tensor):
    """``(hidden, kwargs)`` entering layer ``j`` (layers before it stood in for: only the kwargs
    are right unless ``j == 0``). Layer 0 is already a catcher."""
    saved = [layers[i] for i in range(j + 1)]
    try:
        if j > 0:
            for i in range(j):
                layers[i] = _PassThrough()
            layers[j] = _Catcher(saved[j], sink)
        try:
            model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
    finally:
        for i in range(1, j + 1):
            layers[i] = saved[i]
        if j > 0:
            layers[0] = saved[0]
    h, kw = sink.pop()
    kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value", "cache")}
    kw["use_cache"] = False
    return h, to_device(kw, "cpu")


def run_layer(layer: nn.Module, inputs: LayerInputs, device, dtype: torch.dtype | None = None) -> LayerInputs:
    """Outputs of ``layer`` on every chunk of ``inputs``, in a new activation store (kept in
    ``dtype``, default the inputs store's); chunks stored in a reduced dtype are cast back to
    the dtype they were produced in."""
    out = ActivationStore(dtype=dtype or inputs.hidden.dtype)
    try:
        with torch.no_grad(), timed("forward"):
            for h, kw in zip(inputs.hidden, inputs.kwargs):
                y = layer(h.to(device, inputs.hidden.source_dtype or h.dtype),
                          **to_device(layer_kwargs(layer, kw), device))
                y = y[0] if isinstance(y, (tuple, list)) else y
                out.append(y)
    except BaseException:
        out.close()  # its files go now, not when the traceback is freed
        raise
    return LayerInputs(out, inputs.kwargs)


class ModuleReplay:
    """A module's outputs recorded over one pass of a layer's chunks and returned, in the same
    order, in a later pass instead of running the module again.

    The cutting pass runs its layer twice after the attention is cut: once for the MLP's
    statistics, once for the layer's outputs after the MLP's cut. The attention is the same in
    both (same weights, same inputs), so the second forward replays its outputs: bit for bit the
    same layer outputs, without a third of that forward's work. Only the first element of a tuple
    output is kept (the attention's output; the others are attention weights, which decoder
    layers drop) and the rest are replayed as None."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.store = ActivationStore()
        self.tail = 0

    @contextlib.contextmanager
    def recording(self):
        """Record the module's outputs while the context is open (one per forward call)."""
        def hook(mod, args, y):
            if isinstance(y, (tuple, list)):
                self.tail = len(y) - 1
                y = y[0]
            self.store.append(y)
        h = self.module.register_forward_hook(hook)
        try:
            yield self
        finally:
            h.remove()

    @contextlib.contextmanager
    def replaying(self):
        """The module returns the recorded outputs in order instead of computing them; the store
        is released when the context closes."""
        chunks = iter(range(len(self.store)))
        mod = self.module
        saved = mod.__dict__.get("forward")  # an instance-level forward (e.g. accelerate's hook) comes back after

        def forward(*args, **kwargs):
            c = next(chunks, None)
            if c is None:  # a layer calling the module more often than when it was recorded
                raise RuntimeError(f"ModuleReplay: {len(self.store)} outputs recorded, a call beyond them")
            y = self.store[c].to(args[0].device if args and torch.is_tensor(args[0]) else
                                 kwargs["hidden_states"].device)
            return (y, *([None] * self.tail)) if self.tail else y
        mod.forward = forward
        try:
            yield self
        finally:
            if saved is None:
                del mod.forward
            else:
                mod.forward = saved
            self.store.close()

    def close(self) -> None:
        self.store.close()
