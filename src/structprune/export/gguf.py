"""Write a model folder (pruned or dense; LLaMA, Mistral, Qwen2) as a GGUF file for llama.cpp / ollama.

**Architectures.** llama.cpp's plain ``llama`` and ``qwen2`` graphs size every layer from one
set of hyper-parameters, so they cannot hold a model whose layers keep different numbers of
heads, KV heads or MLP channels. Its ``deci`` architecture (the Nemotron-NAS graph,
``src/models/deci.cpp``) reads ``deci.attention.head_count``, ``.head_count_kv`` and
``deci.feed_forward_length`` as per-layer arrays and builds each layer at its own size, with
the LLaMA block otherwise (RMSNorm, SwiGLU, llama.cpp's "normal" RoPE, optional q/k/v, o and
MLP biases). So:

- per-layer widths (any of the three families) are written as ``deci``, with an explicit
  ``key_length``/``value_length`` (llama.cpp would otherwise derive head_dim from layer 0);
- uniform widths (a ``--uniform-widths`` export or a dense checkpoint) as the family's own
  architecture: ``llama`` for LLaMA and Mistral, ``qwen2`` for Qwen2 while it keeps its stock
  layout (all heads, q/k/v biases only); a Qwen2 model with heads removed or with output biases
  (which llama.cpp's ``qwen2`` graph cannot hold) is written as the equivalent ``llama``.

Tensors, rope, norms and tokenizer metadata are written as llama.cpp's ``convert_hf_to_gguf.py``
writes them: the same tensor names, q/k rows (and biases) permuted to interleaved RoPE pairs per
head (with *that layer's* head counts), 1-D tensors in F32, ``rope_freqs`` for Llama 3's rope
scaling, tokens with their types, merges, special ids and the chat template via
``gguf.SpecialVocab``, and the BPE pre-tokenizer named by llama.cpp's hash table
(:mod:`structprune.export.tokenizer_pre`).

**Types.** ``f32``, ``f16`` and ``bf16`` are written here; ``q8_0`` is quantized with the
``gguf`` package's reference quantizer (as ``convert_hf_to_gguf.py --outtype q8_0``; rows whose
length is not a multiple of 32 stay F16, as llama.cpp's own quantizer does); the K-quants and
the other llama.cpp types go through llama.cpp's quantizer (``llama_model_quantize`` from
llama-cpp-python, ``pip install 'structprune[gguf]'``) from a lossless intermediate file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch

from ..errors import StructPruneError
from .tokenizer_pre import CHKTXT, KNOWN_NAMES, PRE_TOKENIZERS

log = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral", "qwen2")
# Written by this module.
DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's quantizer (llama_ftype values of llama.h).
LLAMA_CPP_TYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13,
                   "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}
TYPES = DIRECT_TYPES + tuple(LLAMA_CPP_TYPES)
INSTALL_HINT = "pip install 'structprune[gguf]'"

# HF (per layer) -> llama.cpp tensor names (gguf.TENSOR_NAMES for LLaMA-like blocks).
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}


def check_type(gguf_type: str) -> str:
    """The normalised type name, or a refusal: unknown, or a llama.cpp type without llama-cpp-python."""
    t = gguf_type.strip().lower()
    if t not in TYPES:
        raise StructPruneError(f"unknown GGUF type {gguf_type!r}: choose one of {', '.join(TYPES)}")
    if t in LLAMA_CPP_TYPES and not llama_cpp_available():
        raise StructPruneError(f"GGUF type {t} needs llama.cpp's quantizer (llama-cpp-python): {INSTALL_HINT} "
                               f"(or write {', '.join(DIRECT_TYPES)} without it)")
    return t


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def check_family(model_type: str, uniform: bool | None = None) -> None:
    """Refuse, in one line, a family llama.cpp cannot run from this exporter (``uniform``: the
    model's widths, when known, to name the alternative)."""
    if model_type in FAMILIES:
        return
    alt = ("write it with --uniform-widths and convert that stock folder with llama.cpp's convert_hf_to_gguf.py"
           if uniform is not True else "convert this stock folder with llama.cpp's convert_hf_to_gguf.py")
    raise StructPruneError(f"GGUF export supports the {', '.join(FAMILIES)} families (llama.cpp's per-layer 'deci' "
                           f"graph is a LLaMA block); {model_type!r} is not one of them: {alt}")


# -- reading the folder -------------------------------------------------------------------------------


class _Weights:
    """Tensors of a folder's safetensors files, read one at a time."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise StructPruneError(f"{folder} has no safetensors weights (model.safetensors or its index)")
        self._handles = {}
        self.where: dict[str, str] = {}
        for f in files:
            h = safe_open(str(folder / f), framework="pt")
            self._handles[f] = h
            for k in h.keys():
                self.where[k] = f
        self.shapes = {k: tuple(self._handles[f].get_slice(k).get_shape()) for k, f in self.where.items()}

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self.where[key]].get_tensor(key)


def _rope(cfg: dict) -> tuple[dict, str]:
    """The rope parameters (transformers 5's ``rope_parameters`` or the older keys) and their type."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    params = dict(params.get("full_attention", params))
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = str(params.get("rope_type", params.get("type", "default")) or "default").lower()
    return params, kind


@dataclass
class Layout:
    """What the exporter reads from a folder: family, sizes and each layer's widths (from the tensors)."""

    family: str
    hidden: int
    head_dim: int
    vocab: int
    layers: list[dict]  # heads, kv_heads, mlp, and which biases exist
    tied: bool
    cfg: dict = field(repr=False, default_factory=dict)

    @property
    def uniform(self) -> bool:
        return all(l == self.layers[0] for l in self.layers[1:])

    def arch(self) -> str:
        """The llama.cpp architecture for these widths (module docstring)."""
        if not self.uniform:
            return "deci"
        first = self.layers[0]
        if self.family == "qwen2":
            stock = (first["heads"] * self.head_dim == self.hidden and first["kv_heads"] > 0 and first["qkv_bias"]
                     and not first["o_bias"] and not first["mlp_bias"])
            return "qwen2" if stock else "llama"
        return "llama"


def read_layout(folder: Path, weights: _Weights | None = None) -> Layout:
    from .loader import read_model_config

    cfg = read_model_config(folder)
    family = cfg.get("structprune_base_model_type") or cfg["model_type"]
    if family.startswith("structprune_"):
        family = family[len("structprune_"):]
    widths = (cfg.get("structprune") or {}).get("layers")
    check_family(family, all(w == widths[0] for w in widths) if widths else "layer_num_heads" not in cfg)
    w = weights or _Weights(folder)
    hidden, n_layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    head_dim = int(cfg.get("head_dim") or hidden // int(cfg["num_attention_heads"]))
    layers = []
    for i in range(n_layers):
        p = f"model.layers.{i}."
        rows = {k: (w.shapes.get(f"{p}{k}.weight") or (0, 0))[0]
                for k in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj")}
        for k, n in rows.items():
            if n % (head_dim if "attn" in k else 1):
                raise StructPruneError(f"layer {i}: {k} has {n} rows, not a multiple of head_dim {head_dim}")
        layers.append({
            "heads": rows["self_attn.q_proj"] // head_dim, "kv_heads": rows["self_attn.k_proj"] // head_dim,
            "mlp": rows["mlp.gate_proj"],
            "qkv_bias": f"{p}self_attn.q_proj.bias" in w.shapes, "o_bias": f"{p}self_attn.o_proj.bias" in w.shapes,
            "mlp_bias": any(f"{p}mlp.{m}_proj.bias" in w.shapes for m in ("gate", "up", "down")),
        })
    vocab = int(w.shapes["model.embed_tokens.weight"][0])
    tied = "lm_head.weight" not in w.shapes
    return Layout(family, hidden, head_dim, vocab, layers, tied, cfg)


def check_expressible(lay: Layout) -> None:
    """Refuse what llama.cpp's graph would compute differently from transformers (deci.cpp)."""
    for i, l in enumerate(lay.layers):
        if l["heads"] and not l["kv_heads"]:
            raise StructPruneError(f"layer {i} has query heads but no KV heads; llama.cpp reads that as "
                                   "Nemotron's linear attention")
        if l["kv_heads"] and l["heads"] % l["kv_heads"]:
            raise StructPruneError(f"layer {i}: {l['heads']} query heads are not a multiple of its "
                                   f"{l['kv_heads']} KV heads")
        if l["mlp"] == 0 and l["heads"]:
            raise StructPruneError(f"layer {i} keeps attention but no MLP channel: llama.cpp's deci graph then drops "
                                   "that layer's attention too; prune with --uniform-widths")
        if l["heads"] == 0 and l["o_bias"]:
            raise StructPruneError(f"layer {i} has no attention heads but an attention output bias, which llama.cpp's "
                                   "deci graph ignores; prune with --uniform-widths")
    if lay.layers[0]["heads"] == 0:
        raise StructPruneError("layer 0 keeps no attention head: llama.cpp derives the rope size from layer 0; "
                               "prune with --uniform-widths")
    _, kind = _rope(lay.cfg)
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise StructPruneError(f"rope type {kind!r} has no GGUF mapping here (default, linear, llama3, yarn); "
                               "llama.cpp's convert_hf_to_gguf.py handles the stock model")


# -- tokenizer ----------------------------------------------------------------------------------------


def pre_tokenizer_name(tokenizer) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` for a BPE tokenizer (its converter's hash), or None if unknown."""
    ids = tokenizer.encode(CHKTXT)
    hit = PRE_TOKENIZERS.get(sha256(str(ids).encode()).hexdigest())
    return hit[0] if hit else None


def _add_vocab(writer, folder: Path, n_vocab: int, tokenizer_pre: str | None) -> dict:
    """Tokenizer metadata as llama.cpp's converter writes it; returns what was written (for the log)."""
    import gguf
    from transformers import AutoTokenizer

    tok_json = folder / "tokenizer.json"
    if not tok_json.is_file():
        raise StructPruneError(f"{folder} has no tokenizer.json (a fast tokenizer); save the tokenizer with "
                               "transformers first")
    model = json.loads(tok_json.read_text(encoding="utf-8")).get("model", {})
    if model.get("type") != "BPE":
        raise StructPruneError(f"tokenizer type {model.get('type')!r} is not BPE; llama.cpp's converter "
                               "(convert_hf_to_gguf.py, with sentencepiece) handles it")
    # SentencePiece-derived BPE with byte fallback (Llama 1/2, Mistral v0.1): llama.cpp's 'llama' vocabulary;
    # otherwise GPT-2-style byte-level BPE (Llama 3, SmolLM2, Qwen2): 'gpt2' with merges and a pre-tokenizer.
    spm = gguf.LlamaHfVocab(folder) if model.get("byte_fallback") else None
    tok = AutoTokenizer.from_pretrained(folder)
    if spm is not None:
        tokens, scores, types = [], [], []
        for text, score, ttype in spm.all_tokens():
            tokens.append(text), scores.append(score), types.append(ttype)
        for i in range(len(tokens), n_vocab):
            tokens.append(f"[PAD{i}]".encode()), scores.append(-1000.0), types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
        special.add_special_token.setdefault("bos", _adds_bos(tok))
        _chat_template(special, folder)
        special.add_to_gguf(writer, quiet=True)
        return {"model": "llama", "pre": "default", "tokens": len(tokens)}

    pre = tokenizer_pre or pre_tokenizer_name(tok)
    if pre is None:
        raise StructPruneError("llama.cpp does not know this tokenizer's pre-tokenizer (its hash is not in "
                               "llama.cpp's table); pass --tokenizer-pre NAME (e.g. llama-bpe, qwen2, smollm, gpt-2)")
    if pre not in KNOWN_NAMES:
        raise StructPruneError(f"unknown --tokenizer-pre {pre!r}: llama.cpp knows {', '.join(sorted(KNOWN_NAMES))}")
    vocab = tok.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise StructPruneError(f"the tokenizer has ids up to {max(vocab.values())} but the model only "
                               f"{n_vocab} embedding rows")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):  # as convert_hf_to_gguf's get_vocab_base
        if i not in reverse:
            tokens.append(f"[PAD{i}]"), types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    # Whether a BOS is prepended: what the Hugging Face tokenizer does (llama.cpp's converter hard-codes
    # False for 49152-token vocabularies; SmolLM2's tokenizer adds none either).
    special.add_special_token["bos"] = _adds_bos(tok)
    _chat_template(special, folder)
    special.add_to_gguf(writer, quiet=True)
    return {"model": "gpt2", "pre": pre, "tokens": len(tokens), "merges": len(special.merges)}


def _adds_bos(tok) -> bool:
    """Whether the Hugging Face tokenizer prepends its BOS (llama.cpp's ``add_bos_token``)."""
    bos = tok.bos_token_id
    return bos is not None and tok("a")["input_ids"][:1] == [bos]


def _chat_template(special, folder: Path) -> None:
    """transformers 5 saves the chat template as ``chat_template.jinja``; older gguf packages read only
    ``tokenizer_config.json``."""
    jinja = folder / "chat_template.jinja"
    if special.chat_template is None and jinja.is_file():
        special.chat_template = jinja.read_text(encoding="utf-8")


def _looks_special(token: str) -> bool:  # convert_hf_to_gguf's does_token_look_special
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


# -- tensors ------------------------------------------------------------------------------------------


def _permute(t: torch.Tensor, heads: int) -> torch.Tensor:
    """HF rotate-half q/k rows to llama.cpp's interleaved pairs, per head (``LlamaModel.permute``)."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _llama3_rope_factors(params: dict, head_dim: int) -> np.ndarray:
    """``rope_freqs.weight`` of a Llama-3 rope scaling (convert_hf_to_gguf's LlamaModel.generate_extra_tensors)."""
    base = float(params.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old = float(params.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _tensor_plan(lay: Layout, weights: _Weights) -> list[tuple[str, str | None, int | None]]:
    """``(gguf name, HF key or None for rope_freqs, heads to permute by or None)`` in llama.cpp's order."""
    plan = [("token_embd.weight", "model.embed_tokens.weight", None)]
    params, kind = _rope(lay.cfg)
    if kind == "llama3":
        plan.append(("rope_freqs.weight", None, None))
    known = set(_GLOBAL_NAMES) | {"lm_head.weight"}
    for i, l in enumerate(lay.layers):
        p = f"model.layers.{i}."
        for hf, name in _LAYER_NAMES.items():
            for suffix in ("weight", "bias"):
                key = f"{p}{hf}.{suffix}"
                if key not in weights.shapes:
                    continue
                known.add(key)
                if hf == "input_layernorm" and l["heads"] == 0:
                    continue  # an attention-free layer has no attention norm in llama.cpp
                if hf == "post_attention_layernorm" and l["mlp"] == 0:
                    continue
                if suffix == "bias" and not weights.get(key).any():
                    continue  # a zero bias the stock HF layout needed (export/writer.py); llama.cpp's are optional
                heads = l["heads"] if hf == "self_attn.q_proj" else l["kv_heads"] if hf == "self_attn.k_proj" else None
                plan.append((f"blk.{i}.{name}.{suffix}", key, heads))
    plan.append(("output_norm.weight", "model.norm.weight", None))
    if not lay.tied:
        plan.append(("output.weight", "lm_head.weight", None))
    unknown = sorted(k for k in weights.shapes if k not in known and not k.endswith("rotary_emb.inv_freq"))
    if unknown:
        raise StructPruneError(f"tensor {unknown[0]!r} has no place in llama.cpp's LLaMA block "
                               f"({len(unknown)} such tensors)")
    return plan


def _raw_type(shape: tuple, gguf_type: str):
    """The ggml type a tensor of ``shape`` gets in a file of ``gguf_type`` (1-D tensors stay F32, as the
    converter's; under q8_0 a row not divisible by the 32-value block stays F16, as llama.cpp's quantizer does)."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1 or gguf_type == "f32":
        return Q.F32
    if gguf_type == "q8_0" and shape[-1] % 32 == 0:
        return Q.Q8_0
    return Q.BF16 if gguf_type == "bf16" else Q.F16


def _nbytes(shape: tuple, raw) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[raw]
    return math.prod(shape) // block * size


def _encode(t: torch.Tensor, raw) -> np.ndarray:
    import gguf
    from gguf import GGMLQuantizationType as Q

    if raw == Q.F32:
        return t.float().numpy()
    if raw == Q.F16:
        return t.to(torch.float16).numpy()
    if raw == Q.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy()
    return gguf.quants.quantize(t.float().numpy(), raw)  # Q8_0: the gguf package's port of llama.cpp's quantizer


FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}


@dataclass
class GGUFResult:
    """What :func:`export_gguf` wrote."""

    path: Path
    arch: str
    type: str
    bytes: int
    layers: list[dict]
    tokenizer: dict
    fallbacks: list[str]  # tensors not in the requested type (block size)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "architecture": self.arch, "type": self.type, "bytes": self.bytes,
                "tokenizer": self.tokenizer, "fallback_tensors": len(self.fallbacks)}


def export_gguf(folder: str | os.PathLike, output: str | os.PathLike, gguf_type: str = "f16",
                tokenizer_pre: str | None = None, name: str | None = None) -> GGUFResult:
    """Write the model folder ``folder`` as ``output`` (a GGUF of type ``gguf_type``)."""
    folder = Path(folder)
    output = Path(output)
    gguf_type = check_type(gguf_type)
    weights = _Weights(folder)
    lay = read_layout(folder, weights)
    check_expressible(lay)
    _warn_block_sizes(lay, gguf_type)
    if gguf_type in LLAMA_CPP_TYPES:
        return _export_quantized(folder, output, gguf_type, weights, lay, tokenizer_pre, name)
    return _write(folder, output, gguf_type, weights, lay, tokenizer_pre, name)


def _warn_block_sizes(lay: Layout, gguf_type: str) -> None:
    """llama.cpp quantizes rows in blocks of 32 values (q8_0, q4_0, q5_x) or 256 (K-quants); a row that does
    not divide falls back to a wider type (llama-quant.cpp): F16 off the 32 grid, Q5_0/Q5_1/Q8_0 off the 256."""
    if gguf_type in ("f32", "f16", "bf16"):
        return
    off32 = sorted({l["mlp"] for l in lay.layers if l["mlp"] % 32})
    off256 = sorted({l["mlp"] for l in lay.layers if l["mlp"] % 256 and not l["mlp"] % 32})
    if off32:
        log.warning("MLP widths %s are not multiples of 32: llama.cpp keeps those layers' down projections in F16 "
                    "in this %s file; prune with --mlp-multiple 32 for full coverage", off32[:8], gguf_type)
    if "_k" in gguf_type and off256:
        log.warning("MLP widths %s are not multiples of 256: llama.cpp quantizes those down projections with a "
                    "32-value type (Q5_0/Q5_1/Q8_0) instead of a K-quant (--mlp-multiple 256 avoids it)",
                    off256[:8])
    if lay.hidden % (256 if "_k" in gguf_type else 32):
        log.warning("hidden size %d is not a multiple of %d: llama.cpp falls back for most tensors of this %s file "
                    "(a property of the model, pruned or not)", lay.hidden, 256 if "_k" in gguf_type else 32,
                    gguf_type)


def _write(folder: Path, output: Path, gguf_type: str, weights: _Weights, lay: Layout, tokenizer_pre, name) -> GGUFResult:
    import gguf

    arch = lay.arch()
    cfg = lay.cfg
    plan = _tensor_plan(lay, weights)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.partial"
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or folder.resolve().name)
    record = cfg.get("structprune") or {}
    if record:
        w.add_string("general.source.structprune", json.dumps(
            {k: record.get(k) for k in ("method", "sparsity", "format")}, sort_keys=True))
    n = len(lay.layers)
    w.add_block_count(n)
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(lay.hidden)
    heads = [l["heads"] for l in lay.layers]
    kv = [l["kv_heads"] for l in lay.layers]
    ff = [l["mlp"] for l in lay.layers]
    if arch == "deci":
        w.add_feed_forward_length(ff)
        w.add_head_count(heads)
        w.add_head_count_kv(kv)
    else:
        w.add_feed_forward_length(ff[0])
        w.add_head_count(heads[0])
        w.add_head_count_kv(kv[0])
    params, kind = _rope(cfg)
    w.add_rope_freq_base(float(params["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_key_length(lay.head_dim)
    w.add_value_length(lay.head_dim)
    w.add_file_type(FILE_TYPES[gguf_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(lay.vocab)
    w.add_rope_dimension_count(lay.head_dim)
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(params["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(params["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
    for key in ("sliding_window",):
        if cfg.get(key) and cfg.get("use_sliding_window", True) and cfg[key] < cfg.get("max_position_embeddings", 0):
            log.warning("llama.cpp's %s graph ignores the sliding window (%d tokens), as it does for the stock model; "
                        "contexts beyond it differ from transformers", arch, cfg[key])
    tokenizer = _add_vocab(w, folder, lay.vocab, tokenizer_pre)

    # Tensor infos first, then the data one tensor at a time (a large model never sits in memory whole).
    fallbacks: list[str] = []
    infos = []
    for gname, key, permute_heads in plan:
        shape = (lay.head_dim // 2,) if key is None else weights.shapes[key]
        raw = _raw_type(shape, gguf_type)
        if gguf_type == "q8_0" and len(shape) == 2 and raw != gguf.GGMLQuantizationType.Q8_0:
            fallbacks.append(gname)
        w.add_tensor_info(gname, shape, np.dtype(np.float32), _nbytes(shape, raw), raw_dtype=raw)
        infos.append((gname, key, permute_heads, raw))
    if fallbacks:
        log.warning("%d tensors stay F16 in the q8_0 file (rows not a multiple of 32)", len(fallbacks))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for gname, key, permute_heads, raw in infos:
            t = torch.from_numpy(_llama3_rope_factors(params, lay.head_dim)) if key is None else weights.get(key)
            if permute_heads is not None:
                t = _permute(t, permute_heads)
            w.write_tensor_data(_encode(t, raw))
        w.close()
        os.replace(tmp, output)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return GGUFResult(output, arch, gguf_type, output.stat().st_size, lay.layers, tokenizer, fallbacks)


def _export_quantized(folder: Path, output: Path, gguf_type: str, weights: _Weights, lay: Layout, tokenizer_pre,
                      name) -> GGUFResult:
    """Write a lossless intermediate (the weights' own float type) and quantize it with llama.cpp."""
    dtypes = {weights.get(k).dtype for k in ("model.embed_tokens.weight",)}
    inter = {torch.float16: "f16", torch.bfloat16: "bf16"}.get(dtypes.pop(), "f32")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=output.parent) as tmpdir:
        src = _write(folder, Path(tmpdir) / "model.gguf", inter, weights, lay, tokenizer_pre, name)
        quantize(src.path, output, gguf_type)
    return GGUFResult(output, src.arch, gguf_type, output.stat().st_size, lay.layers, src.tokenizer, [])


def quantize(src: str | os.PathLike, dst: str | os.PathLike, gguf_type: str, threads: int | None = None) -> None:
    """llama.cpp's own quantizer (``llama_model_quantize``) from ``src`` to ``dst``."""
    gguf_type = check_type(gguf_type)
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_CPP_TYPES.get(gguf_type, FILE_TYPES.get(gguf_type))
    params.nthread = threads or max(1, min(4, os.cpu_count() or 1))
    dst = Path(dst)
    tmp = dst.parent / f".{dst.name}.partial"
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise StructPruneError(f"llama.cpp's quantizer failed on {src} (return code {rc})")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def default_name(folder: str | os.PathLike, gguf_type: str) -> str:
    """The file name ``prune --gguf`` gives a GGUF inside its output folder: ``<folder>-<TYPE>.gguf``."""
    return f"{Path(folder).resolve().name}-{gguf_type.upper()}.gguf"
