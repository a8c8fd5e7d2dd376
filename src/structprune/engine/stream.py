"""The layer-streaming loop: one decoder layer on the compute device at a time.

    for ctx in LayerStream(model, adapter, calib, device):
        stats = ctx.collect()          # statistics of this layer on the pruned model's inputs
        ...decide and cut ctx.layer... # solver's business
    # leaving the body: ctx.layer's outputs become the next layer's inputs

Inputs (``LayerInputs``) live in activation stores (RAM up to the activation budget, disk
beyond: engine/activations.py) and stream through the layer in chunks.
With ``track_dense=True`` the dense model's trajectory is streamed alongside
(``ctx.dense_inputs`` / ``ctx.dense_outputs``), computed before the solver changes the layer.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..adapters import Adapter
from . import distributed
from .capture import LayerInputs, capture_first_layer_inputs, run_layer
from .clock import timed
from .residency import LayerStore, SwapLayerStore
from .stats import MODULES, collect_stats

log = logging.getLogger(__name__)


@dataclass
class LayerContext:
    index: int
    layer: torch.nn.Module
    inputs: LayerInputs
    device: torch.device
    adapter: Adapter
    dense_inputs: LayerInputs | None = None
    dense_outputs: LayerInputs | None = None
    outputs: LayerInputs | None = None  # set by the solver to skip the final forward pass

    def collect(self, modules=MODULES, gram: bool = True, return_outputs: bool = False):
        """Statistics of ``modules`` of this layer, on the (pruned) model's own inputs."""
        return collect_stats(self.adapter, self.layer, self.inputs, self.device, modules,
                             gram=gram, where=f"layer {self.index}", return_outputs=return_outputs)


def check_finite_weights(layer: torch.nn.Module, where: str) -> None:
    """Refuse a layer with NaN or Inf weights (a corrupt checkpoint): it would be pruned and
    written out as if nothing were wrong. Names the first offending tensor."""
    for name, t in layer.named_parameters():
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            from ..errors import StructPruneError

            raise StructPruneError(f"{where}: {name} holds NaN or Inf weights; the checkpoint is corrupt")


class LayerStream:
    """Iterate over decoder layers with calibration activations flowing through them."""

    def __init__(self, model, adapter: Adapter, calib: torch.Tensor, device, batch_size: int = 1,
                 track_dense: bool = False, swap: bool = False, progress: bool = True,
                 desc: str = "layers", inputs: LayerInputs | None = None, store_factory=None,
                 start: int = 0, start_inputs: LayerInputs | None = None, start_dense: LayerInputs | None = None):
        self.model, self.adapter, self.calib = model, adapter, calib
        # ``store_factory(layers, device) -> LayerStore`` (engine/homes.py), with ``resident(modules,
        # device)`` for the embeddings of a model on disk; None: a LayerStore (SwapLayerStore with swap).
        self.store_factory = store_factory
        self.device = torch.device(device)
        self.batch_size, self.track_dense = batch_size, track_dense
        self.swap, self.progress, self.desc = swap, progress, desc
        self.inputs = inputs
        # A resumed pass begins at layer ``start`` with that layer's inputs (and dense inputs) as a
        # killed run had them (engine/journal.py); layers before it are not visited.
        if start and start_inputs is None:
            raise ValueError("a stream starting after layer 0 needs that layer's inputs")
        self.start, self.start_inputs, self.start_dense = start, start_inputs, start_dense

    def first_inputs(self) -> LayerInputs:
        if self.inputs is None:
            resident = getattr(self.store_factory, "resident", None)
            with resident(self.adapter.pre_layer_modules(), self.device) if resident else contextlib.nullcontext():
                # A distributed run's rank captures only its own chunks (engine/distributed.py).
                calib = distributed.local_windows(self.calib, self.batch_size)
                self.inputs = capture_first_layer_inputs(self.model, self.adapter, calib, self.device,
                                                         self.batch_size)
        return self.inputs

    def __iter__(self):
        if self.start:
            inputs, dense = self.start_inputs, self.start_dense
        else:
            inputs = self.first_inputs()
            dense = inputs.clone() if self.track_dense else None  # a new store: spills beyond the budget
        layers = self.adapter.layers()
        store = (self.store_factory or (SwapLayerStore if self.swap else LayerStore))(layers, self.device)
        try:
            for i in tqdm(range(self.start, len(layers)), initial=self.start, total=len(layers), desc=self.desc,
                          disable=not self.progress):
                with timed("layer io"):
                    layer = store.fetch(i)
                check_finite_weights(layer, f"layer {i}")
                ctx = LayerContext(i, layer, inputs, self.device, self.adapter, dense_inputs=dense)
                if self.track_dense:
                    ctx.dense_outputs = run_layer(layer, dense, self.device)
                yield ctx
                inputs = ctx.outputs if ctx.outputs is not None else run_layer(layer, inputs, self.device)
                dense = ctx.dense_outputs
                with timed("layer io"):
                    store.release(i)
        finally:
            store.finish()
