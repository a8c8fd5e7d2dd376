"""A dense profiling pass: per-layer statistics of the unpruned model, before anything is cut.

Non-uniform allocations (OWL, global thresholds, FLAP) need something from every
layer before the first cut. This pass streams the dense model once, one layer on the
device at a time, and keeps only what ``fn`` returns per layer (scores, a ratio: small,
on CPU). The pruning pass that follows streams again on the pruned model's inputs.
"""

from __future__ import annotations

import logging
from typing import Callable

from .passes import run_pass

log = logging.getLogger(__name__)


def profile_layers(run, fn: Callable, desc: str = "profile", gram: bool = False) -> list:
    """``[fn(adapter, layer, stats) for each layer]`` on the dense model, streamed once.

    The layer's outputs from the statistics pass feed the next layer directly (no
    second forward), and nothing is changed in the model. ``fn`` returns plain data
    (tensors, numbers, dicts of them): it is a pass result (solvers/passes.py).
    """
    results, _ = run_pass(run, desc, profile_step(run, fn, gram))
    return results


def profile_step(run, fn: Callable, gram: bool):
    """Pass step of a dense profile: ``fn`` of the layer's statistics (None for a data-free pass)."""
    def step(ctx, carry):
        if ctx.inputs is None:  # data-free scores need the weights only
            return fn(run.adapter, ctx.layer, None), carry
        stats, ctx.outputs = ctx.collect(gram=gram, return_outputs=True)
        return fn(run.adapter, ctx.layer, stats), carry
    return step
