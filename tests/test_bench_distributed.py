"""benchmarks/distributed.py (issue 28): the Amdahl split of measured pass times, and one table
from several measurements (``--combine``). The measuring itself is tests/test_distributed.py's
torchrun test; here only the arithmetic and the files."""

import json

import pytest


def _result(model, t1, t2):
    runs = []
    for ranks, passes in ((1, t1), (2, t2)):
        runs.append({"ranks": ranks, "command": f"cmd {ranks}", "wall_seconds": sum(passes.values()) + 1,
                     "prune_seconds": sum(passes.values()), "passes": passes,
                     "peak_rss_bytes_per_rank": [2 ** 30] * ranks, "layer_read_seconds_per_rank": [1.0] * ranks,
                     "equal_to_one_process": {"bit_identical": True, "plans_equal": True},
                     "speedup": round(sum(t1.values()) / sum(passes.values()), 3)})
    return {"model": model, "nsamples": 4, "seqlen": 8, "method": "structprune", "iterations": 1, "sparsity": 0.3,
            "device": "cpu", "cpus": 2, "load_average_at_end": [2.0, 2.0, 2.0], "runs": runs}


def test_amdahl_split_recovers_the_serial_share_and_projects_8_ranks(load_benchmark):
    """A pass that halves is fully parallel (share 0, 8 ranks: t1 / 8); one that does not move is
    serial (share 1, no gain); 3/4 of t1 at 2 ranks is half serial: 8 ranks give t1 (1/2 + 1/16)."""
    bench = load_benchmark("distributed")
    rows = _result("m", {"fwd": 100.0, "solve": 40.0, "mixed": 80.0}, {"fwd": 50.0, "solve": 40.0, "mixed": 60.0})["runs"]
    split = bench.amdahl(rows)
    assert split["fwd"]["serial_share"] == 0.0 and split["fwd"]["projected_t8"] == 12.5
    assert split["solve"]["serial_share"] == 1.0 and split["solve"]["projected_speedup_8"] == 1.0
    assert split["mixed"]["serial_share"] == 0.5 and split["mixed"]["projected_t8"] == pytest.approx(80 * (0.5 + 0.5 / 8), abs=0.05)
    assert split["prune"]["t1"] == 220.0 and split["prune"]["t2"] == 150.0


def test_combine_writes_one_table_per_measurement(load_benchmark, tmp_path):
    bench = load_benchmark("distributed")
    files = []
    for name, t2 in (("small", {"fwd": 50.0}), ("big", {"fwd": 80.0})):
        res = _result(name, {"fwd": 100.0}, t2)
        res["amdahl"] = bench.amdahl(res["runs"])
        res["note"] = f"note of {name}"
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(res))
        files.append(str(f))
    out = tmp_path / "all"
    bench.main(["--combine", *files, "--out", str(out)])
    combined = json.loads(out.with_suffix(".json").read_text())
    assert [m["model"] for m in combined["measurements"]] == ["small", "big"]
    md = out.with_suffix(".md").read_text()
    assert md.count("## ") == 2 and "note of big" in md and "| 2 | 81.0 | 80.0 | 1.25 |" in md
    # a combined file can be combined again (it holds its measurements, not one)
    bench.main(["--combine", str(out.with_suffix(".json")), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again.md").read_text().count("## ") == 2
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path / "x")])  # neither a model nor --combine
