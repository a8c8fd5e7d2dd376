"""Per-run pictures (plots.py): kept widths per layer, convergence, and no failed run without matplotlib."""

from __future__ import annotations

import json
import sys

import pytest

from structprune import plots

PNG = b"\x89PNG\r\n\x1a\n"
BEFORE = [{"heads": 4, "kv_heads": 2, "mlp": 37}] * 3
AFTER = [{"heads": 2, "kv_heads": 1, "mlp": 20}, {"heads": 4, "kv_heads": 2, "mlp": 30},
         {"heads": 3, "kv_heads": 2, "mlp": 12}]


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 2000


def test_widths_and_convergence_plots_are_pngs(tmp_path):
    assert _is_png(plots.plot_widths(BEFORE, AFTER, tmp_path / "w.png"))
    residuals = {"primal_residual": [1.0, 0.3, 0.05], "dual_residual": [float("nan"), 0.2, 0.01],
                 "objective": [0.5, 0.4, 0.39]}
    assert _is_png(plots.plot_convergence(residuals, tmp_path / "c.png"))
    with pytest.raises(ValueError, match="depth"):
        plots.plot_widths(BEFORE, AFTER[:2], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="non-empty"):
        plots.plot_convergence({"primal_residual": []}, tmp_path / "empty.png")


def test_convergence_series_reads_iterations_in_order():
    log = [{"layer": 0, "kept": 3}, {"iteration": 2, "primal_residual": 0.1, "dual_residual": 0.2, "objective": 1.0},
           {"iteration": 1, "primal_residual": 0.5, "dual_residual": None, "objective": 2.0}, {"chosen_iteration": 2}]
    # dual_residual is missing (None) in one iteration: left out rather than drawn with a hole.
    assert plots.convergence_series(log) == {"primal_residual": [0.5, 0.1], "objective": [2.0, 1.0]}
    assert plots.convergence_series([]) == {}


def test_write_run_plots_names_what_it_drew(tmp_path):
    report = {"method": "structprune", "sparsity_achieved": 0.3, "layers_before": BEFORE, "layers": AFTER,
              "solver_log": [{"iteration": 1, "primal_residual": 1.0, "objective": 2.0}]}
    # the one-shot pass (one iteration) gets its point; a log without iterations (other methods) none
    assert plots.write_run_plots(report, tmp_path) == {"widths": "widths.png", "convergence": "convergence.png"}
    assert plots.write_run_plots({**report, "solver_log": [{"layer": 0}]}, tmp_path) == {"widths": "widths.png"}
    report["solver_log"].append({"iteration": 2, "primal_residual": 0.1, "objective": 1.5})
    got = plots.write_run_plots(report, tmp_path)
    assert got == {"widths": "widths.png", "convergence": "convergence.png"}
    assert _is_png(tmp_path / "widths.png") and _is_png(tmp_path / "convergence.png")


def test_missing_matplotlib_is_a_note_not_an_error(tmp_path, monkeypatch):
    # None in sys.modules makes `import matplotlib.figure` raise ImportError, as on a machine without it.
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    report = {"method": "wanda-sp", "sparsity_achieved": 0.4, "layers_before": BEFORE, "layers": AFTER}
    got = plots.write_run_plots(report, tmp_path)
    assert set(got) == {"note"} and "matplotlib is not installed" in got["note"]
    assert list(tmp_path.iterdir()) == []


def test_a_drawing_error_is_a_note_not_an_error(tmp_path):
    report = {"method": "wanda-sp", "sparsity_achieved": 0.4, "layers_before": BEFORE, "layers": AFTER[:2]}
    got = plots.write_run_plots(report, tmp_path)
    assert "widths" not in got and "ValueError" in got["note"]


def test_the_cli_run_folder_has_the_widths_plot(tmp_path, make_tiny_llama, byte_tokenizer, monkeypatch):
    from structprune.cli import main

    model = make_tiny_llama()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    byte_tokenizer.save_pretrained(folder)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"The quick brown fox {i} jumps over the lazy dog." for i in range(400)))
    out = tmp_path / "out"
    drawn = []
    real = plots.plot_widths
    monkeypatch.setattr(plots, "plot_widths", lambda *a, **k: drawn.append(a[2]) or real(*a, **k))
    assert main(["prune", str(folder), "--sparsity", "0.4", "--method", "wanda-sp", "--calib", str(calib),
                 "--nsamples", "2", "--seqlen", "64", "--eval", "", "--eval-seqlen", "128", "--mlp-multiple", "1",
                 "--output", str(out),
                 "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["plots"] == {"widths": "widths.png"}
    assert _is_png(out / report["plots"]["widths"])
    assert len(drawn) == 1  # drawn once, by the export, not again by the CLI


def test_an_admm_run_gets_its_convergence_plot(tmp_path, one_torch_thread):
    """StructPrune with several iterations logs residuals per iteration; the run's pictures include them."""
    from tiny import calib_ids, tiny_llama

    from structprune import api

    r = api.prune(tiny_llama(layers=3), calib_ids(6, 24), device="cpu", progress=False, method="structprune",
                  sparsity=0.4, seqlen=24, iterations=3, rho=0.05)  # rho 0.05: the kept sets move, all 3 run
    series = plots.convergence_series(r.report["solver_log"])
    assert set(series) == {"primal_residual", "dual_residual", "objective"} and len(series["primal_residual"]) == 3
    assert plots.write_run_plots(r.report, tmp_path) == {"widths": "widths.png", "convergence": "convergence.png"}
    assert _is_png(tmp_path / "convergence.png")


def test_a_one_shot_structprune_run_gets_its_point_with_the_tolerances(tmp_path, one_torch_thread, monkeypatch):
    """The default (one-shot) StructPrune run is ADMM's first iteration: its convergence picture
    shows where the primal residual stands against its stopping tolerance (no dual residual: nothing
    ran that it could measure) and the objective."""
    from tiny import calib_ids, tiny_llama

    from structprune import api

    r = api.prune(tiny_llama(layers=3), calib_ids(6, 24), device="cpu", progress=False, method="structprune",
                  sparsity=0.4, seqlen=24)
    seen = {}
    real = plots.plot_convergence
    monkeypatch.setattr(plots, "plot_convergence", lambda s, p, title="", tolerances=None: seen.update(
        series=s, tolerances=tolerances) or real(s, p, title=title, tolerances=tolerances))
    assert plots.write_run_plots(r.report, tmp_path) == {"widths": "widths.png", "convergence": "convergence.png"}
    (entry,) = [e for e in r.report["solver_log"] if "iteration" in e]
    assert seen["series"]["primal_residual"] == [entry["primal_residual"]]
    assert seen["tolerances"] == {"primal_residual": [entry["eps_primal"]]}
    assert set(seen["series"]) == {"primal_residual", "objective"} and entry["dual_residual"] is None
    assert _is_png(tmp_path / "convergence.png")
