"""engine/clock.py (issue 30): seconds per operation inside each pass, exclusive of nested
operations, in the report next to the seconds per layer."""

from __future__ import annotations

import time

import torch

from structprune import PruneConfig, prune
from structprune.engine.clock import breakdown, measuring, timed, timed_call


def test_nested_operations_are_counted_once_and_nothing_outside_a_measured_pass():
    with timed("outside"):  # not measuring: no table anywhere gets it
        time.sleep(0.01)
    table = {}
    with measuring(table):
        with timed("outer"):
            time.sleep(0.05)
            with timed("inner"):
                time.sleep(0.1)
        timed_call("inner")(time.sleep)(0.05)
    assert set(table) == {"outer", "inner"}
    assert 0.14 <= table["inner"] < 0.3  # both inner blocks
    assert 0.04 <= table["outer"] < 0.1  # its own 0.05 s, not the nested 0.1 s
    out = breakdown(table, 1.0)
    assert list(out) == ["inner", "outer", "other"] and abs(sum(out.values()) - 1.0) < 1e-12
    with measuring({}) as other:  # a new table takes over and the old one is restored after it
        with timed("x"):
            pass
    with measuring(table):
        with timed("y"):
            pass
    assert set(other) == {"x"} and "y" in table and "x" not in table


def test_report_has_operations_per_pass(make_tiny_llama):
    model = make_tiny_llama()
    calib = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    res = prune(model, calib, PruneConfig(method="structprune", sparsity=0.4, nsamples=4, seqlen=32, batch_size=2),
                progress=False)
    timings = res.report["timings"]
    profile, cut = timings["structprune profile"], timings["structprune iter 1"]
    for t, ops in ((profile, {"forward", "statistics", "factor", "inverse", "path", "layer io"}),
                   (cut, {"forward", "statistics", "factor", "inverse", "path", "refit", "objective", "layer io"})):
        assert ops <= set(t["operations"]), set(t["operations"])
        assert all(v >= 0 for v in t["operations"].values())
        # exclusive times: they add up to the pass's wall time (the rest is "other")
        assert abs(sum(t["operations"].values()) - t["seconds"]) < 1e-6 * max(1.0, t["seconds"])
    assert "refit" not in profile["operations"]  # the profile cuts nothing


def test_scale_table_shows_each_pass_operations(load_benchmark):
    scale = load_benchmark("scale")
    row = {"shape": "llama-2-7b", "method": "structprune",
           "timings": {"layers": {"seconds": 0, "per_layer": []}, "resumed": False,
                       "structprune iter 1": {"seconds": 600.0, "per_layer": [600.0],
                                              "operations": {"inverse": 300.0, "forward": 120.0, "other": 180.0}}}}
    lines = scale.operations_table([row])
    body = [line for line in lines if line.startswith("| llama-2-7b")]
    assert body == ["| llama-2-7b | structprune | structprune iter 1 | 2.0 |  |  | 5.0 |  |  |  |  |  |  | 3.0 | 10.0 |"]
    assert scale.operations_table([]) == []


def test_a_pass_closed_late_cannot_break_a_newer_measurement():
    """A failed run's pass generator may be closed long after (when its traceback goes), in the middle
    of another pass's operation: that operation still lands in its own table, and afterwards nothing
    is being measured."""
    from structprune.engine import clock

    def old_pass(table):
        with measuring(table):
            yield

    stale = old_pass({})
    next(stale)  # paused inside its measuring block, as a pass whose step raised
    new = {}
    with measuring(new):
        with timed("outer"):
            stale.close()  # the late close: must not pop this block's frame or swap the table
            with timed("inner"):
                pass
    assert set(new) == {"outer", "inner"}
    assert clock._active == []
