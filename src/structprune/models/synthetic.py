"""Synthetic checkpoints of real model shapes, streamed to disk tensor by tensor.

A scaling benchmark needs 7B-13B checkpoints on machines that cannot download them.
What it measures (memory and time of pruning one decoder layer at a time) does not
depend on the weights' values, only on their shapes, so random weights of the exact
published shapes stand in for the real ones.

The model is never built: a skeleton on the ``meta`` device gives the tensor names,
shapes and order that ``save_pretrained`` would write, then each tensor is drawn in
float32 chunks of at most ``CHUNK_ELEMENTS`` from a generator seeded by its name, cast,
and appended to its shard file. Peak memory is one chunk (16 MiB of float32 plus its
cast copy) on top of the imported libraries, whatever the model and shard sizes. The safetensors header of a shard is known
before any data (shapes and dtype are), so shards are written as a stream rather than
through ``safetensors.torch.save_file``, which needs the whole shard in memory (twice).

    python -m structprune.models.synthetic llama-2-7b --output /tmp/llama-2-7b
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint_files import safetensors_header
from ..files import apply_umask

logger = logging.getLogger(__name__)

__all__ = [
    "CHUNK_ELEMENTS",
    "SHAPES",
    "CheckpointPlan",
    "build_byte_tokenizer",
    "checkpoint_plan",
    "main",
    "synthetic_config",
    "write_synthetic_checkpoint",
]

# Largest block drawn at once: bounds peak memory independently of the model.
CHUNK_ELEMENTS = 1 << 22

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Published config.json values (transformers 5 spelling: rope_theta/rope_scaling live in
# rope_parameters). Keys are keyword arguments of the model_type's config class.
SHAPES: dict[str, dict] = {
    # No published model: the 0.76B LLaMA of issue 25 (a container capped at 1.5 GiB killed a run with
    # the old defaults): 24 layers, hidden 1536, MLP 4096, 12 heads / 4 KV heads, SmolLM2's vocabulary.
    "llama-0.76b": dict(
        model_type="llama", vocab_size=49152, hidden_size=1536, intermediate_size=4096,
        num_hidden_layers=24, num_attention_heads=12, num_key_value_heads=4,
        max_position_embeddings=8192, rms_norm_eps=1e-5, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    # meta-llama/Llama-2-7b-hf
    "llama-2-7b": dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        max_position_embeddings=4096, rms_norm_eps=1e-5, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    # meta-llama/Llama-2-13b-hf
    "llama-2-13b": dict(
        model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
        max_position_embeddings=4096, rms_norm_eps=1e-5, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    # meta-llama/Meta-Llama-3-8B
    "llama-3-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=8192, rms_norm_eps=1e-5, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    ),
    # meta-llama/Llama-3.2-3B
    "llama-3.2-3b": dict(
        model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
        num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=131072, rms_norm_eps=1e-5, initializer_range=0.02,
        rope_parameters=dict(_LLAMA3_ROPE), tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001,
    ),
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, initializer_range=0.02,
        rope_parameters=dict(_LLAMA3_ROPE), tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001,
    ),
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
    "tinyllama-1.1b": dict(
        model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
        num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        max_position_embeddings=2048, rms_norm_eps=1e-5, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    # HuggingFaceTB/SmolLM2-135M
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        max_position_embeddings=8192, rms_norm_eps=1e-5, initializer_range=0.041666666666666664,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    ),
    # HuggingFaceTB/SmolLM2-360M
    "smollm2-360m": dict(
        model_type="llama", vocab_size=49152, hidden_size=960, intermediate_size=2560,
        num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
        max_position_embeddings=8192, rms_norm_eps=1e-5, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    ),
    # Qwen/Qwen2-7B
    "qwen2-7b": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        max_position_embeddings=131072, rms_norm_eps=1e-6, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False, sliding_window=131072, max_window_layers=28,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643,
    ),
    # mistralai/Mistral-7B-v0.1
    "mistral-7b": dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=32768, rms_norm_eps=1e-5, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, sliding_window=4096,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    # facebook/opt-1.3b
    "opt-1.3b": dict(
        model_type="opt", vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
        num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2048,
        do_layer_norm_before=True, enable_bias=True, layer_norm_elementwise_affine=True,
        activation_function="relu", dropout=0.1, attention_dropout=0.0, init_std=0.02,
        tie_word_embeddings=True, pad_token_id=1, bos_token_id=2, eos_token_id=2,
    ),
    # facebook/opt-6.7b
    "opt-6.7b": dict(
        model_type="opt", vocab_size=50272, hidden_size=4096, ffn_dim=16384, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=4096,
        do_layer_norm_before=True, enable_bias=True, layer_norm_elementwise_affine=True,
        activation_function="relu", dropout=0.1, attention_dropout=0.0, init_std=0.02,
        tie_word_embeddings=True, pad_token_id=1, bos_token_id=2, eos_token_id=2,
    ),
}

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what a synthetic checkpoint can be written in
_DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SPECIAL_TOKENS = ("<s>", "</s>")


def synthetic_config(shape_or_config, num_layers: int | None = None):
    """A transformers config for a registered shape name, a config dict or a config object.

    ``num_layers`` overrides ``num_hidden_layers`` (the config is rebuilt rather than
    edited, so derived fields such as Qwen2's ``layer_types`` follow).
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(shape_or_config, str):
        if shape_or_config not in SHAPES:
            raise ValueError(f"unknown shape {shape_or_config!r}; known: {', '.join(sorted(SHAPES))}")
        shape_or_config = SHAPES[shape_or_config]
    if isinstance(shape_or_config, PretrainedConfig):
        if num_layers is None:
            return copy.deepcopy(shape_or_config)  # the writer sets architectures and dtype on it
        values = shape_or_config.to_dict()
        values.pop("layer_types", None)
        values["num_hidden_layers"] = num_layers
        return type(shape_or_config).from_dict(values)
    values = dict(shape_or_config)
    model_type = values.pop("model_type")
    if num_layers is not None:
        values["num_hidden_layers"] = num_layers
        values.pop("layer_types", None)
    return AutoConfig.for_model(model_type, **values)


@dataclass(frozen=True)
class _TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # "normal", "ones" or "zeros"
    std: float = 0.0
    zero_row: int | None = None  # an embedding's padding_idx


@dataclass(frozen=True)
class CheckpointPlan:
    """What :func:`write_synthetic_checkpoint` writes: tensors per shard file, in order."""

    config: object
    architecture: str
    dtype: torch.dtype
    shards: dict[str, list[_TensorSpec]]
    total_size: int
    total_parameters: int

    @property
    def is_sharded(self) -> bool:
        return len(self.shards) > 1


def _init_std(config) -> float:
    # Same order as PreTrainedModel._init_weights.
    if hasattr(config, "initializer_range"):
        return config.initializer_range or 0.02
    if hasattr(config, "init_std"):
        return config.init_std
    return 0.02


def _tensor_spec(model, name: str, tensor: torch.Tensor, std: float) -> _TensorSpec:
    """How ``_init_weights`` initialises this tensor (Linear/Embedding normal, norms ones, biases zeros)."""
    from torch import nn

    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    cls = type(owner).__name__
    shape = tuple(tensor.shape)
    if isinstance(owner, (nn.Linear, nn.Embedding)) or "LayerNorm" in cls or "RMSNorm" in cls:
        if leaf == "bias":
            return _TensorSpec(name, shape, "zeros")
        if leaf == "weight":
            if isinstance(owner, nn.Linear):
                return _TensorSpec(name, shape, "normal", std)
            if isinstance(owner, nn.Embedding):
                return _TensorSpec(name, shape, "normal", std, owner.padding_idx)
            return _TensorSpec(name, shape, "ones")
    raise NotImplementedError(f"no synthetic initialisation for {name} ({cls}.{leaf})")


def _natural_key(name: str) -> list[tuple]:
    """``save_pretrained``'s sort key (``dot_natural_key``): ``layers.2`` before ``layers.10``."""
    parts: list[tuple] = []
    for part in name.split("."):
        if part.isdigit():
            parts.append((0, int(part)))
            continue
        text = part.rstrip("0123456789")
        digits = part[len(text):]
        parts.append((1, text, int(digits)) if digits else (1, text))
    return parts


def checkpoint_plan(
    config, dtype: torch.dtype = torch.bfloat16, max_shard_size: int | str = "2GB"
) -> CheckpointPlan:
    """Names, shapes, initialisation and shard files of a checkpoint, from a meta skeleton.

    Tied tensors are listed once (the first name, as ``save_pretrained`` keeps the input
    embedding). Names are in the order ``save_pretrained`` writes a model loaded with
    ``from_pretrained`` (natural order: ``lm_head``, ``model.embed_tokens``,
    ``model.layers.0…``, ``model.norm``), and shards are split by
    ``huggingface_hub.split_torch_state_dict_into_shards`` as ``save_pretrained`` splits them.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)}, not {dtype}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    std = _init_std(config)
    seen: set[int] = set()
    specs: dict[str, _TensorSpec] = {}
    sized: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # a tied alias (lm_head of a tied model)
            continue
        seen.add(id(tensor))
        specs[name] = _tensor_spec(model, name, tensor, std)
        sized[name] = torch.empty(tensor.shape, dtype=dtype, device="meta")
    # transformers 5 writes a loaded model's tensors in natural name order (see _natural_key).
    sized = dict(sorted(sized.items(), key=lambda item: _natural_key(item[0])))
    split = split_torch_state_dict_into_shards(
        sized, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    shards = {fname: [specs[n] for n in names] for fname, names in split.filename_to_tensors.items()}
    return CheckpointPlan(
        config=config,
        architecture=type(model).__name__,
        dtype=dtype,
        shards=shards,
        total_size=split.metadata["total_size"],
        total_parameters=sum(t.numel() for t in sized.values()),
    )


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generate(spec: _TensorSpec, dtype: torch.dtype, seed: int):
    """Yield the tensor's values in ``dtype``, flattened, in chunks of whole rows."""
    numel = 1
    for n in spec.shape:
        numel *= n
    row = spec.shape[-1] if len(spec.shape) > 1 else max(numel, 1)
    rows = numel // row if row else 0
    if spec.init != "normal":
        fill = 1.0 if spec.init == "ones" else 0.0
        for start in range(0, numel, CHUNK_ELEMENTS):
            yield torch.full((min(CHUNK_ELEMENTS, numel - start),), fill, dtype=dtype)
        return
    generator = torch.Generator().manual_seed(_tensor_seed(seed, spec.name))
    step = max(1, CHUNK_ELEMENTS // max(row, 1))
    for first in range(0, rows, step):
        count = min(step, rows - first)
        chunk = torch.empty(count * row, dtype=torch.float32).normal_(0.0, spec.std, generator=generator)
        if spec.zero_row is not None and first <= spec.zero_row < first + count:
            offset = (spec.zero_row - first) * row
            chunk[offset:offset + row] = 0.0
        chunk = chunk.to(dtype)  # rebinding frees the float32 block before the next one
        yield chunk
        del chunk


def _write_shard(path: Path, specs: list[_TensorSpec], dtype: torch.dtype, seed: int) -> int:
    """Stream one safetensors file: header first (all sizes are known), then each tensor's chunks,
    in safetensors' own order (the file is the bytes ``save_file`` would write)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    entries = [(spec.name, dtype, tuple(spec.shape), itemsize * math.prod(spec.shape)) for spec in specs]
    prefix, order = safetensors_header(entries, {"format": "pt"})
    with open(path, "wb") as fh:
        fh.write(prefix)
        for i in order:
            written = 0
            for chunk in _generate(specs[i], dtype, seed):
                # Raw little-endian bytes without a copy (numpy has no bfloat16: view as bytes).
                fh.write(chunk.view(torch.uint8).numpy())
                written += chunk.numel() * itemsize
                del chunk  # not alive while the next chunk is drawn
            if written != entries[i][3]:
                raise RuntimeError(f"{specs[i].name}: wrote {written} bytes, expected {entries[i][3]}")
    return len(prefix) + sum(e[3] for e in entries)


def build_byte_tokenizer(config=None):
    """An offline byte-level tokenizer: 256 byte tokens, ``<s>`` (256) and ``</s>`` (257), no merges.

    Every text encodes (one id per UTF-8 byte), so ids stay below any vocabulary of at
    least 258. BOS is prepended as the real tokenizers of LLaMA, Mistral and OPT do (not
    Qwen2's); ``model_max_length`` is the config's context length. Pad is EOS.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(_SPECIAL_TOKENS))
    bos, eos = _SPECIAL_TOKENS
    if config is None or getattr(config, "model_type", None) != "qwen2":
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    kwargs = {}
    if config is not None and getattr(config, "max_position_embeddings", None):
        kwargs["model_max_length"] = config.max_position_embeddings
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=eos, **kwargs
    )


def _parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)}, not {dtype!r}")
        return _DTYPE_NAMES[dtype]
    return dtype


