"""ADMM convergence of the rows of a tuning JSON (one line per row: residuals, tolerances,
calibration objective and ρ per iteration), from the ``admm_trace`` each row keeps.

    python benchmarks/plot_convergence.py benchmarks/results/tune_cpu_rho.json \
        --out benchmarks/results/admm_convergence_smollm2_cpu.png

A single run's own picture is ``convergence.png`` in its output folder (``structprune.plots``);
this one overlays the rows of a sweep so their iterations can be compared.
"""

from __future__ import annotations

import argparse
import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("primal_residual", "eps_primal", "primal residual"),
          ("dual_residual", "eps_dual", "dual residual"),
          ("objective", None, "calibration objective D"),
          ("rho", None, "ρ"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    rec = json.load(open(a.json))
    knob = rec["settings"]["sweep"]  # the swept field names each row
    rows = [r for r in rec["rows"] if len(r.get("admm_trace") or []) >= 2]
    if not rows:
        raise SystemExit(f"no row of {a.json} has an ADMM trace of two or more iterations")
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(7, 2.2 * len(PANELS) + 0.6), sharex=True)
    for r in rows:
        trace = sorted(r["admm_trace"], key=lambda e: e["iteration"])
        it = [e["iteration"] for e in trace]
        label = f"{knob}={r[knob]}, {r['sparsity']:.0%}, kept iteration {r.get('chosen_iteration')}"
        for ax, (key, tol, _) in zip(axes, PANELS):
            line, = ax.plot(it, [e[key] for e in trace], marker="o", label=label)
            if tol:
                ax.plot(it, [e[tol] for e in trace], ls="--", color=line.get_color(), alpha=0.6)
    for ax, (key, tol, ylabel) in zip(axes, PANELS):
        values = [e[key] for r in rows for e in r["admm_trace"]]
        if all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values) and key != "objective":
            ax.set_yscale("log")
        ax.set_ylabel(ylabel + (" (dashed: tolerance)" if tol else ""), fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("ADMM iteration")
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"{rec['settings']['model']} ADMM convergence ({a.json.rsplit('/', 1)[-1]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
