"""Where decoder layers live between passes: in memory, or on disk with one layer resident.

A solver never cares which; it calls the run's home to

* make the :class:`LayerStore` of a pass (``home(layers, device)``),
* open a *cutting* pass (``with home.cutting(final):``), after which every layer the pass
  released is the pruned one (on disk: written out on release, and read back from there by
  later passes and by evaluation),
* snapshot and restore the dense layers between StructPrune iterations (in memory: copies;
  on disk: the meta skeleton and the layers' sources, which cost nothing, since the dense
  layers are re-read from the checkpoint),
* make non-layer modules (embeddings, final norm, LM head) resident for a block.

:class:`MemoryHome` is the model the user handed to :func:`structprune.prune`;
:class:`DiskHome` a checkpoint folder streamed by :func:`structprune.prune_checkpoint`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from pathlib import Path

import torch
from torch import nn

from .disk import DiskStoreFactory
from .residency import LayerStore, SwapLayerStore, moved_to

class MemoryHome:
    """Layers are modules of an in-memory model (CPU, or wherever the user put them)."""

    def __init__(self, swap: bool = False):
        self.swap = swap

    def __call__(self, layers: nn.ModuleList, device) -> LayerStore:
        return (SwapLayerStore if self.swap else LayerStore)(layers, device)

    def resident(self, modules, device):
        """``modules`` on ``device`` for the block (the LM head for the loss on the GPU), then back."""
        return moved_to(modules, device)

    @contextlib.contextmanager
    def cutting(self, final: bool, name: str | None = None):
        yield

    def checkpoint(self) -> None:
        """Nothing to persist: an in-memory model is not resumable."""

    def replay_cut(self, i: int, shapes: dict) -> None:
        raise NotImplementedError("an in-memory run cannot be resumed")

    def snapshot(self, layers: nn.ModuleList):
        return [copy.deepcopy(layer).to("cpu") for layer in layers]

    def restore(self, layers: nn.ModuleList, snap) -> None:
        for i, layer in enumerate(snap):
            layers[i] = copy.deepcopy(layer)


class DiskHome:
    """Layers of a meta skeleton read from ``reader`` (a checkpoint) one at a time.

    ``writer`` is the output's :class:`~structprune.export.shards.ShardWriter`: a final
    cutting pass writes each layer there on release, cast to ``out_dtype``. A non-final
    cutting pass (StructPrune with several iterations, where the best iterate is chosen at
    the end) writes to a scratch writer under ``scratch``; :meth:`assemble` then copies the
    chosen layers into ``writer``.
    """

    def __init__(self, model: nn.Module, adapter, reader, writer, *, dtype: torch.dtype, out_dtype: torch.dtype,
                 scratch: str | Path, resume: bool = False):
        self.factory = DiskStoreFactory.from_model(model, adapter, reader, dtype=dtype)
        self.model, self.adapter, self.reader, self.writer = model, adapter, reader, writer
        self.resume = resume  # scratch writers left by a killed run are continued, not restarted
        self.active = None  # the writer of the cutting pass in progress
        self.out_dtype = out_dtype
        self.scratch = Path(scratch)
        self._passes = itertools.count(1)

    def __call__(self, layers: nn.ModuleList, device):
        return self.factory(layers, device)

    def resident(self, modules, device):
        return self.factory.resident(modules, device)

    def _sink(self, writer):
        prefixes, factory = self.factory.prefixes, self.factory

        def sink(i: int, layer: nn.Module) -> None:
            for key, t in layer.state_dict().items():
                writer.add(prefixes[i] + key, t.detach().to("cpu", self._stored_dtype(prefixes[i] + key, t)))
            factory.set_source(i, writer)
        return sink

    def _stored_dtype(self, name: str, t: torch.Tensor) -> torch.dtype:
        """The dtype ``name`` had in the checkpoint (a float32 norm in a bf16 model stays float32);
        tensors new to the pruned model (refit biases) take the checkpoint's dtype."""
        if not t.is_floating_point():
            return t.dtype
        stored = self.reader.stored_dtype_of(name)  # a converted tensor (3D MoE experts): its sources'
        return stored if stored is not None else self.out_dtype

    @contextlib.contextmanager
    def cutting(self, final: bool, name: str | None = None):
        """Layers released inside the block are written out (``final``: to the output; else to a
        scratch writer named ``name``, by default the pass's number)."""
        from ..export.shards import ShardWriter

        if final:
            writer = self.writer
        else:
            folder = self.scratch / (name or f"pass-{next(self._passes)}")
            # A scratch pass holds no more in RAM than the output writer does (its shard size).
            writer = (ShardWriter.resume(folder, self.writer.max_shard_size) if self.resume and folder.exists()
                      else ShardWriter(folder, self.writer.max_shard_size, overwrite=True))
        self.factory.on_release = self._sink(writer)
        self.active = writer
        try:
            yield
            writer.checkpoint()  # the pass's last layers survive a kill too (the run journal's finish)
        finally:
            self.factory.on_release = None
            self.active = None

    def checkpoint(self) -> None:
        """Make the layers written so far by the cutting pass in progress survive a kill."""
        if self.active is not None:
            self.active.checkpoint()

    def replay_cut(self, i: int, shapes: dict) -> None:
        """Layer ``i`` was cut and written by the cutting pass in progress before a kill: give the
        skeleton's layer its pruned shapes (``shapes``: state-dict key -> shape) and read it from
        that pass's writer, as if the pass had just released it."""
        from ..surgery import reshape_meta_layer

        reshape_meta_layer(self.adapter, self.model.get_submodule(self.factory.prefixes[i][:-1]), shapes)
        self.factory.set_source(i, self.active)

    def snapshot(self, layers: nn.ModuleList):
        # Meta modules and a dict of sources: a snapshot costs no memory.
        return [copy.deepcopy(layer) for layer in layers], dict(self.factory.sources)

    def restore(self, layers: nn.ModuleList, snap) -> None:
        metas, sources = snap
        for i, layer in enumerate(metas):
            layers[i] = copy.deepcopy(layer)
        self.factory.sources.clear()
        self.factory.sources.update(sources)

    def assemble(self) -> None:
        """Put every tensor of the pruned model into the output writer, under the model's own names
        (as ``save_pretrained`` writes them): layers from where their last cutting pass left them
        (already there after a final pass), the rest (embeddings, norms, LM head) from the
        checkpoint in their stored dtype; tied weights once. One tensor in memory at a time."""
        layer_names = set()
        for i, prefix in enumerate(self.factory.prefixes):
            src = self.factory.sources.get(i)
            names = [prefix + k for k in self.model.get_submodule(prefix[:-1]).state_dict()]
            layer_names.update(names)
            if src is self.writer:
                continue
            for name in names:  # never cut (or cut in a scratch pass): copy from its source
                if src is not None:
                    t = src.get(name)
                    self.writer.add(name, t.to(self._stored_dtype(name, t)))
                else:
                    self.writer.add(name, self.reader.get(name))
        seen = set()
        for name, t in self.model.state_dict(keep_vars=True).items():
            if name in layer_names or id(t) in seen or not self.reader.stored_names(name):
                continue  # a layer; tied to a tensor already written (lm_head = embeddings); computed
            seen.add(id(t))
            self.writer.add(name, self.reader.get(name))
