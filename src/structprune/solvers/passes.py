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

import contextlib
import os
import time
from typing import Any, Callable

from ..engine import LayerContext, distributed
from ..engine.journal import JOURNALS_APART
from ..surgery import layer_shapes

ENV_CHECKPOINT_SECONDS = "STRUCTPRUNE_CHECKPOINT_SECONDS"

Step = Callable[[LayerContext, Any], "tuple[Any, Any]"]


def run_pass(run, desc: str, step: Step, carry: Any = None, *, cuts: bool = False, final: bool = True,
             data: bool = True) -> tuple[list, Any]:
    """Run ``step`` over every decoder layer of ``run``; returns ``(results per layer, final carry)``.

    ``cuts``: the pass leaves the layers pruned (their home keeps what each released layer
    became; on disk it is written out); ``final=False`` when a later pass may supersede it.
    ``data=False`` (or a run without calibration windows) borrows the layers with no
    activations: ``ctx.inputs`` is None (data-free scorers).

    With a run journal (``run.journal``: a resumable disk-streamed run) the pass is checkpointed
    as it goes (:class:`Checkpoints`): a pass a killed run had finished is not run again (its
    results and carry are read back, and the layers it cut are described as cut), and one it was
    in continues after its last checkpointed layer."""
    streamed = data and run.calib is not None
    journal = run.journal.next_pass(desc) if run.journal is not None else None
    name = journal.folder.name if journal is not None else None  # its scratch writer's name
    results, start, start_inputs, shapes = [], 0, None, {}
    if journal is not None:
        done = journal.finished()
        state = journal.state() if done is None else None
        # Each rank continues from its own journal: they must stop at the same point (save_value's
        # commit barrier keeps them so; a mismatch is refused rather than left to deadlock).
        distributed.check_same("done" if done is not None else None if state is None else state[0],
                               f"where {desc!r} was interrupted", JOURNALS_APART)
        if done is not None:
            stored, carry = done
            if cuts:
                with run.home.cutting(final, name):
                    for i, record in enumerate(stored):
                        run.home.replay_cut(i, record["shapes"])
            return [record["result"] for record in stored], carry
        if state is not None:
            after, carry, start_inputs = state
            stored = [journal.result(i) for i in range(after + 1)]
            results, start = [record["result"] for record in stored], after + 1
            shapes = {i: record["shapes"] for i, record in enumerate(stored)}
    checkpoints = Checkpoints(run, journal, cuts)
    if streamed:
        passes = ((ctx, None) for ctx in run.stream(desc=desc, cuts=cuts, final=final, start=start,
                                                    start_inputs=start_inputs, name=name))
    else:
        passes = ((LayerContext(i, layer, None, run.device, run.adapter), None)
                  for i, layer in run.layers(desc=desc, cuts=cuts, final=final, start=start, name=name))
    prev = None
    try:
        for ctx, _ in passes:
            if ctx.index == start and cuts:
                for i, s in shapes.items():  # the layers cut before the kill, as the cut left them
                    run.home.replay_cut(i, s)
            if prev is not None:  # the previous layer is released (and written out) by now
                checkpoints.after(prev, results[-1], carry, ctx.inputs)
            result, carry = step(ctx, carry)
            if distributed.is_distributed():  # same statistics, same solver: the same layer on every rank
                distributed.check_same(distributed.tensor_digest(sorted(ctx.layer.state_dict().items())),
                                       f"layer {ctx.index} after {desc}")
            results.append(result)
            prev = ctx
    except BaseException:
        # Close the pass now (its stream's finally blocks: timing, the layers' home), not when the
        # traceback is freed; the error raised is the step's, whatever the close does.
        with contextlib.suppress(Exception):
            passes.close()
        raise
    if prev is not None:
        checkpoints.after(prev, results[-1], carry, None)
    if journal is not None:
        checkpoints.flush()
        journal.finish(len(results), carry)
    return results, carry


class Checkpoints:
    """When and what a journaled pass saves: after a layer is released, its result and pruned
    shapes, the shard writer's pending tensors, the carry and the next layer's inputs; at most
    once per ``$STRUCTPRUNE_CHECKPOINT_SECONDS`` (default 60: the inputs of a layer can be large)
    except after the last layer. Results wait in memory until the next save."""

    def __init__(self, run, journal, cuts: bool):
        self.run, self.journal, self.cuts = run, journal, cuts
        self.every = float(os.environ.get(ENV_CHECKPOINT_SECONDS, "60"))
        self.last = time.monotonic()
        self.waiting: list[tuple[int, dict]] = []
        self.state = None

    def after(self, ctx, result, carry, next_inputs) -> None:
        if self.journal is None:
            return
        self.waiting.append((ctx.index, {"result": result, "shapes": layer_shapes(ctx.layer) if self.cuts else {}}))
        due = next_inputs is None or time.monotonic() - self.last >= self.every
        # rank 0's clock decides for all: a rank that checkpointed alone would wait in its barrier
        if next_inputs is not None and not distributed.broadcast(due):
            return
        self._save(ctx.index, carry, next_inputs)

    def _save(self, index: int, carry, next_inputs) -> None:
        for i, record in self.waiting:
            self.journal.save_result(i, record)
        self.waiting = []
        self.run.home.checkpoint()
        if next_inputs is not None:
            self.journal.checkpoint(index, carry, next_inputs)
        self.last = time.monotonic()

    def flush(self) -> None:
        for i, record in self.waiting:
            self.journal.save_result(i, record)
        self.waiting = []
        self.run.home.checkpoint()


__all__ = ["Step", "run_pass"]
