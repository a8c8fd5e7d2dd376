"""A dense profiling pass: per-layer statistics of the unpruned model, before anything is cut.

Non-uniform allocations (OWL, global thresholds, FLAP) need something from every
layer before the first cut. This pass streams the dense model once, one layer on the
device at a time, and keeps only what ``fn`` returns per layer (scores, a ratio: small,
on CPU). The pruning pass that follows streams again on the pruned model's inputs.
"""

from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger(__name__)


def profile_layers(run, fn: Callable, desc: str = "profile", gram: bool = False) -> list:
    """``[fn(adapter, layer, stats) for each layer]`` on the dense model, streamed once.

    The layer's outputs from the statistics pass feed the next layer directly (no
    second forward), and nothing is changed in the model.
    """
    out = []
    if run.calib is None:  # data-free scores need the weights only
        return [fn(run.adapter, layer, None) for _, layer in run.layers(desc=desc)]
    for ctx in run.stream(desc=desc):
        stats, ctx.outputs = ctx.collect(gram=gram, return_outputs=True)
        out.append(fn(run.adapter, ctx.layer, stats))
    return out
