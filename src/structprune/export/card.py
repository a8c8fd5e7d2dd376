"""The model card (``README.md``) of an output folder, in the Hugging Face form.

YAML front matter (``base_model``, ``license`` carried from the source where known, ``tags``,
``pipeline_tag``, ``library_name``), then the method, sparsity, per-layer widths, the measured
perplexities of ``report.json``, the command, and how to load the folder in transformers and
run its GGUF files in llama.cpp / ollama. Written from ``report.json`` and ``config.json``
alone, so it can be (re)written for any output folder.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

# Model aliases StructPrune resolves itself -> (hub id of the base model, its licence).
KNOWN_BASES = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
               "smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _front_matter(readme: Path) -> dict[str, str]:
    """Flat ``key: value`` pairs of a model card's YAML front matter (enough for license/base_model)."""
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    m = re.match(r"---\n(.*?)\n---", text, re.S)
    if not m:
        return {}
    out = {}
    for line in m.group(1).splitlines():
        k, sep, v = line.partition(":")
        if sep and not line.startswith((" ", "-")) and v.strip():
            out[k.strip()] = v.strip().strip("'\"")
    return out


def base_and_license(source: str | None) -> tuple[str | None, str | None]:
    """The hub id and licence of the model that was pruned, where they can be known offline."""
    if not source:
        return None, None
    if source.lower() in KNOWN_BASES:
        return KNOWN_BASES[source.lower()]
    path = Path(source).expanduser()
    if path.is_dir():
        fm = _front_matter(path / "README.md")
        return fm.get("base_model") or None, fm.get("license") or None
    if _HUB_ID.match(source) and not path.exists():
        return source, None
    return None, None


def _widths(report: dict, config: dict) -> list[dict]:
    return report.get("layers") or (config.get("structprune") or {}).get("layers") or []


def _dense_widths(config: dict) -> tuple[int | None, int | None, int | None]:
    return (config.get("num_attention_heads"), config.get("num_key_value_heads") or config.get("num_attention_heads"),
            config.get("intermediate_size"))


