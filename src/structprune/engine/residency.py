"""Which decoder layers are materialised on the compute device.

The engine never touches ``model.layers[i]`` directly: it borrows a layer from a
:class:`LayerStore` and gives it back. ``LayerStore`` moves the layer between the
compute device and CPU memory. ``SwapLayerStore`` goes further and keeps a released
layer's tensors outside the module (the module itself sits on the ``meta`` device),
so at any moment only the borrowed layer holds real tensors: this is the memory model
of method.md made checkable, and the base of streaming layers from disk.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from ..memory import empty_caches


def _tensors(module: nn.Module):
    for mod_name, mod in module.named_modules():
        for name, p in mod._parameters.items():
            if p is not None:
                yield mod, name, p, True
        for name, b in mod._buffers.items():
            if b is not None:
                yield mod, name, b, False


@contextlib.contextmanager
def moved_to(modules, device):
    """``modules`` (of an in-memory model) on ``device`` for the block, then back where each was."""
    modules = list(modules)
    homes = [next(m.parameters(), torch.empty(0)).device for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield modules
    finally:
        for m, d in zip(modules, homes):
            m.to(d)


def is_materialized(module: nn.Module) -> bool:
    return any(not t.is_meta for _, _, t, _ in _tensors(module))


class LayerStore:
    """Lends decoder layers to the compute device one at a time (moves them there and back)."""

    def __init__(self, layers: nn.ModuleList, device: torch.device | str, offload_device="cpu"):
        self.layers = layers
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.borrowed: set[int] = set()

    def __len__(self) -> int:
        return len(self.layers)

    def fetch(self, i: int) -> nn.Module:
        if self.borrowed:
            raise RuntimeError(f"layer {sorted(self.borrowed)} still on the device while fetching layer {i}")
        self.borrowed.add(i)
        return self.layers[i].to(self.device)

    def release(self, i: int) -> None:
        self.layers[i].to(self.offload_device)
        self.borrowed.discard(i)
        empty_caches(self.device)

    def finish(self) -> None:
        """Leave every layer materialised on the offload device (the normal model state)."""


class SwapLayerStore(LayerStore):
    """Keeps released layers' tensors in a side dictionary; the modules hold only meta tensors."""

    def __init__(self, layers: nn.ModuleList, device, offload_device="cpu"):
        super().__init__(layers, device, offload_device)
        self._saved: dict[int, list] = {}
        for i in range(len(layers)):
            self._swap_out(i)

    def _swap_out(self, i: int) -> None:
        saved = []
        for mod, name, t, is_param in _tensors(self.layers[i]):
            saved.append((mod, name, t.detach().to(self.offload_device), is_param))
            meta = t.detach().to("meta")
            if is_param:
                mod._parameters[name] = nn.Parameter(meta, requires_grad=t.requires_grad)
            else:
                mod._buffers[name] = meta
        self._saved[i] = saved

    def _swap_in(self, i: int, device: torch.device) -> None:
        for mod, name, t, is_param in self._saved.pop(i):
            t = t.to(device)
            if is_param:
                mod._parameters[name] = nn.Parameter(t, requires_grad=False)
            else:
                mod._buffers[name] = t

    def fetch(self, i: int) -> nn.Module:
        if self.borrowed:
            raise RuntimeError(f"layer {sorted(self.borrowed)} still on the device while fetching layer {i}")
        self.borrowed.add(i)
        self._swap_in(i, self.device)
        return self.layers[i]

    def release(self, i: int) -> None:
        self._swap_out(i)
        self.borrowed.discard(i)
        empty_caches(self.device)

    def finish(self) -> None:
        for i in list(self._saved):
            self._swap_in(i, self.offload_device)
