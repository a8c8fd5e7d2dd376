"""Per-layer kept widths of one method's rows in a baselines JSON (heads and MLP channels per layer).

    python benchmarks/plot_widths.py benchmarks/results/baselines_smollm2_cpu.json --label structprune \
        --out benchmarks/results/structprune_widths_smollm2_cpu.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json")
    p.add_argument("--label", default="structprune")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    rec = json.load(open(a.json))
    rows = [r for r in rec["rows"] if r["label"] == a.label and "layers" in r]
    if not rows:
        raise SystemExit(f"no rows labelled {a.label!r} with per-layer widths in {a.json}")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for r in sorted(rows, key=lambda r: r["sparsity_target"]):
        layers = r["layers"]
        x = range(len(layers))
        ax1.plot(x, [l["heads"] for l in layers], marker="o", label=f"{r['sparsity_target']:.0%}")
        ax2.plot(x, [l["mlp"] for l in layers], marker="o", label=f"{r['sparsity_target']:.0%}")
    ax1.set_ylabel("query heads kept")
    ax2.set_ylabel("MLP channels kept")
    ax2.set_xlabel("decoder layer")
    ax1.legend(title="sparsity", ncol=4, fontsize=8)
    ax1.set_title(f"{rec['protocol']['model']}: per-layer kept widths, {a.label} ({rows[0]['allocation']} allocation)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
