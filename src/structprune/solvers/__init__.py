"""Solvers: each method is a function ``(run) -> list[LayerPlan]`` that prunes ``run.model`` in place.

``run`` is a :class:`structprune.api.PruneRun` (model, adapter, calibration, config,
device) and ``run.stream()`` gives the layer-streaming loop.
"""

from .local import prune_local

METHODS = {
    "magnitude-sp": prune_local,
    "wanda-sp": prune_local,
}

__all__ = ["METHODS"]
