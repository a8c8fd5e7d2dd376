"""Top-1 agreement of llama.cpp GGUF variants with transformers (float32) and with llama.cpp's own F32/F16.

For each model folder (dense SmolLM2, a StructPrune output, ...) on the first N WikiText-2 test tokens
(the same window as tests/test_gguf.py: ``load_text("wikitext2")[:20000]``, its first 512 ids), in one
batch, F32 KV cache:

* transformers float32 logits (the reference);
* llama.cpp logits of GGUF variants: ``f32``, ``f16``, ``q8_0`` (this exporter: every matrix Q8_0),
  ``q8_0/llama-quantize`` (llama.cpp's quantizer from the F32 file, its defaults), and ``q8_0`` with the
  token embedding / output tensor (one tensor when the embeddings are tied) kept at F16 or F32 through
  the quantizer's ``token_embedding_type`` / ``output_tensor_type`` parameters;
* in torch, as a diagnosis of where the q8_0 loss comes from: the transformers model with every matrix
  replaced by its Q8_0 round trip (weights only, activations float32), and the same with each linear
  layer's input also rounded to Q8_0 blocks of 32 (what llama.cpp's Q8_0 matrix product does to the
  activations), with the embedding / output tensor kept float or not.

Per variant: agreement of the argmax with each reference, how many positions disagree, and how many of
those are near-ties (the reference's top-2 logit margin below 0.1, and below 0.5).

    python benchmarks/gguf_agreement.py --model dense=/root/.cache/structprune/smollm2-135m-hf \\
        --model 'StructPrune 30%=/work/gguf-runs/pp30' --out benchmarks/results/gguf_agreement_smollm2
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

GGML = {"f32": 0, "f16": 1, "q8_0": 8}
FTYPE_Q8_0 = 7


def llama_quantize(src: Path, dst: Path, embd: str | None, overrides: dict[str, str] | None = None) -> None:
    """llama.cpp's quantizer to Q8_0; ``embd``: the token embedding / output tensor's type; ``overrides``:
    regex -> type for other tensors (``llama-quantize --tensor-type``)."""
    import ctypes

    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = FTYPE_Q8_0
    p.nthread = 2
    if embd is not None:
        p.token_embedding_type = GGML[embd]
        p.output_tensor_type = GGML[embd]
    if overrides:
        arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, t) in enumerate(overrides.items()):
            arr[i].pattern = pattern.encode()
            arr[i].type = GGML[t]
        arr[len(overrides)].pattern = None
        p.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), p)
    if rc:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")


def llama_cpp_logits(path: Path, windows: list[list[int]], threads: int) -> np.ndarray:
    """Each window in a fresh context, in one batch; the windows' logits stacked."""
    import llama_cpp

    n = len(windows[0])
    llm = llama_cpp.Llama(str(path), n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True, n_threads=threads,
                          n_threads_batch=threads, type_k=0, type_v=0, verbose=False, seed=0)
    out = []
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[:n], dtype=np.float32))
    llm.close()
    return np.concatenate(out)


def hf_logits(model, windows: list[list[int]]) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(torch.tensor([ids])).logits[0].float().numpy() for ids in windows])


def tensor_types(path: Path) -> dict[str, int]:
    import gguf

    counts: dict[str, int] = {}
    r = gguf.GGUFReader(str(path))
    for t in r.tensors:
        if len(t.shape) > 1 or t.name.startswith("token_embd"):
            key = t.tensor_type.name if not t.name.startswith("token_embd") else f"token_embd={t.tensor_type.name}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def stats(got: np.ndarray, ref: np.ndarray, targets: np.ndarray | None = None) -> dict:
    """Agreement of ``got``'s argmax with ``ref``'s per position; disagreements at near-ties of ``ref``; and, with
    ``targets`` (the next token at each position, -1 where there is none), ``got``'s next-token accuracy."""
    a, b = got.argmax(-1), ref.argmax(-1)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    dis = a != b
    return {"agree": float((~dis).mean()), "disagree": int(dis.sum()),
            "near_tie_0.1": int((dis & (margin < 0.1)).sum()), "near_tie_0.5": int((dis & (margin < 0.5)).sum()),
            "max_dlogit": float(np.abs(got - ref).max()),
            **({"next_token_acc": float((a == targets)[targets >= 0].mean())} if targets is not None else {})}


# -- torch simulation of Q8_0 -------------------------------------------------------------------------


