"""Inference speed of dense and pruned models (docs/protocol.md, "Inference speed").

For each batch size: prefill tokens/s is ``batch * prompt_len`` over the time of one
forward pass on random token ids (what ``generate`` does first, last-position logits
only); decode tokens/s is ``batch * new_tokens`` over (time of ``generate`` with the
KV cache and exactly ``new_tokens`` new tokens) minus (prefill time). Times are the
median of ``repeats`` runs after ``warmup`` runs, with ``torch.cuda.synchronize()``
around each on GPU. Peak memory is ``torch.cuda.max_memory_allocated`` on GPU; on CPU
it is the process's peak resident set size (``getrusage``), which never goes down,
so it includes everything the process did before (run one model per process for a
clean CPU figure).
"""

from __future__ import annotations

import inspect
import json
import logging
import platform
import statistics
import time

import torch

from .errors import StructPruneError
from .memory import empty_caches, peak_rss, reset_peak_rss

log = logging.getLogger(__name__)



def hardware_name(device: torch.device | str = "cpu") -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Freed heap pages (an earlier model's tensors) stay resident until trimmed, and would count
        # in this model's peak: glibc raises its mmap threshold after large frees, so they need not
        # have been returned to the system.
        empty_caches(device)
        reset_peak_rss()


def peak_memory(device: torch.device) -> tuple[int, str]:
    """``(bytes, what it is)``: CUDA max allocated since the last reset, or the CPU process's peak
    resident memory since the last reset (this model's measurements, its weights included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    rss, kind = peak_rss()
    return rss, "cpu_peak_rss" if "VmHWM" in kind else "cpu_process_peak_rss"


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


@torch.inference_mode()
def bench_model(model, *, batch_sizes=(1, 16), prompt_len: int = 2048, new_tokens: int = 128, repeats: int = 5,
                warmup: int = 2, seed: int = 0) -> list[dict]:
    """Prefill and decode throughput of ``model`` (on its device) for each batch size; one dict per size."""
    if repeats < 1 or warmup < 0 or prompt_len < 1 or new_tokens < 1:
        raise StructPruneError("repeats, prompt length and new tokens must be positive, warm-up non-negative")
    ctx = context_length(model)
    if ctx is not None and prompt_len + new_tokens > ctx:
        raise StructPruneError(f"prompt length {prompt_len} + {new_tokens} new tokens exceeds the model's "
                               f"context of {ctx}; pass a smaller --prompt-len")
    model.eval()
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    # Only the last position's logits, as generate does: full [batch, prompt, vocab] logits
    # would dominate time and memory for small models with large vocabularies.
    fwd_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    rows = []
    for batch in batch_sizes:
        g = torch.Generator().manual_seed(seed + batch)
        ids = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)
        mask = torch.ones_like(ids)

        def prefill():
            model(input_ids=ids, attention_mask=mask, use_cache=True, **fwd_kwargs)

        def generate():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=pad)
            assert out.shape[1] == prompt_len + new_tokens

        _reset_peak(device)
        for _ in range(warmup):
            prefill()
            generate()
        t_prefill = statistics.median(_timed(prefill, device) for _ in range(repeats))
        t_generate = statistics.median(_timed(generate, device) for _ in range(repeats))
        mem, mem_kind = peak_memory(device)
        decode_s = t_generate - t_prefill
        rows.append({
            "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "prefill_s": t_prefill, "generate_s": t_generate,
            "prefill_tok_s": batch * prompt_len / t_prefill,
            "decode_tok_s": batch * new_tokens / decode_s if decode_s > 0 else float("nan"),
            "peak_mem_bytes": mem, "peak_mem_kind": mem_kind,
        })
        log.info("batch %d: prefill %.0f tok/s, decode %.1f tok/s", batch, rows[-1]["prefill_tok_s"],
                 rows[-1]["decode_tok_s"])
    return rows


def model_summary(model) -> dict:
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"params": params, "weights_bytes": nbytes,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "structprune": getattr(model.config, "structprune", None)}


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def format_table(results: dict[str, dict]) -> str:
    """A markdown table: one row per model and batch size, speed-ups against the first model."""
    names = list(results)
    base = {r["batch"]: r for r in results[names[0]]["rows"]}
    head = ("| model | params | batch | prefill tok/s | decode tok/s | prefill speed-up | decode speed-up "
            "| peak memory |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        res = results[name]
        for r in res["rows"]:
            b = base.get(r["batch"])
            sp = (f"{r['prefill_tok_s'] / b['prefill_tok_s']:.2f}x", f"{r['decode_tok_s'] / b['decode_tok_s']:.2f}x") \
                if b else ("", "")
            lines.append(f"| {name} | {_count(res['params'])} | {r['batch']} | {r['prefill_tok_s']:,.0f} | "
                         f"{r['decode_tok_s']:,.1f} | {sp[0]} | {sp[1]} | {_mib(r['peak_mem_bytes'])} |")
    kind = results[names[0]]["rows"][0]["peak_mem_kind"]
    lines.append("")
    lines.append("peak memory: " + {
        "cuda_max_memory_allocated": "torch.cuda.max_memory_allocated",
        "cpu_peak_rss": "peak resident memory of the process during that model's runs (VmHWM, reset per model)",
    }.get(kind, "CPU process peak RSS (getrusage; cumulative over the process)"))
    return "\n".join(lines)


def _load(spec: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool):
    """The model alone: random token ids need no tokenizer (exports may be saved without one)."""
    from .export.loader import is_structprune_export, load_pruned
    from .models.loading import load_model, resolve_model

    resolved = resolve_model(spec)
    if resolved.kind == "hf-folder" and is_structprune_export(resolved.path):
        return load_pruned(resolved.path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return load_model(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)[0]


def run_bench(spec: str, compare: str | None = None, *, device: torch.device, dtype: torch.dtype,
              batch_sizes=(1, 16), prompt_len: int = 2048, new_tokens: int = 128, repeats: int = 5,
              warmup: int = 2, json_path: str | None = None, trust_remote_code: bool = False) -> dict:
    """Load ``spec`` (and ``compare``), benchmark each in turn, print a table, optionally write JSON."""
    results = {}
    for name in [spec] + ([compare] if compare else []):
        model = _load(name, dtype, device, trust_remote_code)
        rows = bench_model(model, batch_sizes=batch_sizes, prompt_len=prompt_len, new_tokens=new_tokens,
                           repeats=repeats, warmup=warmup)
        results[name] = {**model_summary(model), "rows": rows}
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = {
        "settings": {"batch_sizes": list(batch_sizes), "prompt_len": prompt_len, "new_tokens": new_tokens,
                     "repeats": repeats, "warmup": warmup, "device": str(device),
                     "dtype": str(dtype).replace("torch.", "")},
        "hardware": hardware_name(device),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "models": results,
    }
    print(format_table(results))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2, default=str)
            f.write("\n")
    return out
