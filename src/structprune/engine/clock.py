"""Seconds per operation inside a pass: where a prune spends its time below the pass level.

A pass's seconds per layer (the report's ``timings``) say which phase is slow, not why. The
solvers and the engine wrap their expensive operations in :func:`timed` (layer forwards,
statistics, the path's factor and inverse, the removal steps, refits, layer reads); while a
pass is being measured (:func:`measuring`) each operation's seconds are added to that pass's
table, *exclusive* of the operations nested inside it (a forward's time excludes the
statistics its hooks gather), so a pass's operations add up to at most its wall time and the
remainder is everything not wrapped.

On an accelerator the device is synchronised at each boundary (kernels are asynchronous, so
without it the seconds would land on whichever operation next waits; the passes already wait for
the device at every chunk, when activations come back to the CPU); outside a measured pass
:func:`timed` does nothing at all. In a distributed run ``statistics`` includes the wait at the
statistics' all-reduce.
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch

# Open measuring blocks, innermost last: (op -> seconds of that pass, its open operations as
# [start, seconds spent in operations nested inside]).
_active: list[tuple[dict, list]] = []


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextlib.contextmanager
def measuring(table: dict):
    """Add the seconds of every :func:`timed` operation run inside this block to ``table``.

    Passes open this block inside generators, which a failed run may close late (when its
    traceback is freed): closing removes only this block, so a late close cannot end or swap
    a newer pass's measurement."""
    entry = (table, [])
    _active.append(entry)
    try:
        yield table
    finally:  # its own entry, wherever it is now: a late close leaves newer blocks as they are
        del _active[next(j for j in range(len(_active) - 1, -1, -1) if _active[j] is entry)]


@contextlib.contextmanager
def timed(op: str):
    """Time the block as operation ``op`` of the pass being measured (exclusive of nested ones)."""
    if not _active:
        yield
        return
    table, stack = _active[-1]  # kept: a measuring block may end while this operation runs
    _sync()
    frame = [time.perf_counter(), 0.0]
    stack.append(frame)
    try:
        yield
    finally:
        _sync()
        total = time.perf_counter() - frame[0]
        del stack[next(j for j in range(len(stack) - 1, -1, -1) if stack[j] is frame)]  # normally the last
        table[op] = table.get(op, 0.0) + total - frame[1]
        if stack:
            stack[-1][1] += total


def timed_call(op: str):
    """Decorator: every call of the function is timed as operation ``op`` (see :func:`timed`)."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with timed(op):
                return fn(*args, **kwargs)
        return call
    return wrap


def breakdown(table: dict, total: float) -> dict:
    """``table``'s operations by seconds (largest first), and ``other``: the rest of ``total``
    (the pass's wall time) that no operation covers."""
    out = {op: table[op] for op in sorted(table, key=table.get, reverse=True)}
    out["other"] = max(total - sum(table.values()), 0.0)
    return out


__all__ = ["breakdown", "measuring", "timed", "timed_call"]
