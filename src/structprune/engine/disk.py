"""Decoder layers streamed from disk: the :class:`LayerStore` of a model larger than memory.

The model is a meta skeleton (:func:`structprune.models.checkpoint.load_skeleton`);
:class:`DiskLayerStore` reads layer ``i`` from the checkpoint when it is fetched and
drops it back to ``meta`` when it is released, so one decoder layer is resident at a
time. A layer that was pruned has new (smaller, meta) shapes after its release; its
weights must then come from where the caller wrote them (``set_source``, e.g. the
:class:`~structprune.export.shards.ShardWriter` of the output folder).

    reader = ...                                   # from load_skeleton
    factory = DiskStoreFactory.from_model(model, adapter, reader, dtype)
    store = factory(adapter.layers(), device)      # drop-in for LayerStore(layers, device)
    with factory.resident(adapter.pre_layer_modules(), device):
        inputs = capture_first_layer_inputs(model, adapter, calib, device)
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
from torch import nn

from ..adapters import Adapter
from ..models.checkpoint import dematerialize, materialize
from ..memory import empty_caches
from .residency import LayerStore, is_materialized


def module_prefixes(model: nn.Module, modules) -> list[str]:
    """State-dict prefixes (``"model.layers.3."``) of ``modules`` inside ``model``, found by identity."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    out = []
    for m in modules:
        if id(m) not in names and not _all(m):
            out.append("")  # holds no tensors (e.g. Gemma 2's logit soft-capping): nothing to read
            continue
        if id(m) not in names:
            raise ValueError(f"{type(m).__name__} is not a submodule of the model")
        out.append(names[id(m)] + "." if names[id(m)] else "")
    return out


class _WithComputed:
    """A tensor source plus the reader's computed (non-stored) buffers, which a pruned layer's
    source (the output folder) does not have."""

    def __init__(self, source, computed: dict):
        self.source, self.computed = source, computed

    def __contains__(self, name: str) -> bool:
        return name in self.source or name in self.computed

    def resolve(self, name: str):
        return name if name in self.source else None

    def get(self, name, dtype=None, device="cpu"):
        return self.source.get(name, dtype=dtype, device=device)

    @property
    def folder(self):
        return getattr(self.source, "folder", type(self.source).__name__)


class DiskLayerStore(LayerStore):
    """Lends decoder layers read from disk; a released layer goes back to ``meta``.

    ``layer_prefixes[i]`` is layer ``i``'s state-dict prefix in the checkpoint;
    ``dtype`` the compute dtype (``None``: the skeleton's). ``on_release(i, layer)``
    is called with the still-materialised layer before it is dropped (to write a
    final layer out). ``sources`` maps a layer index to where that layer is read from
    instead of ``reader`` (layers already pruned); it may be shared between stores
    (see :class:`DiskStoreFactory`). ``model``, the skeleton the layers belong to, is needed
    only by :meth:`resident`. Every layer of ``layers`` is dematerialised here.
    """

    def __init__(self, layers: nn.ModuleList, device, reader, layer_prefixes: list[str],
                 dtype: torch.dtype | None = None, on_release: Callable[[int, nn.Module], None] | None = None,
                 sources: dict | None = None, model: nn.Module | None = None, reads: dict | None = None):
        super().__init__(layers, device, offload_device="meta")
        # layer reads and their seconds, shared by a factory's stores (the report's "layer reads")
        self.reads = reads if reads is not None else {"count": 0, "seconds": 0.0}
        if len(layer_prefixes) != len(layers):
            raise ValueError(f"{len(layer_prefixes)} prefixes for {len(layers)} layers")
        self.reader, self.prefixes, self.dtype = reader, list(layer_prefixes), dtype
        self.on_release = on_release
        self.sources = sources if sources is not None else {}
        self.model = model
        for layer in layers:
            dematerialize(layer)

    def source(self, i: int):
        """Where layer ``i`` is read from: its override, else the checkpoint."""
        src = self.sources.get(i)
        if src is None:
            return self.reader
        return _WithComputed(src, getattr(self.reader, "computed", {}))

    def set_source(self, i: int, source) -> None:
        """Read layer ``i`` from ``source`` from now on (``get(name, dtype, device)``, ``in``)."""
        self.sources[i] = source

    def fetch(self, i: int) -> nn.Module:
        if self.borrowed:
            raise RuntimeError(f"layer {sorted(self.borrowed)} still on the device while fetching layer {i}")
        layer = self.layers[i]
        t0 = time.perf_counter()
        try:
            materialize(layer, self.prefixes[i], self.source(i), self.device, self.dtype)
        except BaseException:
            dematerialize(layer)
            raise
        self.reads["count"] += 1
        self.reads["seconds"] += time.perf_counter() - t0
        self.borrowed.add(i)
        return layer

    def release(self, i: int) -> None:
        layer = self.layers[i]
        try:
            if self.on_release is not None:
                self.on_release(i, layer)
        finally:
            dematerialize(layer)
            self.borrowed.discard(i)
            empty_caches(self.device)

    def finish(self) -> None:
        """Drop a layer still borrowed (an interrupted pass) without calling ``on_release``."""
        for i in list(self.borrowed):
            dematerialize(self.layers[i])
        self.borrowed.clear()
        close = getattr(self.reader, "close", None)
        if close is not None:
            close()

    def resident_layers(self) -> list[int]:
        """Indices of the layers holding real tensors (at most one outside ``fetch``/``release``)."""
        return [i for i, layer in enumerate(self.layers) if is_materialized(layer)]

    def resident(self, modules, device=None, model: nn.Module | None = None):
        """Context manager: non-layer ``modules`` (embeddings, final norm, LM head) materialised on
        ``device`` (default: the store's) for the block; see :func:`resident`."""
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("pass the model (or build the store with model=..., as DiskStoreFactory.from_model does)")
        return resident(model, modules, self.reader, device if device is not None else self.device, self.dtype)


