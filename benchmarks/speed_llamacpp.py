"""Speed of SmolLM2-135M dense vs StructPrune (per-layer widths) vs uniform widths, in llama.cpp.

Every model folder is exported with ``structprune export --format gguf`` at each type (f16,
q4_k_m by default), then measured by llama-cpp-python, each run in its own process (so the
resident-memory figure is that model's alone):

* prompt processing: one 512-token prompt (WikiText-2 test text) in one batch, tokens/s;
* generation: 128 greedy tokens after that prompt, one decode call per token (batch 1), tokens/s;
* perplexity in llama.cpp on the same WikiText-2 windows for every row (the first 2 windows of
  2048 tokens by default, the first of the 4 that ``structprune prune``'s CPU run evaluates: the
  transformers figure is recomputed from each folder's report.json's per-window NLLs on the same windows);
* GGUF file size and the process's peak resident memory.

Rounds are interleaved (every model once per round) so that load from other jobs spreads over all
rows; the table gives the median and the range over rounds.

    python benchmarks/speed_llamacpp.py --model dense=DENSE --model 'StructPrune 30%=runs/pp30' ... \\
        --types f16,q4_k_m --threads 1 --repeats 5 --out benchmarks/results/speed_llamacpp_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without install
PY = sys.executable


# -- workers (one process per measurement) ----------------------------------------------------------


def _llama(path: str, n_ctx: int, threads: int, logits_all: bool):
    import llama_cpp

    return llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                           n_threads_batch=threads, logits_all=logits_all, verbose=False, seed=0)


def _last_logits(llm):
    import numpy as np

    # without logits_all, llama-cpp-python keeps no scores: read the context's last logits row
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def worker_speed(args) -> dict:
    import numpy as np

    ids = json.loads(Path(args.ids).read_text())
    prompt = ids[: args.prompt_len]
    t0 = time.perf_counter()
    llm = _llama(args.gguf, args.prompt_len + args.gen + 8, args.threads, logits_all=False)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_now()
    llm.eval(prompt[:32])  # warm-up (page the weights in, build the graphs), untimed
    for _ in range(4):
        llm.eval([int(np.argmax(_last_logits(llm)))])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    pp_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = []
    for _ in range(args.gen):
        tok = int(np.argmax(_last_logits(llm)))
        out.append(tok)
        llm.eval([tok])
    tg_s = time.perf_counter() - t0
    return {"load_s": load_s, "pp_tok_s": len(prompt) / pp_s, "tg_tok_s": args.gen / tg_s,
            "rss_loaded_bytes": rss_loaded, "peak_rss_bytes": _peak_rss()}


def worker_ppl(args) -> dict:
    import numpy as np

    ids = json.loads(Path(args.ids).read_text())
    L = args.seqlen
    llm = _llama(args.gguf, L, args.threads, logits_all=True)
    nlls = []
    for w in range(args.windows):
        window = ids[w * L:(w + 1) * L]
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: L - 1], dtype=np.float64)
        m = logits.max(-1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
        target = np.asarray(window[1:])
        nlls.append(float((logz - logits[np.arange(L - 1), target]).mean()))
    return {"window_nlls": nlls, "ppl": float(np.exp(np.mean(nlls))), "ntokens": args.windows * (L - 1)}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_now() -> int:
    return _status("VmRSS")


def _peak_rss() -> int:
    # VmHWM: this process image's peak (getrusage's ru_maxrss keeps the forking parent's peak across exec)
    return _status("VmHWM")


def _spawn(kind: str, gguf: Path, ids: Path, a, threads: int) -> dict:
    cmd = [PY, __file__, "--worker", kind, "--gguf", str(gguf), "--ids", str(ids), "--threads", str(threads),
           "--prompt-len", str(a.prompt_len), "--gen", str(a.gen), "--ppl-seqlen", str(a.seqlen),
           "--ppl-windows", str(a.windows)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"worker failed ({p.returncode}): {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- driver --------------------------------------------------------------------------------------------


def _arch(path: Path) -> str:
    import gguf

    f = gguf.GGUFReader(str(path)).fields["general.architecture"]
    return bytes(f.parts[f.data[0]]).decode()


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def _report_ppl(folder: Path, windows: int, which: str) -> float | None:
    """The transformers perplexity (float32) of ``which`` (pruned, dense) in the folder's report.json, on its
    first ``windows`` windows (from the per-window NLLs: the same windows this script scores)."""
    import math

    rep = folder / "report.json"
    if not rep.is_file():
        return None
    p = (json.loads(rep.read_text()).get("ppl") or {}).get("wikitext2")
    if not p or p.get("seqlen") != 2048 or len(p["window_nlls"][which]) < windows:
        return None
    nlls = p["window_nlls"][which][:windows]
    return math.exp(sum(nlls) / len(nlls))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=("speed", "ppl"), help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--model", action="append", default=[], help="NAME=FOLDER (a model folder; repeatable)")
    ap.add_argument("--types", default="f16,q4_k_m")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads for the speed runs")
    ap.add_argument("--ppl-threads", type=int, default=2, help="threads for the perplexity runs (no effect on the value)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--ppl-seqlen", dest="seqlen", type=int, default=2048)
    ap.add_argument("--ppl-windows", dest="windows", type=int, default=2)
    ap.add_argument("--ppl-only", action="store_true", help="export and compute the perplexities only (cached)")
    ap.add_argument("--work", default="/tmp/structprune-llamacpp")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed_llamacpp_cpu"))
    a = ap.parse_args(argv)
    a.ppl_seqlen, a.ppl_windows = a.seqlen, a.windows
    if a.worker:
        res = (worker_speed if a.worker == "speed" else worker_ppl)(a)
        print(json.dumps(res))
        return 0

    from transformers import AutoTokenizer

    import llama_cpp
    from structprune.bench import hardware_name
    from structprune.eval.perplexity import encode_corpus
    from structprune.export.gguf import export_gguf

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    models = [m.split("=", 1) for m in a.model]
    types = [t.strip() for t in a.types.split(",") if t.strip()]
    tok = AutoTokenizer.from_pretrained(models[0][1])
    ids = encode_corpus(tok, "wikitext2").reshape(-1).tolist()  # the project's WikiText-2 test text and tokens
    ids_file = work / "wikitext2_ids.json"
    ids_file.write_text(json.dumps(ids[: max(a.windows * a.seqlen, a.prompt_len)]))

    rows, exports = [], []
    for name, folder in models:
        for t in types:
            out = work / f"{Path(folder).name}-{t}.gguf"
            cmd = f"structprune export {folder} --format gguf --type {t} --output {out}"
            if not out.is_file():
                t0 = time.perf_counter()
                export_gguf(folder, out, t)
                print(f"+ {cmd}  ({time.perf_counter() - t0:.1f}s)", flush=True)
            exports.append(cmd)
            rows.append({"model": name, "folder": folder, "type": t, "gguf": str(out), "bytes": out.stat().st_size,
                         "arch": _arch(out), "speed": []})

    for r in rows:  # perplexity once per row (deterministic; kept in the work folder for reruns)
        cache = work / f"ppl-{Path(r['gguf']).stem}-{a.windows}x{a.seqlen}-{r['bytes']}.json"
        if not cache.is_file():
            cache.write_text(json.dumps(_spawn("ppl", Path(r["gguf"]), ids_file, a, a.ppl_threads)))
        r["ppl"] = json.loads(cache.read_text())
        r["ppl_transformers"] = (_report_ppl(Path(r["folder"]), a.windows, "pruned") if r["model"] != "dense"
                                 else None)
        print(f"ppl {r['model']:<28} {r['type']:<7} {r['ppl']['ppl']:.3f}", flush=True)
    if a.ppl_only:
        return 0
    for k in range(a.repeats):  # interleaved rounds
        for r in rows:
            r["speed"].append(_spawn("speed", Path(r["gguf"]), ids_file, a, a.threads))
            s = r["speed"][-1]
            print(f"round {k} {r['model']:<28} {r['type']:<7} pp {s['pp_tok_s']:.1f} tg {s['tg_tok_s']:.1f}",
                  flush=True)

    dense_ppl_hf = next((_report_ppl(Path(f), a.windows, "dense") for n, f in models if n != "dense"), None)
    for r in rows:
        r["pp"] = _stats([s["pp_tok_s"] for s in r["speed"]])
        r["tg"] = _stats([s["tg_tok_s"] for s in r["speed"]])
        r["peak_rss_bytes"] = max(s["peak_rss_bytes"] for s in r["speed"])
        if r["model"] == "dense":
            r["ppl_transformers"] = dense_ppl_hf
        base = next((d for d in rows if d["model"] == "dense" and d["type"] == r["type"]), None)
        if base is not None:
            r["pp_speedup"] = r["pp"]["median"] / base["pp"]["median"]
            r["tg_speedup"] = r["tg"]["median"] / base["tg"]["median"]
            # paired per round (the same round ran both close in time)
            r["tg_speedup_rounds"] = [s["tg_tok_s"] / b["tg_tok_s"] for s, b in zip(r["speed"], base["speed"])]
            r["pp_speedup_rounds"] = [s["pp_tok_s"] / b["pp_tok_s"] for s, b in zip(r["speed"], base["speed"])]

    prune_cmds = {}
    for name, folder in models:
        rep = Path(folder) / "report.json"
        if rep.is_file():
            prune_cmds[name] = json.loads(rep.read_text()).get("command")
    meta = {"hardware": hardware_name(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "llama_cpp_python": llama_cpp.__version__, "threads": a.threads, "ppl_threads": a.ppl_threads,
            "repeats": a.repeats, "prompt_len": a.prompt_len, "gen": a.gen, "ppl_windows": a.windows,
            "ppl_seqlen": a.seqlen, "command": "python benchmarks/speed_llamacpp.py " + " ".join(
                shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])),
            "exports": exports, "prune_commands": prune_cmds,
            "load_average_at_end": os.getloadavg()}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(meta, rows))
    print(out.with_suffix(".md").read_text())
    return 0


def render(meta: dict, rows: list[dict]) -> str:
    def rng(s):
        return f"{s['median']:.1f} [{s['min']:.1f}, {s['max']:.1f}]"

    lines = ["# SmolLM2-135M in llama.cpp: dense vs StructPrune (per-layer widths) vs uniform widths", "",
             f"Machine: {meta['hardware']}, {meta['cpu_count']} cores, shared with other jobs (see below). "
             f"llama-cpp-python {meta['llama_cpp_python']} (llama.cpp CPU build, built from the PyPI sdist). "
             f"Speed runs on **{meta['threads']} thread(s)**, {meta['repeats']} interleaved rounds, each run in a "
             "fresh process; the table gives the median and [min, max] over rounds. Prompt processing: one "
             f"{meta['prompt_len']}-token WikiText-2 prompt in one batch. Generation: {meta['gen']} greedy tokens "
             "after it, batch 1, one decode call per token. Perplexity: llama.cpp on the first "
             f"{meta['ppl_windows']} WikiText-2 test windows of {meta['ppl_seqlen']} tokens (the first of the 4 windows "
             "`structprune prune`'s CPU run evaluates; every row the same token ids), F16 KV cache (llama.cpp's "
             "default); 'transformers' is the same windows' figure (float32), from the per-window NLLs in the "
             "folder's report.json.", "",
             "| model | GGUF | llama.cpp arch | file MB | peak RSS MiB | prompt tok/s | gen tok/s | speed-up prompt / gen (vs dense, same type) | ppl llama.cpp | ppl transformers |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        arch = r.get("arch", "")
        hf = f"{r['ppl_transformers']:.2f}" if r.get("ppl_transformers") else ""
        su = (f"{r['pp_speedup']:.2f}× / {r['tg_speedup']:.2f}×" if "pp_speedup" in r and r["model"] != "dense"
              else "1")
        lines.append(f"| {r['model']} | {r['type']} | {arch} | {r['bytes'] / 1e6:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} | "
                     f"{rng(r['pp'])} | {rng(r['tg'])} | {su} | {r['ppl']['ppl']:.2f} | {hf} |")
    lines += ["", "Paired speed-ups per round (each round ran every model once, close in time): "]
    for r in rows:
        if r["model"] != "dense" and "tg_speedup_rounds" in r:
            lines.append(f"* {r['model']} {r['type']}: prompt "
                         + ", ".join(f"{x:.2f}" for x in r["pp_speedup_rounds"]) + "; gen "
                         + ", ".join(f"{x:.2f}" for x in r["tg_speedup_rounds"]))
    lines += ["", "## Commands", "", "Pruning (the CPU defaults: StructPrune, C4 calibration 8×512, 4 WikiText-2 "
              "windows of 2048 evaluated):", "", "```bash"]
    lines += [c for c in meta["prune_commands"].values() if c]
    lines += ["```", "", "Export:", "", "```bash"] + meta["exports"] + ["```", "", "This table:", "", "```bash",
                                                                           meta["command"], "```", "",
              f"Load average when it ended: {', '.join(f'{x:.1f}' for x in meta['load_average_at_end'])} "
              f"({meta['cpu_count']} cores): other engineers' jobs shared the machine, so absolute speeds are "
              "indicative; the interleaved rounds and the paired ratios are what to compare.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
