"""Solvers: each method is a function ``(run) -> list[LayerPlan]`` that prunes ``run.model`` in place.

``run`` is a :class:`structprune.api.PruneRun` (model, adapter, calibration, config,
device). Every streamed pass is a per-layer step function run by the one loop
:func:`~structprune.solvers.passes.run_pass` (plain-data results and carries: resumable);
cutting and refitting a module is :mod:`structprune.solvers.modules`.
"""

from .flap import prune_flap
from .global_ref import prune_global
from .local import prune_local, prune_obs_local
from .structprune import prune_structprune

METHODS = {
    "magnitude-sp": prune_local,
    "wanda-sp": prune_local,
    "flap": prune_flap,
    "obs-local": prune_obs_local,
    "global": prune_global,
    "structprune": prune_structprune,
}
# Methods that score from the weights alone (no calibration data with a data-free allocation).
DATA_FREE_METHODS = ("magnitude-sp",)

__all__ = ["DATA_FREE_METHODS", "METHODS"]
