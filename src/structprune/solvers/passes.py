"""The one loop every streamed solver pass runs: ``run_pass(run, desc, step, carry)``.

A pass visits the decoder layers in order, one resident at a time (``run.stream``), and calls

    layer_result, carry = step(ctx, carry)

for each layer. ``ctx`` is the :class:`~structprune.engine.LayerContext` (the layer, its inputs
on the pruned model's trajectory; ``ctx.outputs`` may be set by the step to spare the final
forward). ``carry`` is what flows from one layer to the next (the dense trajectory's inputs,
a rounding carry, ...). Both ``layer_result`` and ``carry`` hold only plain data: tensors,
:class:`~structprune.engine.LayerInputs` / activation stores, numbers, strings, lists and
dicts, never modules or solver objects. That is the contract that lets a pass be checkpointed
after any layer and resumed (the results so far, the carry and the pruned layers are all
there is), and it is why there is exactly one loop: resume support has one place to hook.

Solvers build their step functions from factories that close over read-only inputs of the
pass (the config, allocations decided before it, results of earlier passes): those are
themselves plain data saved by the earlier phases.
"""

from __future__ import annotations

from typing import Any, Callable

from ..engine import LayerContext

Step = Callable[[LayerContext, Any], "tuple[Any, Any]"]


def run_pass(run, desc: str, step: Step, carry: Any = None, *, cuts: bool = False, final: bool = True,
             data: bool = True) -> tuple[list, Any]:
    """Run ``step`` over every decoder layer of ``run``; returns ``(results per layer, final carry)``.

    ``cuts``: the pass leaves the layers pruned (their home keeps what each released layer
    became; on disk it is written out); ``final=False`` when a later pass may supersede it.
    ``data=False`` (or a run without calibration windows) borrows the layers with no
    activations: ``ctx.inputs`` is None (data-free scorers)."""
    results = []
    if data and run.calib is not None:
        for ctx in run.stream(desc=desc, cuts=cuts, final=final):
            result, carry = step(ctx, carry)
            results.append(result)
    else:
        for i, layer in run.layers(desc=desc, cuts=cuts, final=final):
            ctx = LayerContext(i, layer, None, run.device, run.adapter)
            result, carry = step(ctx, carry)
            results.append(result)
    return results, carry


__all__ = ["Step", "run_pass"]