def model_card(folder: Path, report: dict | None = None) -> str:
    report = report or {}
    config = {}
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
    family = config.get("structprune_base_model_type") or config.get("model_type") or "unknown"
    source = report.get("model")
    base, licence = base_and_license(source)
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    per_layer = (config.get("structprune") or {}).get("format") == "custom" or "layer_num_heads" in config
    name = re.sub(r"^\.(.*)\.partial(-.*)?$", r"\1", folder.name)  # written in .NAME.partial*, then moved
    tags = ["structprune", "pruned", "structured-pruning", family] + (["gguf"] if ggufs else [])
    fm = ["---"]
    if base:
        fm.append(f"base_model: {base}")
    if licence:
        fm.append(f"license: {licence}")
    fm += ["library_name: transformers", "pipeline_tag: text-generation", "tags:"] + [f"- {t}" for t in tags] + ["---"]

    lines = fm + ["", f"# {name}", ""]
    what = f"A structurally pruned version of {f'[{base}](https://huggingface.co/{base})' if base else (source or 'a ' + family + ' model')}"
    lines.append(what + ", made with StructPrune (`pip install structprune`; post-training structured pruning: whole "
                 "attention heads, KV groups and MLP channels are removed, so the model is smaller and faster with "
                 "ordinary dense kernels).")
    lines.append("")
    method = report.get("method")
    if method:
        lines += ["## How it was made", "",
                  f"* method: `{method}` (allocation `{report.get('allocation')}`)"]
        if report.get("sparsity_target") is not None:
            lines.append(f"* sparsity: target {report['sparsity_target']:.2f}, achieved "
                         f"{report.get('sparsity_achieved', float('nan')):.4f} of the prunable decoder parameters "
                         "(q, k, v, o and MLP projections; embeddings and LM head are kept)")
        if report.get("params_before"):
            lines.append(f"* parameters: {report['params_before']:,} → {report['params_after']:,}")
        cal = report.get("calibration")
        if cal:
            lines.append(f"* calibration: {cal.get('source')} {cal.get('nsamples')}×{cal.get('seqlen')} tokens, "
                         f"seed {cal.get('seed')}")
        if report.get("command"):
            lines += ["", "Command:", "", "```bash", report["command"], "```"]
        lines.append("")
    ppl = report.get("ppl") or {}
    if ppl:
        lines += ["## Measured perplexity", "",
                  "Measured by the command above, dense and pruned on the same windows (float32, transformers); "
                  "95% bootstrap intervals over windows.", "",
                  "| dataset | windows | dense | pruned | pruned / dense (paired) |", "|---|---|---|---|---|"]
        for d, p in ppl.items():
            r = p.get("ratio_pruned_to_dense") or {}
            ci = {k: f" [{p[k][0]:.2f}, {p[k][1]:.2f}]" if p.get(k) else "" for k in ("dense_interval", "pruned_interval")}
            ratio = f"{r['value']:.3f} [{r['low']:.3f}, {r['high']:.3f}]" if r else ""
            lines.append(f"| {d} | {p.get('nwindows')} × {p.get('seqlen')} | {p['dense']:.2f}{ci['dense_interval']} | "
                         f"{p['pruned']:.2f}{ci['pruned_interval']} | {ratio} |")
        if report.get("protocol") is None:
            lines.append("")
            lines.append("Few windows (a CPU run's smoke-test sizes) give wide intervals: see the intervals before "
                         "comparing.")
        lines.append("")
    layers = _widths(report, config)
    if layers:
        h, kv, ff = _dense_widths(config) if not per_layer else (None, None, None)
        lines += ["## Widths per layer", "",
                  "Each decoder layer keeps its own number of query heads, KV heads and MLP channels"
                  + ("." if per_layer else " (the same in every layer here)."), "",
                  "| layer | heads | KV heads | MLP channels |", "|---|---|---|---|"]
        lines += [f"| {i} | {l['heads']} | {l['kv_heads']} | {l['mlp']} |" for i, l in enumerate(layers)]
        lines.append("")
    lines += ["## Use it", "", "### transformers", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    remote = ", trust_remote_code=True" if per_layer else ""
    lines += [f'model = AutoModelForCausalLM.from_pretrained("{name}"{remote})',
              f'tok = AutoTokenizer.from_pretrained("{name}")',
              'out = model.generate(**tok("The capital of France is", return_tensors="pt"), max_new_tokens=20)',
              "print(tok.decode(out[0]))", "```", ""]
    if per_layer:
        lines += ["The per-layer widths need the modeling file shipped in this folder (`modeling_structprune.py`, "
                  "torch and transformers only), hence `trust_remote_code=True`.", ""]
    lines += ["### llama.cpp / ollama (GGUF)", ""]
    arch = "`deci` (llama.cpp's per-layer-width LLaMA graph)" if per_layer else f"the {family} family's own"
    if ggufs:
        lines.append(f"GGUF files in this folder ({arch} architecture): " + ", ".join(f"`{g}`" for g in ggufs) + ".")
    else:
        lines.append(f"Write a GGUF ({arch} architecture) with `structprune export {name} --format gguf --type q4_k_m "
                     f"--output {name}-Q4_K_M.gguf`.")
    g = ggufs[-1] if ggufs else f"{name}-Q4_K_M.gguf"
    lines += ["", "```bash", f"llama-cli -m {g} -p \"The capital of France is\" -n 32",
              f"llama-perplexity -m {g} -f wiki.test.raw", "```", "",
              "ollama (a version whose llama.cpp reads per-layer head counts):" if per_layer else "ollama:", "",
              "```bash", f"printf 'FROM ./{g}\\n' > Modelfile", f"ollama create {name.lower()} -f Modelfile",
              f"ollama run {name.lower()} \"The capital of France is\"", "```", ""]
    versions = report.get("versions")
    if versions:
        lines += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in sorted(versions.items()) if isinstance(v, str)),
                  ""]
    if licence:
        lines += ["## Licence", "", f"{licence}, the base model's licence.", ""]
    return "\n".join(lines)


def write_model_card(folder: str | os.PathLike, report: dict | None = None) -> Path:
    folder = Path(folder)
    path = folder / "README.md"
    path.write_text(model_card(folder, report), encoding="utf-8")
    return path
