"""Layer-streaming engine: capture, residency, statistics, the streaming loop."""

from .capture import LayerInputs, capture_first_layer_inputs, run_layer
from .disk import DiskLayerStore, DiskStoreFactory
from .residency import LayerStore, SwapLayerStore, is_materialized
from .stats import ModuleStats, collect_stats
from .stream import LayerContext, LayerStream

__all__ = ["LayerInputs", "capture_first_layer_inputs", "run_layer", "LayerStore", "SwapLayerStore",
           "is_materialized", "ModuleStats", "collect_stats", "LayerContext", "LayerStream", "DiskLayerStore",
           "DiskStoreFactory"]
