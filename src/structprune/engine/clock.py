"""Seconds per operation inside a pass: where a prune spends its time below the pass level.

A pass's seconds per layer (the report's ``timings``) say which phase is slow, not why. The
solvers and the engine wrap their expensive operations in :func:`timed` (layer forwards,
statistics, the path's factor and inverse, the removal steps, refits, layer reads); while a
pass is being measured (:func:`measuring`) each operation's seconds are added to that pass's
table, *exclusive* of the operations nested inside it (a forward's time excludes the
statistics its hooks gather), so a pass's operations add up to at most its wall time and the
remainder is everything not wrapped.

On an accelerator the device is synchronised at each boundary (kernels are asynchronous, so
without it the seconds would land on whichever operation next waits); outside a measured
pass :func:`timed` does nothing at all.
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch

_table: dict | None = None  # op -> seconds of the pass being measured (None: not measuring)
_stack: list[list] = []  # open operations: [start, seconds spent in operations nested inside]


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextlib.contextmanager
def measuring(table: dict):
    """Add the seconds of every :func:`timed` operation run inside this block to ``table``."""
    global _table, _stack
    outer, outer_stack = _table, _stack
    _table, _stack = table, []
    try:
        yield table
    finally:
        _table, _stack = outer, outer_stack


@contextlib.contextmanager
def timed(op: str):
    """Time the block as operation ``op`` of the pass being measured (exclusive of nested ones)."""
    table = _table
    if table is None:
        yield
        return
    _sync()
    frame = [time.perf_counter(), 0.0]
    _stack.append(frame)
    try:
        yield
    finally:
        _sync()
        total = time.perf_counter() - frame[0]
        _stack.pop()
        table[op] = table.get(op, 0.0) + total - frame[1]
        if _stack:
            _stack[-1][1] += total


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