def q8_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """Q8_0 (blocks of 32 along the input dimension, scale absmax/127, f16 scale) and back."""
    if w.shape[-1] % 32:
        return w.to(torch.float16).float()  # llama.cpp keeps such rows F16
    return _quant_act(w.float())  # the same block quantizer (quantize_row_q8_0_ref)


def _quant_act(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's quantize_row_q8_0 of the activations (what its Q8_0 x Q8_0 dot product reads)."""
    if x.shape[-1] % 32:
        return x.to(torch.float16).float()
    b = x.reshape(*x.shape[:-1], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    d = amax / 127
    q = torch.where(d > 0, b / d.clamp_min(1e-30), torch.zeros_like(b)).round()
    return (q * d.to(torch.float16).float()).reshape(x.shape)


def simulated_logits(model_fn, ids, act: bool, keep_embd: bool) -> np.ndarray:
    model = model_fn()
    model.config.tie_word_embeddings = False
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        if head.weight.data_ptr() == emb.data_ptr():
            head.weight = torch.nn.Parameter(emb.detach().clone())
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                is_head = mod is head
                if not (is_head and keep_embd):
                    mod.weight.copy_(q8_roundtrip(mod.weight))
                if act and not (is_head and keep_embd) and mod.weight.shape[-1] % 32 == 0:
                    mod.register_forward_pre_hook(lambda m, inp: (_quant_act(inp[0]),))
        if not keep_embd:
            emb.copy_(q8_roundtrip(emb))
        out = hf_logits(model, ids)
    del model
    gc.collect()
    return out


# -- driver -------------------------------------------------------------------------------------------


def measure(label: str, folder: Path, ids: list[list[int]], workdir: Path, threads: int, simulate: bool,
            extra: list = ()) -> dict:
    from structprune.export.gguf import export_gguf

    from structprune import load_pruned
    from structprune.models import load_model

    def hf_model():
        cfg = json.loads((folder / "config.json").read_text())
        if cfg.get("structprune"):
            return load_pruned(folder, dtype=torch.float32).eval()
        return load_model(str(folder), dtype=torch.float32)[0].eval()

    targets = np.concatenate([np.array(w[1:] + [-1]) for w in ids])
    m = hf_model()
    ref = hf_logits(m, ids)
    del m
    gc.collect()
    files = {}
    for t in ("f32", "f16", "q8_0"):
        files[t] = workdir / f"{t}.gguf"
        export_gguf(folder, files[t], t)
    files["q8_0/llama-quantize"] = workdir / "lq8.gguf"
    llama_quantize(files["f32"], files["q8_0/llama-quantize"], None)
    for e in ("f16", "f32"):
        files[f"q8_0, token_embd {e.upper()}"] = workdir / f"lq8-embd-{e}.gguf"
        llama_quantize(files["f32"], files[f"q8_0, token_embd {e.upper()}"], e)
    for k, (variant, embd, overrides) in enumerate(extra):
        files[variant] = workdir / f"extra{k}.gguf"
        llama_quantize(files["f32"], files[variant], embd, overrides)
    logits = {name: llama_cpp_logits(p, ids, threads) for name, p in files.items()}
    rows = []
    for name, got in logits.items():
        rows.append({"variant": name, "engine": "llama.cpp", "bytes": files[name].stat().st_size,
                     "types": tensor_types(files[name]), "vs_transformers": stats(got, ref, targets),
                     "vs_llamacpp_f32": stats(got, logits["f32"]), "vs_llamacpp_f16": stats(got, logits["f16"])})
    for p in files.values():
        p.unlink(missing_ok=True)
    if simulate:
        for act in (False, True):
            for keep in (False, True):
                name = (f"torch: Q8_0 weights{' + Q8_0 activations' if act else ''}"
                        f"{', embd/output float' if keep else ''}")
                got = simulated_logits(hf_model, ids, act, keep)
                rows.append({"variant": name, "engine": "torch", "vs_transformers": stats(got, ref, targets)})
    return {"model": label, "folder": str(folder), "rows": rows,
            "transformers_next_token_acc": float((ref.argmax(-1) == targets)[targets >= 0].mean()),
            "reference_margin_below": {str(m): float((np.diff(np.sort(ref, -1)[:, -2:], axis=-1)[:, 0] < m).mean())
                                       for m in (0.1, 0.5)}}


def to_markdown(results: list[dict], meta: dict) -> str:
    lines = ["# Top-1 agreement of llama.cpp GGUF variants on real text (SmolLM2-135M)", "",
             f"{meta.get('windows', 1)} window(s) of {meta['tokens']} consecutive WikiText-2 test tokens (the first "
             "is tests/test_gguf.py's: the start of `load_text('wikitext2')`), each in a fresh context in one "
             "batch, F32 KV cache, llama-cpp-python "
             f"{meta['llama_cpp_python']}; reference logits: transformers float32. `agree`: share of positions "
             "whose argmax is the reference's; `near-ties`: of the disagreeing positions, those where the "
             "reference's top-2 logit margin is below 0.1 (and below 0.5).", "",
             f"    {meta['command']}", ""]
    for res in results:
        lines += [f"## {res['model']} (`{res['folder']}`)", "",
                  "| variant | file MB | tensor types | agree vs transformers f32 | disagree (near-ties <0.1 / <0.5) "
                  "| agree vs llama.cpp F32 | agree vs llama.cpp F16 | max abs dlogit vs transformers | next-token accuracy |",
                  "|---|---:|---|---:|---|---:|---:|---:|---:|"]
        for r in res["rows"]:
            t = r["vs_transformers"]
            f32 = r.get("vs_llamacpp_f32")
            f16 = r.get("vs_llamacpp_f16")
            types = ", ".join(f"{k} {v}" for k, v in sorted(r.get("types", {}).items()))
            lines.append(f"| {r['variant']} | {r['bytes'] / 1e6:.1f} | {types} | " if "bytes" in r else
                         f"| {r['variant']} | | | ")
            lines[-1] += (f"{t['agree']:.3f} | {t['disagree']} ({t['near_tie_0.1']} / {t['near_tie_0.5']}) | "
                          f"{f32['agree']:.3f} | {f16['agree']:.3f} | {t['max_dlogit']:.3g} | {t.get('next_token_acc', float('nan')):.3f} |"
                          if f32 else
                          f"{t['agree']:.3f} | {t['disagree']} ({t['near_tie_0.1']} / {t['near_tie_0.5']}) | | | "
                          f"{t['max_dlogit']:.3g} | {t.get('next_token_acc', float('nan')):.3f} |")
        lines += ["", f"transformers float32 next-token accuracy {res['transformers_next_token_acc']:.3f}; positions whose "
                  f"top-2 margin is below 0.1: {res['reference_margin_below']['0.1']:.3f}, below 0.5: "
                  f"{res['reference_margin_below']['0.5']:.3f}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True, help="LABEL=FOLDER")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--variant", action="append", default=[],
                    help="extra q8_0 variant through llama.cpp's quantizer: 'LABEL=EMBD;REGEX:TYPE;...' (EMBD: f16, "
                         "f32 or - for the default; e.g. 'ffn_down F16=-;ffn_down:f16')")
    ap.add_argument("--windows", type=int, default=1, help="consecutive windows of --tokens, each in a fresh context")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-simulate", action="store_true")
    ap.add_argument("--out", required=True, help="output prefix (.json and .md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import llama_cpp
    from transformers import AutoTokenizer

    from structprune.data.corpora import load_text

    extra = []
    for spec in args.variant:  # LABEL=EMBD_TYPE|-;REGEX:TYPE;...
        label, rest = spec.split("=", 1)
        embd, *pairs = rest.split(";")
        extra.append((label, None if embd in ("-", "") else embd, dict(p.rsplit(":", 1) for p in pairs if p)))
    results = []
    for spec in args.model:
        label, folder = spec.split("=", 1)
        folder = Path(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        text = load_text("wikitext2")[: 20000 * args.windows]
        ids = tok(text)["input_ids"]
        ids = [ids[i * args.tokens:(i + 1) * args.tokens] for i in range(args.windows)]
        with tempfile.TemporaryDirectory(prefix="gguf-agree-") as tmp:
            res = measure(label, folder, ids, Path(tmp), args.threads, not args.no_simulate, extra)
        results.append(res)
        for r in res["rows"]:
            print(label, r["variant"], json.dumps(r["vs_transformers"]), flush=True)
    meta = {"tokens": args.tokens, "windows": args.windows, "llama_cpp_python": llama_cpp.__version__,
            "command": "python benchmarks/gguf_agreement.py " + " ".join(
                f"'{a}'" if " " in a or "%" in a else a for a in (argv or sys.argv[1:]))}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    out.with_suffix(".md").write_text(to_markdown(results, meta))
    print(to_markdown(results, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
