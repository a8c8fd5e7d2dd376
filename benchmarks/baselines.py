"""Every pruning method on one model under one protocol: a table (Markdown + JSON) and a plot.

Rows: the dense model, then each method spec at each sparsity. A method spec is
``method[:allocation][+field=value...]`` (PruneConfig fields), e.g. ``wanda-sp:owl`` or
``structprune:softmax+temperature=0.5``; its text is the row's label. The model is loaded
once and deep-copied per row; every row gets the same calibration windows and the same
evaluation windows. The JSON is rewritten after every row, and ``--resume`` reuses the
rows already in it (same protocol settings required), so rows can be added later:

    # protocol run (GPU): 128 C4 windows of 2048, all evaluation windows
    python benchmarks/baselines.py --device cuda --dtype float16 --out benchmarks/results/baselines_gpu
    # add rows to an existing table
    python benchmarks/baselines.py --methods structprune --resume --out benchmarks/results/baselines_gpu
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without install

from structprune import PruneConfig, load_model, prune  # noqa: E402
from structprune.data import get_calibration  # noqa: E402
from structprune.errors import StructPruneError  # noqa: E402
from structprune.eval.perplexity import evaluate_datasets  # noqa: E402

log = logging.getLogger("baselines")

DEFAULT_METHODS = "magnitude-sp,wanda-sp,wanda-sp:owl,wanda-sp:threshold,flap,global,obs-local,structprune"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DATASET_TITLES = {"wikitext2": "WikiText-2", "ptb": "PTB", "c4": "C4"}
# Settings that must agree for rows of one table to be comparable (checked by --resume).
PROTOCOL_KEYS = ("model", "dtype", "nsamples", "seqlen", "seed", "eval_seqlen", "eval_limit", "datasets",
                 "mlp_multiple")


def _value(v: str):
    if v in ("inf", "-inf"):
        return float(v)
    if v in ("true", "false", "True", "False"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_spec(spec: str) -> tuple[str, str, dict]:
    """``method[:allocation][+field=value...]`` -> ``(method, allocation, overrides)``."""
    head, *sets = spec.split("+")
    method, _, allocation = head.partition(":")
    overrides = {}
    for kv in sets:
        k, sep, v = kv.partition("=")
        if not sep:
            raise StructPruneError(f"bad override {kv!r} in method spec {spec!r}: use field=value")
        overrides[k] = _value(v)
    return method, allocation or "auto", overrides


def build_config(spec: str, sparsity: float, a) -> PruneConfig:
    method, allocation, overrides = parse_spec(spec)
    return PruneConfig(method=method, allocation=allocation, sparsity=sparsity, nsamples=a.nsamples,
                       seqlen=a.seqlen, seed=a.seed, batch_size=a.batch_size, mlp_multiple=a.mlp_multiple,
                       **overrides)


def evaluate(model, tok, a) -> dict:
    res = evaluate_datasets(model, tok, a.datasets, seqlen=a.eval_seqlen, limit=a.eval_limit, device=a.device,
                            progress=False)
    return {k: {"ppl": v.ppl, "nwindows": v.nwindows, "ntokens": v.ntokens} for k, v in res.items()}


def dense_row(model, tok, a, params: int, prunable: int) -> dict:
    t0 = time.perf_counter()
    ppl = evaluate(model.to(a.device), tok, a)
    model.to("cpu")
    return {"label": "dense", "method": "dense", "allocation": None, "sparsity_target": 0.0,
            "sparsity_achieved": 0.0, "params": params, "prunable_params": prunable, "ppl": ppl,
            "peak_gpu_mem_bytes": None, "prune_seconds": 0.0, "eval_seconds": time.perf_counter() - t0}


def method_row(base, tok, calib, spec: str, sparsity: float, a, cache: dict | None = None) -> dict:
    config = build_config(spec, sparsity, a)
    model = copy.deepcopy(base)
    # One cache per dense model and calibration set: StructPrune's sensitivities and dense
    # paths are shared by its rows (it reports their seconds as profile_seconds).
    result = prune(model, calib, config, device=a.device, progress=not a.quiet, cache=cache)
    r = result.report
    t0 = time.perf_counter()
    ppl = evaluate(model.to(a.device), tok, a)
    del model
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"label": spec, "method": config.method, "allocation": config.allocation, "sparsity_target": sparsity,
            "sparsity_achieved": r["sparsity_achieved"], "params": r["params_after"],
            "prunable_params": r["prunable_params_after"], "ppl": ppl, "peak_gpu_mem_bytes": r["peak_gpu_mem_bytes"],
            "prune_seconds": r["prune_seconds"], "eval_seconds": time.perf_counter() - t0,
            "layers": r["layers"], "config": r["config"]}


# -- output ---------------------------------------------------------------------------------------

def _fmt_ppl(x) -> str:
    return "n/a" if x is None else ("inf" if math.isinf(x) else f"{x:.2f}")


def markdown(record: dict) -> str:
    p, rows = record["protocol"], record["rows"]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    lines = [f"# Baselines on {p['model']}", ""]
    if record["reduced"]:
        lines += [f"**Reduced protocol ({record['reduced']}).** Numbers compare methods with each other under "
                  "identical settings; they are not the protocol's numbers (docs/protocol.md: 128 C4 windows of "
                  "2048 tokens, every evaluation window, GPU).", ""]
    lim = "all" if p["eval_limit"] is None else f"the first {p['eval_limit']}"
    lines += [f"- calibration: C4, {p['nsamples']} windows of {p['seqlen']} tokens, seed {p['seed']} "
              "(the same windows for every row)",
              f"- evaluation: {lim} windows of {p['eval_seqlen']} tokens of "
              + ", ".join(DATASET_TITLES.get(d, d) for d in p["datasets"]) + " (C4 at most 256)",
              f"- sparsity: fraction of prunable decoder parameters removed (q, k, v, o, MLP of all "
              f"{record['num_layers']} layers; all layers pruned); embeddings and LM head kept",
              f"- kept MLP widths rounded to multiples of {p['mlp_multiple']}",
              f"- device: {record['device_name']} ({p['device']}), {p['dtype']}, torch {record['versions']['torch']}, "
              f"transformers {record['versions']['transformers']}",
              *[f"- command: `{c}`" for c in record["commands"]], ""]
    if dense is not None:
        lines += [f"Dense: {dense['params']:,} parameters, {dense['prunable_params']:,} prunable.", ""]
    ds = p["datasets"]
    head = (["method", "allocation", "target", "achieved", "params"] + [f"{DATASET_TITLES.get(d, d)} ppl" for d in ds]
            + ["peak GPU MiB", "prune s"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order: dict[str, int] = {}
    for r in rows:  # methods in the order they were first measured
        order.setdefault(r["label"], len(order))
    for r in sorted(rows, key=lambda r: (r["method"] != "dense", order[r["label"]], r["sparsity_target"])):
        mem = "n/a" if r["peak_gpu_mem_bytes"] is None else f"{r['peak_gpu_mem_bytes'] / 2**20:.0f}"
        cells = [r["label"], r["allocation"] or "-", f"{r['sparsity_target']:.2f}", f"{r['sparsity_achieved']:.4f}",
                 f"{r['params']:,}"] + [_fmt_ppl(r["ppl"].get(d, {}).get("ppl")) for d in ds] + \
                [mem, f"{r['prune_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed (pip install structprune[plot]): no plot written")
        return
    rows = record["rows"]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    labels = list(dict.fromkeys(r["label"] for r in rows if r["method"] != "dense"))
    colors = plt.get_cmap("tab20").colors
    for i, label in enumerate(labels):
        pts = sorted((r["sparsity_achieved"], r["ppl"]["wikitext2"]["ppl"]) for r in rows
                     if r["label"] == label and "wikitext2" in r["ppl"])
        if len(pts) < 3:  # ablations measured at one or two sparsities are in the table only
            continue
        main = label == "structprune"
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label,
                color="black" if main else colors[i % len(colors)], linewidth=2.5 if main else 1.2)
    dense = next((r for r in rows if r["method"] == "dense" and "wikitext2" in r["ppl"]), None)
    if dense is not None:
        ax.axhline(dense["ppl"]["wikitext2"]["ppl"], color="gray", linestyle="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (fraction of prunable decoder parameters removed)")
    ax.set_ylabel("WikiText-2 perplexity (log)")
    title = f"{record['protocol']['model']}: structured pruning baselines"
    if record["reduced"]:
        title += "\n(reduced protocol: " + record["reduced"] + ")"
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reduced_protocol(p: dict) -> str:
    notes = []
    if not p["device"].startswith("cuda"):
        notes.append("CPU")
    if (p["nsamples"], p["seqlen"]) != (128, 2048):
        notes.append(f"calibration {p['nsamples']}x{p['seqlen']}")
    if p["eval_limit"] is not None or p["eval_seqlen"] != 2048:
        notes.append(f"evaluation on {p['eval_limit'] or 'all'} windows of {p['eval_seqlen']}")
    return ", ".join(notes)


def write(record: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(record))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated method specs: method[:allocation][+field=value...]")
    p.add_argument("--sparsities", default="0.2,0.3,0.4,0.5")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--mlp-multiple", type=int, default=8, help="as the CLI's default")
    p.add_argument("--datasets", default="wikitext2,ptb,c4")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-limit", type=int, default=0, help="first N windows of each dataset (0: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/baselines"),
                   help="output prefix: .json, .md and .png are written")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; 1 avoids oversubscription on a shared CPU)")
    p.add_argument("--resume", action="store_true", help="reuse the rows already in the output JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="[%(name)s] %(message)s")
    a.eval_limit = a.eval_limit or None
    if a.threads:
        torch.set_num_threads(a.threads)
    a.datasets = [d.strip() for d in a.datasets.split(",") if d.strip()]
    specs = [s.strip() for s in a.methods.split(",") if s.strip()]
    sparsities = [float(s) for s in a.sparsities.split(",")]
    out = a.out.with_suffix("") if a.out.suffix in (".json", ".md", ".png") else a.out
    try:
        for spec in specs:  # fail on a bad spec before hours of work
            build_config(spec, sparsities[0], a)
        return run(a, specs, sparsities, out, argv)
    except StructPruneError as e:
        print(f"baselines: error: {e}", file=sys.stderr)
        return 2


def run(a, specs, sparsities, out: Path, argv) -> int:
    import transformers

    protocol = {"model": a.model, "dtype": a.dtype, "nsamples": a.nsamples, "seqlen": a.seqlen, "seed": a.seed,
                "eval_seqlen": a.eval_seqlen, "eval_limit": a.eval_limit, "datasets": a.datasets,
                "mlp_multiple": a.mlp_multiple, "device": a.device}
    rows, commands = [], []
    if a.resume and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        diff = [k for k in PROTOCOL_KEYS if old["protocol"].get(k) != protocol[k]]
        if diff:
            raise StructPruneError(f"--resume: {out}.json was measured with other settings ({', '.join(diff)}); "
                                   "use the same settings or another --out")
        rows = old["rows"]
        commands = old.get("commands", [])
    done = {(r["label"], r["sparsity_target"]) for r in rows}
    command = shlex.join(["python", "benchmarks/baselines.py", *(argv if argv is not None else sys.argv[1:])])
    record = {"protocol": protocol, "reduced": reduced_protocol(protocol), "rows": rows,
              "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda")
              else (platform.processor() or platform.machine()) + f", {torch.get_num_threads()} threads",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "commands": commands + [command]}  # a resumed table lists every command that added rows

    base, tok = load_model(a.model, dtype=DTYPES[a.dtype], device="cpu")
    from structprune.adapters import get_adapter
    from structprune.api import prunable_params
    record["num_layers"] = len(get_adapter(base).layers())
    calib = get_calibration(tok, "c4", nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed)
    t_start = time.perf_counter()
    cache: dict = {}
    if ("dense", 0.0) not in done:
        rows.insert(0, dense_row(base, tok, a, sum(p.numel() for p in base.parameters()),
                                 prunable_params(get_adapter(base))))
        write(record, out)
    for spec in specs:
        for s in sparsities:
            if (spec, s) in done:
                continue
            log.info("row %s at sparsity %.2f", spec, s)
            row = method_row(base, tok, calib, spec, s, a, cache)
            rows.append(row)
            write(record, out)
            wt = row["ppl"].get("wikitext2", {}).get("ppl")
            print(f"{spec:<28} s={s:.2f} achieved={row['sparsity_achieved']:.4f} wikitext2={_fmt_ppl(wt)} "
                  f"prune={row['prune_seconds']:.1f}s eval={row['eval_seconds']:.1f}s", flush=True)
    record["total_seconds_this_run"] = time.perf_counter() - t_start
    write(record, out)
    plot(record, out.with_suffix(".png"))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