def write_synthetic_checkpoint(
    shape_or_config,
    out_dir,
    dtype: torch.dtype | str = torch.bfloat16,
    max_shard_size: int | str = "2GB",
    seed: int = 0,
    num_layers: int | None = None,
    *,
    tokenizer: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a random-weight checkpoint of a real shape to ``out_dir``; return its path.

    ``shape_or_config`` is a :data:`SHAPES` name, a config dict (with ``model_type``) or a
    transformers config. The folder holds ``config.json``, safetensors shards named and
    split as ``save_pretrained`` would (with ``model.safetensors.index.json`` when there
    are several), the byte tokenizer of :func:`build_byte_tokenizer` (unless
    ``tokenizer=False``) and ``synthetic.json``. Weights follow ``_init_weights``:
    normal(0, initializer_range) for Linear and Embedding weights (padding row zero),
    ones for norm weights, zeros for biases. Each tensor is seeded by ``seed`` and its
    name, so the values do not depend on ``max_shard_size``.

    Peak memory is one chunk of ``CHUNK_ELEMENTS`` float32 values plus its cast copy
    (24 MiB for bfloat16), independent of model and shard size; the process stays near
    the ~0.4 GB that torch and transformers take once imported. The folder is assembled
    in a temporary sibling ``.NAME.partial-*`` and renamed into place, so an interrupted
    write leaves no ``out_dir`` (an exception removes the sibling; a SIGKILL leaves it).
    An existing non-empty ``out_dir`` is an error unless ``overwrite``.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    dtype = _parse_dtype(dtype)
    if sys.byteorder != "little":  # safetensors is little-endian; chunks are written raw
        raise RuntimeError("writing safetensors needs a little-endian machine")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True)")
    shape_name = shape_or_config if isinstance(shape_or_config, str) else None
    config = synthetic_config(shape_or_config, num_layers)
    plan = checkpoint_plan(config, dtype, max_shard_size)
    tok = None
    if tokenizer:
        if config.vocab_size < 256 + len(_SPECIAL_TOKENS):
            raise ValueError(f"vocab_size {config.vocab_size} is too small for the byte tokenizer (258 ids)")
        tok = build_byte_tokenizer(config)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    started = time.perf_counter()
    try:
        config.architectures = [plan.architecture]
        config.dtype = dtype
        config.save_pretrained(tmp)
        for i, (fname, specs) in enumerate(plan.shards.items(), 1):
            size = _write_shard(tmp / fname, specs, dtype, seed)
            logger.info("wrote %s (%d/%d, %.2f GB)", fname, i, len(plan.shards), size / 1e9)
        if plan.is_sharded:
            index = {
                "metadata": {"total_parameters": plan.total_parameters, "total_size": plan.total_size},
                "weight_map": {s.name: fname for fname, specs in plan.shards.items() for s in specs},
            }
            with open(tmp / "model.safetensors.index.json", "w", encoding="utf-8") as fh:
                fh.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if tok is not None:
            tok.save_pretrained(tmp)
        record = {
            "synthetic": True,
            "note": "random weights of a real shape, for memory/time benchmarks only; not a trained model",
            "shape": shape_name,
            "architecture": plan.architecture,
            "seed": seed,
            "dtype": str(dtype).removeprefix("torch."),
            "num_hidden_layers": config.num_hidden_layers,
            "total_parameters": plan.total_parameters,
            "total_size": plan.total_size,
            "max_shard_size": max_shard_size,
            "shards": len(plan.shards),
            "init": f"normal(0, {_init_std(config)}) for Linear/Embedding weights (padding row 0), "
            "ones for norm weights, zeros for biases",
            "tokenizer": "byte-level, 258 ids (<s>=256, </s>=257); config token ids are the published ones"
            if tok is not None else None,
        }
        with open(tmp / "synthetic.json", "w", encoding="utf-8") as fh:
            fh.write(json.dumps(record, indent=2) + "\n")
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("synthetic checkpoint %s written in %.1f s", out_dir, time.perf_counter() - started)
    return out_dir


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    apply_umask(tmp)  # mkdtemp made it private; a checkpoint is as readable as any file the user writes
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} appeared while writing; the new checkpoint was discarded")
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, trash / "old")
        os.replace(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)  # also replaces an empty directory


def main(argv: list[str] | None = None) -> int:
    """``python -m structprune.models.synthetic SHAPE --output DIR [...]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m structprune.models.synthetic",
        description="Write a random-weight checkpoint of a real model shape, one tensor in memory at a time.",
    )
    parser.add_argument("shape", choices=sorted(SHAPES), metavar="SHAPE", help=", ".join(sorted(SHAPES)))
    parser.add_argument("--output", "-o", required=True, help="folder to create")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPE_NAMES))
    parser.add_argument("--max-shard-size", default="2GB", help="as in save_pretrained (default 2GB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    try:
        path = write_synthetic_checkpoint(
            args.shape, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size,
            seed=args.seed, num_layers=args.layers, overwrite=args.overwrite,
        )
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{path} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
