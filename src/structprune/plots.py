"""Pictures of a pruning run, written next to ``report.json`` (issue 11, item 7).

* ``widths.png``: kept widths per decoder layer, before and after (query heads with the KV
  groups kept, and MLP channels): where the allocation put the budget, at a glance.
* ``convergence.png``: per-iteration residuals and objective of an iterative solver
  (:func:`plot_convergence`; :func:`write_run_plots` draws it from the solver log when it
  has at least two iterations).

matplotlib is optional (the ``plot`` extra). Without it, or if drawing fails, the run
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


def plot_convergence(series: Mapping[str, Sequence[float]], path: str | Path, title: str = "") -> Path:
    """One panel per series (e.g. ``primal_residual``, ``dual_residual``, ``objective``: one
    value per iteration) against the iteration number, log scale where every value is
    positive, to ``path`` (PNG). The ADMM solver calls it with its per-iteration residual lists."""
    names = [n for n, v in series.items() if len(v) > 0]
    if not names:
        raise ValueError("plot_convergence needs at least one non-empty series")
    fig, axes = _figure(len(names), 2.2 * len(names) + 0.8)
    for ax, name in zip(axes, names):
        values = [float(v) for v in series[name]]
        it = list(range(1, len(values) + 1))
        ax.plot(it, values, marker="o")
        finite = [v for v in values if math.isfinite(v)]
        if finite and all(v > 0 for v in finite):
            ax.set_yscale("log")
        ax.set_ylabel(name.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("iteration")
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_title(title or "convergence")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def convergence_series(solver_log: Sequence[Mapping]) -> dict[str, list[float]]:
    """Per-iteration lists of :data:`CONVERGENCE_KEYS` from the entries of a solver log that
    carry an ``iteration`` number (in iteration order); a key absent from them is left out."""
    iters = sorted((e for e in solver_log if isinstance(e, Mapping) and "iteration" in e),
                   key=lambda e: e["iteration"])
    out = {}
    for key in CONVERGENCE_KEYS:
        if iters and all(key in e and e[key] is not None for e in iters):
            out[key] = [float(e[key]) for e in iters]
    return out


def write_run_plots(report: Mapping, folder: str | Path) -> dict:
    """Draw the run's pictures into ``folder`` and return the report's ``plots`` entry: file
    names relative to ``folder`` (``widths``, and ``convergence`` for a solver log with two
    or more iterations), plus a ``note`` when a picture could not be drawn. Never raises for
    a missing matplotlib or a drawing error: the pruned model matters more than its picture."""
    folder = Path(folder)
    out: dict = {}
    title = f"{report.get('method', '')} at sparsity {report.get('sparsity_achieved', float('nan')):.3f}"
    jobs = []
    if report.get("layers_before") and report.get("layers"):
        jobs.append(("widths", WIDTHS_FILE, lambda p: plot_widths(report["layers_before"], report["layers"], p,
                                                                   title=f"kept widths per layer, {title}")))
    series = convergence_series(report.get("solver_log") or [])
    if series and len(next(iter(series.values()))) >= 2:
        jobs.append(("convergence", CONVERGENCE_FILE, lambda p: plot_convergence(series, p,
                                                                                 title=f"convergence, {title}")))
    notes = []
    for kind, name, draw in jobs:
        try:
            draw(folder / name)
            out[kind] = name
        except ImportError:
            notes.append("matplotlib is not installed (pip install 'structprune[plot]'): no plots were drawn")
            break
        except Exception as exc:  # a picture must never cost the run its output
            log.warning("could not draw %s: %s", name, exc, exc_info=True)
            notes.append(f"{kind} plot failed: {type(exc).__name__}: {exc}")
    if notes:
        out["note"] = "; ".join(notes)
    return out