@contextlib.contextmanager
def resident(model: nn.Module, modules, reader, device, dtype: torch.dtype | None = None):
    """Give ``modules`` (submodules of ``model``) real tensors from ``reader`` inside the block only.

    For :meth:`Adapter.pre_layer_modules` around first-layer capture and
    :meth:`Adapter.head_modules` around the loss; tensors the modules already held are
    kept, only those materialised here are dropped again.
    """
    modules = list(modules)
    prefixes = module_prefixes(model, modules)
    was_meta = [[t.is_meta for t in _all(m)] for m in modules]
    try:
        for m, p in zip(modules, prefixes):
            materialize(m, p, reader, device, dtype)
        yield modules
    finally:
        for m, flags in zip(modules, was_meta):
            if all(flags):
                dematerialize(m)
        if all(all(flags) for flags in was_meta) and hasattr(model, "tie_weights"):
            model.tie_weights()  # materialising one side of a tie gave it its own parameter
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def _all(module: nn.Module):
    return [*module.parameters(), *module.buffers()]


class DiskStoreFactory:
    """``factory(layers, device) -> DiskLayerStore``: what ``LayerStream`` and ``module_sensitivities``
    call in place of ``LayerStore(layers, device)``.

    Stores made by one factory share ``sources`` (layers already pruned are read from
    their new home in every later pass) and ``on_release``.
    """

    def __init__(self, reader, layer_prefixes: list[str], dtype: torch.dtype | None = None,
                 on_release: Callable[[int, nn.Module], None] | None = None, model: nn.Module | None = None):
        self.reader, self.prefixes, self.dtype = reader, list(layer_prefixes), dtype
        self.on_release = on_release
        self.sources: dict = {}
        self.model = model
        self.reads = {"count": 0, "seconds": 0.0}  # every store's layer reads (DiskLayerStore.reads)

    @classmethod
    def from_model(cls, model: nn.Module, adapter: Adapter, reader, dtype: torch.dtype | None = None,
                   on_release: Callable[[int, nn.Module], None] | None = None) -> "DiskStoreFactory":
        return cls(reader, module_prefixes(model, adapter.layers()), dtype, on_release, model=model)

    def __call__(self, layers: nn.ModuleList, device) -> DiskLayerStore:
        return DiskLayerStore(layers, device, self.reader, self.prefixes, self.dtype, self.on_release, self.sources,
                              self.model, self.reads)

    def set_source(self, i: int, source) -> None:
        self.sources[i] = source

    def resident(self, modules, device, model: nn.Module | None = None):
        """Context manager: ``modules`` of the model materialised on ``device`` for the block
        (for :func:`capture_first_layer_inputs` before a store exists; see :func:`resident`)."""
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("pass the model (or build the factory with DiskStoreFactory.from_model)")
        return resident(model, modules, self.reader, device, self.dtype)


def export_sink(writer, prefixes: list[str], factory: DiskStoreFactory | None = None):
    """An ``on_release`` callback writing each released layer's state dict to ``writer``
    (a :class:`~structprune.export.shards.ShardWriter`) under its prefix, and, with
    ``factory``, reading the layer back from ``writer`` in later passes.

    Use it for the pass that leaves each layer final, then set ``factory.on_release = None``:
    a tensor is written once, a second release of the layer to the same writer is an error.
    """
    def sink(i: int, layer: nn.Module) -> None:
        writer.add_module(prefixes[i], layer)
        if factory is not None:
            factory.set_source(i, writer)
    return sink
