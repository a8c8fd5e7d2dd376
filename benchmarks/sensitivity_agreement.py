"""How reproducible are StructPrune's module sensitivities? Old estimator against new ones.

A sensitivity weighs one module's reconstruction error against another's in the global
allocation, so what matters is that the *ranking and ratios* of the 2L module sensitivities
are a property of the model, not of which calibration windows were drawn or of the weights'
rounding. This script measures, on a real model:

* **subset agreement**: sensitivities from two disjoint C4 calibration subsets (the
  calibration documents, seed 0, and the held-out documents, seed 1: no shared document),
  float32 weights;
* **dtype agreement**: the same windows, float32 weights against the same weights rounded
  to bfloat16 (``model.to(torch.bfloat16)``);

for the estimator before issue 11 (``engine/sensitivity.py`` at commit ``OLD_COMMIT``: loss
back-propagated in the model's dtype, plain mean over every token) and for the new float32
pass with every combination of positions skipped at the start of each window and trimmed
fraction of windows. Agreement is the Spearman rank correlation over the 2L modules and the
largest ratio ``max(a/b, b/a)`` between the two estimates of one module (and its median),
each estimate divided by its geometric mean first (a common factor does not change the
allocation).
It also reports where the gradient energy sits: the share of each module's energy at
position 0 and in the first 16 positions of the windows.

    OMP_NUM_THREADS=1 STRUCTPRUNE_ASSETS=/work/shared/assets python benchmarks/sensitivity_agreement.py \
        --model smollm2-135m --nsamples 8 --seqlen 512 --threads 1 \
        --out benchmarks/results/sensitivity_agreement
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without install

from structprune.adapters import get_adapter  # noqa: E402
from structprune.bench import hardware_name  # noqa: E402
from structprune.data import get_calibration, get_heldout_calibration  # noqa: E402
from structprune.engine import capture_first_layer_inputs  # noqa: E402
from structprune.engine.sensitivity import MODULES, SKIP_POSITIONS, TRIM, gradient_energy, reduce_energy  # noqa: E402
from structprune.models import load_model  # noqa: E402

OLD_COMMIT = "31143be"  # last commit with the estimator issue 11 replaces


def load_old_estimator():
    """``engine/sensitivity.py`` as of ``OLD_COMMIT``, imported inside the package (its relative
    imports resolve against today's ``structprune.engine``) without replacing today's module."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:src/structprune/engine/sensitivity.py"],
                            check=True, capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("structprune.engine.sensitivity_before_issue11", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "structprune.engine"
    exec(compile(source, f"{OLD_COMMIT}:sensitivity.py", "exec"), module.__dict__)
    return module


def ranks(values: list[float]) -> list[float]:
    """Ranks 1..n, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb)


def agreement(a: list[float], b: list[float]) -> dict:
    """Rank correlation and ratios between two estimates of the same modules.

    Ratios are taken after dividing each estimate by its geometric mean: a factor common to
    every module (a subset whose text is harder gives larger gradients everywhere) changes
    only the price lambda of the allocation, not its result. ``raw_max_ratio`` keeps it."""
    ga = math.exp(sum(math.log(x) for x in a) / len(a))
    gb = math.exp(sum(math.log(y) for y in b) / len(b))
    ratios = sorted(max(x / ga / (y / gb), y / gb / (x / ga)) for x, y in zip(a, b))
    n = len(ratios)
    median = ratios[n // 2] if n % 2 else 0.5 * (ratios[n // 2 - 1] + ratios[n // 2])
    return {"spearman": spearman(a, b), "max_ratio": ratios[-1], "median_ratio": median,
            "raw_max_ratio": max(max(x / y, y / x) for x, y in zip(a, b)), "scale": gb / ga}


def flat(sens: list[dict[str, float]]) -> list[float]:
    """Layer-major list of the 2L module sensitivities."""
    return [s[m] for s in sens for m in MODULES]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=8, help="windows per calibration subset")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed-a", type=int, default=0, help="seed of subset A (C4 calibration documents)")
    p.add_argument("--seed-b", type=int, default=1, help="seed of subset B (C4 held-out documents)")
    p.add_argument("--skips", default="0,1,4,16,64", help="positions left out at the start of every window")
    p.add_argument("--trims", default="0,0.125,0.25", help="fraction of windows trimmed at each end")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CPU machine is shared)")
    p.add_argument("--no-old", action="store_true", help="skip the estimator before issue 11 (faster)")
    p.add_argument("--out", type=Path, required=True, help="path prefix: writes OUT.json and OUT.md")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    skips = [int(s) for s in a.skips.split(",")]
    trims = [float(t) for t in a.trims.split(",")]
    started = time.strftime("%Y-%m-%d %H:%M")
    t_all = time.perf_counter()

    model, tok = load_model(a.model, dtype=torch.float32, device="cpu")
    subsets = {"A": get_calibration(tok, "c4", a.nsamples, a.seqlen, seed=a.seed_a),
               "B": get_heldout_calibration(tok, "c4", a.nsamples, a.seqlen, seed=a.seed_b)}
    old = None if a.no_old else load_old_estimator()
    cpu = torch.device("cpu")
    energies, widths, old_sens, seconds = {}, None, {}, {}
    for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model.to(dtype)  # float32 -> bfloat16 rounds the weights once: both dtypes see the same model
        adapter = get_adapter(model)
        for name, ids in subsets.items():
            key = f"{dtype_name}/{name}"
            t0 = time.perf_counter()
            inputs = capture_first_layer_inputs(model, adapter, ids, cpu, batch_size=1)
            energies[key], widths = gradient_energy(model, adapter, inputs, ids, cpu, progress=False)
            seconds[f"new {key}"] = time.perf_counter() - t0
            print(f"new estimator {key}: {seconds[f'new {key}']:.0f}s", flush=True)
            if old is not None:
                t0 = time.perf_counter()
                old_sens[key] = old.module_sensitivities(model, adapter, inputs, ids, cpu, progress=False)
                seconds[f"old {key}"] = time.perf_counter() - t0
                print(f"old estimator {key}: {seconds[f'old {key}']:.0f}s", flush=True)
            del inputs

    def estimate(key, skip, trim):
        return [[reduce_energy(e[m], w[m], skip, trim) for m in MODULES] for e, w in zip(energies[key], widths)]

    pairs = {"subsets (fp32 A vs B)": ("float32/A", "float32/B"),
             "dtype (fp32 vs bf16, A)": ("float32/A", "bfloat16/A"),
             "dtype (fp32 vs bf16, B)": ("float32/B", "bfloat16/B")}
    rows = []
    if old is not None:
        rows.append({"estimator": "before issue 11 (model dtype, all positions, mean)", "skip": None, "trim": None,
                     **{pair: agreement(flat(old_sens[x]), flat(old_sens[y])) for pair, (x, y) in pairs.items()}})
    for skip in skips:
        for trim in trims:
            est = {key: [v for layer in estimate(key, skip, trim) for v in layer] for key in energies}
            rows.append({"estimator": f"float32, skip {skip}, trim {trim:g}", "skip": skip, "trim": trim,
                         **{pair: agreement(est[x], est[y]) for pair, (x, y) in pairs.items()}})
    # Where the energy sits (fp32, subset A): share at position 0 and in the first 16 positions.
    share = []
    for i, e in enumerate(energies["float32/A"]):
        for m in MODULES:
            total = float(e[m].sum())
            share.append({"layer": i, "module": m, "position0": float(e[m][:, 0].sum()) / total,
                          "first16": float(e[m][:, :16].sum()) / total})
    # The float32 pass with the plain estimator must reproduce the old one on float32 weights.
    check = None
    if old is not None:
        plain = [v for layer in estimate("float32/A", 0, 0.0) for v in layer]
        check = max(abs(x - y) / y for x, y in zip(plain, flat(old_sens["float32/A"])))
    new_default = {key: estimate(key, SKIP_POSITIONS, TRIM) for key in energies}

    record = {
        "protocol": {"model": a.model, "nsamples": a.nsamples, "seqlen": a.seqlen,
                     "subset_A": f"C4 calibration documents, seed {a.seed_a}",
                     "subset_B": f"C4 held-out documents, seed {a.seed_b}",
                     "threads": a.threads, "old_commit": OLD_COMMIT,
                     "defaults": {"skip_positions": SKIP_POSITIONS, "trim": TRIM}},
        "rows": rows,
        "energy_share": share,
        "plain_float32_vs_old_max_rel_diff": check,
        "sensitivities_new_default": new_default,
        "sensitivities_old": {k: [[s[m] for m in MODULES] for s in v] for k, v in old_sens.items()},
        "seconds": seconds,
        "machine": {"hardware": hardware_name("cpu"), "platform": platform.platform(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
        "command": "python " + " ".join(shlex.quote(x) for x in [str(Path(sys.argv[0])), *sys.argv[1:]]),
        "started": started,
        "total_seconds": time.perf_counter() - t_all,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(markdown(record, list(pairs)))
    print(a.out.with_suffix(".md").read_text())
    return 0


def markdown(r: dict, pairs: list[str]) -> str:
    """The results table and the energy profile, with the command that produced them."""
    pr = r["protocol"]
    lines = [f"# Sensitivity agreement: {pr['model']}", "",
             f"Two disjoint calibration subsets of {pr['nsamples']}×{pr['seqlen']} C4 tokens (A: {pr['subset_A']}; "
             f"B: {pr['subset_B']}); float32 weights and the same weights rounded to bfloat16. "
             "Agreement over the 2L module sensitivities: Spearman rank correlation ρ, largest and median "
             "ratio max(a/b, b/a) after dividing each estimate by its geometric mean (a factor common to all "
             "modules does not change the allocation; the raw largest ratio is in the JSON). The estimator before issue 11 is `engine/sensitivity.py` at "
             f"`{pr['old_commit']}`. Defaults of `engine/sensitivity.py` when this ran (the JSON's "
             f"`sensitivities_new_default` use them): skip {pr['defaults']['skip_positions']}, "
             f"trim {pr['defaults']['trim']}.", "",
             f"Command (started {r['started']}, {r['total_seconds'] / 60:.1f} min, {r['machine']['hardware']}, "
             f"{pr['threads']} thread(s), torch {r['machine']['torch']}):", "", f"    {r['command']}", ""]
    head = "| estimator | " + " | ".join(f"{p}: ρ / max / median" for p in pairs) + " |"
    lines += [head, "|" + " --- |" * (len(pairs) + 1)]
    for row in r["rows"]:
        cells = [f"{row[p]['spearman']:.3f} / {row[p]['max_ratio']:.2f} / {row[p]['median_ratio']:.3f}"
                 for p in pairs]
        lines.append(f"| {row['estimator']} | " + " | ".join(cells) + " |")
    if r["plain_float32_vs_old_max_rel_diff"] is not None:
        lines += ["", "Check: the float32 pass with skip 0, trim 0 on float32 weights against the old estimator: "
                  f"largest relative difference {r['plain_float32_vs_old_max_rel_diff']:.2e}."]
    lines += ["", "Share of each module's gradient energy (float32, subset A) at position 0 and in the first 16 "
              "positions of the windows:", "", "| layer | attn pos 0 | attn first 16 | mlp pos 0 | mlp first 16 |",
              "| --- | --- | --- | --- | --- |"]
    share = {(s["layer"], s["module"]): s for s in r["energy_share"]}
    for i in sorted({s["layer"] for s in r["energy_share"]}):
        at, ml = share[(i, "attn")], share[(i, "mlp")]
        lines.append(f"| {i} | {at['position0']:.3f} | {at['first16']:.3f} | {ml['position0']:.3f} | "
                     f"{ml['first16']:.3f} |")
    if "old_commit" in pr and not r["sensitivities_old"]:
        lines += ["", "(The estimator before issue 11 was not run: `--no-old`.)"]
    lines += ["", "Seconds per pass: " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
