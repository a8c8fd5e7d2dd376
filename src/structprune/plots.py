"""Pictures of a pruning run, written next to ``report.json`` (issue 11, item 7).

* ``widths.png``: kept widths per decoder layer, before and after (query heads with the KV
  groups kept, and MLP channels): where the allocation put the budget, at a glance.
* ``convergence.png``: per-iteration residuals and objective of an iterative solver
  with their stopping tolerances (:func:`plot_convergence`; :func:`write_run_plots` draws
  it from any solver log with iterations: StructPrune's, one point for the one-shot pass).

matplotlib is a dependency; should it be missing anyway, or if drawing fails, the run
does not fail: :func:`write_run_plots` returns a note instead of file names, and the report
carries it. Figures are built with the object API (``matplotlib.figure.Figure``), never
pyplot, so no global backend or figure state is touched inside a user's process.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

WIDTHS_FILE = "widths.png"
CONVERGENCE_FILE = "convergence.png"
# Keys of an iteration entry of the solver log drawn by the convergence plot, when present.
CONVERGENCE_KEYS = ("primal_residual", "dual_residual", "objective")
# Their stopping tolerances, drawn dashed in the residuals' panels.
TOLERANCE_KEYS = ("eps_primal", "eps_dual")


def _figure(nrows: int, height: float):
    """A figure and its axes without pyplot; ImportError when matplotlib is missing."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, height))
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, axes


def plot_widths(before: Sequence[Mapping], after: Sequence[Mapping], path: str | Path, title: str = "") -> Path:
    """Kept query heads (and KV groups) and MLP channels per layer, dense against pruned, to
    ``path`` (PNG). ``before``/``after``: the report's ``layers_before``/``layers`` entries
    (``heads``, ``kv_heads``, ``mlp`` per layer)."""
    if len(before) != len(after):
        raise ValueError(f"widths before ({len(before)} layers) and after ({len(after)}) differ in depth")
    fig, (ax_h, ax_m) = _figure(2, 6)
    x = list(range(len(after)))
    for ax, key, label in ((ax_h, "heads", "query heads"), (ax_m, "mlp", "MLP channels")):
        ax.bar(x, [layer.get(key, 0) for layer in before], color="0.85", edgecolor="0.6", label="dense")
        ax.bar(x, [layer.get(key, 0) for layer in after], width=0.55, color="tab:blue", label="kept")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, 1.3 * max([layer.get(key, 0) for layer in (*before, *after)] + [1]))  # room for the legend
    if all("kv_heads" in layer for layer in after):
        ax_h.plot(x, [layer["kv_heads"] for layer in after], "o", color="tab:orange", ms=4, label="KV groups kept")
    ax_h.legend(fontsize=8, ncol=3, loc="upper right")
    ax_m.set_xlabel("decoder layer")
    ax_h.set_title(title or "kept widths per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_convergence(series: Mapping[str, Sequence[float]], path: str | Path, title: str = "",
                     tolerances: Mapping[str, Sequence[float]] | None = None) -> Path:
    """One panel per series (e.g. ``primal_residual``, ``dual_residual``, ``objective``: one
    value per iteration) against the iteration number, log scale where every value is
    positive, to ``path`` (PNG); ``tolerances`` (same keys) are drawn dashed in their series'
    panel, so a reader sees how far each residual is from stopping."""
    names = [n for n, v in series.items() if len(v) > 0]
    if not names:
        raise ValueError("plot_convergence needs at least one non-empty series")
    tolerances = tolerances or {}
    fig, axes = _figure(len(names), 2.2 * len(names) + 0.8)
    for ax, name in zip(axes, names):
        values = [float(v) for v in series[name]]
        it = list(range(1, len(values) + 1))
        ax.plot(it, values, marker="o", label=name.replace("_", " "))
        drawn = list(values)
        if tolerances.get(name):
            tol = [float(v) for v in tolerances[name]]
            ax.plot(range(1, len(tol) + 1), tol, ls="--", marker="x", label="stopping tolerance")
            ax.legend(fontsize=7)
            drawn += tol
        finite = [v for v in drawn if math.isfinite(v)]
        if finite and all(v > 0 for v in finite):
            ax.set_yscale("log")
        ax.set_ylabel(name.replace("_", " "))
        ax.grid(alpha=0.3)
    n = max(len(series[name]) for name in names)
    axes[-1].set_xlabel("iteration")
    axes[-1].set_xlim(0.5, n + 0.5)  # one iteration (the one-shot pass) is a point, not a range
    axes[-1].set_xticks(range(1, n + 1) if n <= 12 else range(1, n + 1, max(1, n // 10)))
    axes[0].set_title(title or "convergence")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def convergence_series(solver_log: Sequence[Mapping], keys: Sequence[str] = CONVERGENCE_KEYS) -> dict[str, list[float]]:
    """Per-iteration lists of ``keys`` from the entries of a solver log that carry an
    ``iteration`` number (in iteration order); a key absent from them is left out."""
    iters = sorted((e for e in solver_log if isinstance(e, Mapping) and "iteration" in e),
                   key=lambda e: e["iteration"])
    out = {}
    for key in keys:
        if iters and all(key in e and e[key] is not None for e in iters):
            out[key] = [float(e[key]) for e in iters]
    return out


def write_run_plots(report: Mapping, folder: str | Path) -> dict:
    """Draw the run's pictures into ``folder`` and return the report's ``plots`` entry: file
    names relative to ``folder`` (``widths``, and ``convergence`` for a solver log with
    iterations), plus a ``note`` when a picture could not be drawn. Never raises for
    a missing matplotlib or a drawing error: the pruned model matters more than its picture."""
    folder = Path(folder)
    out: dict = {}
    title = f"{report.get('method', '')} at sparsity {report.get('sparsity_achieved', float('nan')):.3f}"
    jobs = []
    if report.get("layers_before") and report.get("layers"):
        jobs.append(("widths", WIDTHS_FILE, lambda p: plot_widths(report["layers_before"], report["layers"], p,
                                                                   title=f"kept widths per layer, {title}")))
    log_entries = report.get("solver_log") or []
    series = convergence_series(log_entries)
    # StructPrune's one-shot pass is ADMM's first iteration: one point per panel, with the
    # tolerances, says how far from a consensus it stopped.
    tol = convergence_series(log_entries, TOLERANCE_KEYS)
    tolerances = {name: tol[key] for name, key in (("primal_residual", "eps_primal"), ("dual_residual", "eps_dual"))
                  if key in tol}
    if series:
        jobs.append(("convergence", CONVERGENCE_FILE, lambda p: plot_convergence(
            series, p, title=f"convergence, {title}", tolerances=tolerances)))
    notes = []
    for kind, name, draw in jobs:
        try:
            draw(folder / name)
            out[kind] = name
        except ImportError:
            notes.append("matplotlib is not installed (pip install matplotlib): no plots were drawn")
            break
        except Exception as exc:  # a picture must never cost the run its output
            log.warning("could not draw %s: %s", name, exc, exc_info=True)
            notes.append(f"{kind} plot failed: {type(exc).__name__}: {exc}")
    if notes:
        out["note"] = "; ".join(notes)
    return out
