"""Write a pruned model as a Hugging Face folder that loads anywhere.

Two formats, chosen from the model itself (:func:`export_config`):

- **stock**: every layer has the same kept widths and a bias layout the family's own
  config can express, so ``config.json`` is a plain ``llama`` / ``qwen2`` /
  ``mistral`` / ``opt`` config (``num_attention_heads``, ``num_key_value_heads``,
  ``intermediate_size`` or ``ffn_dim``, ``head_dim``) that loads with no custom code.
  Missing biases the stock layout implies (LLaMA's ``attention_bias`` covers q, k, v
  and o) are written as zeros.
- **custom**: per-layer widths, recorded as lists in a ``structprune_<family>``
  config, with ``modeling_structprune.py`` copied into the folder and named in
  ``auto_map``; ``trust_remote_code=True`` loads it with plain transformers.

Either way the folder also holds the tokenizer, ``report.json`` and ``plan.json``, and
``config.json`` carries a ``structprune`` record (method, sparsity, per-layer widths)
by which :func:`structprune.load_pruned` recognises an export.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import get_adapter
from ..errors import RankFailure, StructPruneError
from ..files import apply_umask
from ..provenance import file_sha256
from . import fused_moe
from .modeling import modeling_structprune as modeling

log = logging.getLogger(__name__)

MODELING_FILE = Path(modeling.__file__)
# 2: per-layer exports name their base family as config.json's model_type (tokenizers load without remote code).
EXPORT_FORMAT_VERSION = 2
# Config keys that describe the in-memory object, not the exported model.
_DROP_KEYS = ("architectures", "auto_map", "transformers_version", "model_type", "structprune",
              "structprune_base_model_type", "_name_or_path", *modeling.PER_LAYER_KEYS, *fused_moe.EXTRA_PER_LAYER_KEYS)
# Qwen2 / Mistral keys that only matter with sliding-window attention (dropped when
# such a model is written as a stock LLaMA config, which it then equals exactly).
_SLIDING_KEYS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """The resolved output path, refused before any work if it holds something and ``overwrite``
    is off, or if its nearest existing parent is not a writable folder."""
    path = Path(path).expanduser().resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise StructPruneError(f"output path {path} exists and is not empty; pass --overwrite or choose another")
    parent = next(p for p in path.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise StructPruneError(f"cannot write the output under {parent}: not a writable folder")
    return path


RESUME_DIR = ".resume"  # the run journal inside a resumable partial folder (engine/journal.py)


def partial_dir(path: str | os.PathLike) -> Path:
    """The resumable partial folder of output ``path``: ``.NAME.partial`` beside it."""
    path = Path(path).expanduser().resolve()
    return path.parent / f".{path.name}.partial"


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False, resumable: bool = False,
                      resume: bool = False, keep_unless_refused: bool = False):
    """Yield a temporary folder next to ``path``; move it into place only if the block succeeds.

    On any failure (including Ctrl-C) the temporary folder and any parent folders this call
    created are removed, so nothing half-written is left behind. The finished folder gets
    the permissions of the user's umask (a temporary folder is private).

    ``resumable``: the temporary folder is ``.NAME.partial`` (not a random name), so what a
    *killed* run (SIGKILL, out of memory, power loss: nothing ran its cleanup) left there can be
    continued with ``resume=True``. Without ``resume`` such a folder is refused, unless
    ``overwrite`` (then it is deleted); a resumed run that fails keeps it (it is the killed run's
    work, which a mistaken ``--resume`` must not destroy). Its ``.resume`` journal is removed
    before the move.

    ``keep_unless_refused`` (a distributed run): on a failure other than a StructPruneError (which
    every rank raises alike, before or instead of work) the partial folder is kept, since the cause
    may be another rank's death and torchrun's restart continues it."""
    path = check_output_dir(path, overwrite)
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = False  # a killed run's partial folder we were asked to resume: never ours to delete
    if resumable:
        tmp = partial_dir(path)
        kept = resume and tmp.exists()
        if tmp.exists() and not resume:
            if not overwrite:
                raise StructPruneError(f"an interrupted run of this command left {tmp}: continue it with --resume "
                                       "(the same command otherwise), or pass --overwrite to start afresh")
            shutil.rmtree(tmp)
        tmp.mkdir(mode=0o700, exist_ok=True)
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield tmp
        shutil.rmtree(tmp / RESUME_DIR, ignore_errors=True)
        apply_umask(tmp)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    except BaseException as exc:
        if keep_unless_refused and (not isinstance(exc, StructPruneError) or isinstance(exc, RankFailure)):
            kept = True
        if not kept:
            shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def _strict(obj):
    """``obj`` with NaN and infinities as None: strict JSON readers (JSON.parse) reject them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    """Write strict JSON (non-finite numbers become null; unknown objects their ``str``)."""
    text = json.dumps(_strict(json.loads(json.dumps(obj, default=str))), indent=2, allow_nan=False)
    with open(path, "w") as f:
        f.write(text + "\n")


@dataclass
class ExportConfig:
    """What :func:`save_pruned` writes: the config, its format, and zero biases to add."""

    config: object  # a transformers PreTrainedConfig
    format: str  # "stock" or "custom"
    reason: str  # why this format (logged and recorded in report.json)
    zero_biases: dict[str, int] = field(default_factory=dict)  # state-dict key -> bias length
    modeling_sha256: str | None = None  # of the modeling file a per-layer export ships (load_pruned checks it)

    def to_dict(self) -> dict:
        d = {"format": self.format, "model_type": self.config.model_type, "reason": self.reason,
             "zero_biases_added": sorted(self.zero_biases)}
        if self.modeling_sha256 is not None:
            d["modeling_sha256"] = self.modeling_sha256
        return d


def layer_layouts(model) -> list[dict]:
    """Per decoder layer: kept heads, KV heads, MLP width, head_dim and which projections have biases."""
    adapter = get_adapter(model)
    out = []
    for layer in adapter.layers():
        (q, *_), o = adapter.attn_linears(layer)  # q: the first input projection (Phi-3: fused qkv_proj)
        part = adapter.mlp_parts(layer)[0]  # experts share one layout; only dense parts take refit biases
        w = adapter.layer_widths(layer)
        out.append({**w, "head_dim": adapter.attention_shape(layer).head_dim, "qkv_bias": q.bias is not None,
                    "o_bias": o.bias is not None, "mlp_in_bias": part.in_biases()[0] is not None,
                    "mlp_out_bias": part.out_bias() is not None})
    return out


def base_model_type(model) -> str:
    config = model.config
    return getattr(config, "structprune_base_model_type", None) or config.model_type


def _base_dict(model) -> dict:
    d = model.config.to_dict()
    for k in _DROP_KEYS:
        d.pop(k, None)
    d["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    return d


# Multimodal families whose pruned language model is described by a nested ``text_config``
# (Gemma 3: ``Gemma3ForConditionalGeneration``); the per-layer lists stay top-level.
NESTED_TEXT = ("gemma3",)


def _text_dict(base: str, d: dict) -> dict:
    """The part of a config dict that describes the decoder layers: ``d`` or its ``text_config``."""
    return d["text_config"] if base in NESTED_TEXT else d


def _hidden_size(model) -> int:
    config = model.config
    return (config.get_text_config() if hasattr(config, "get_text_config") else config).hidden_size


def _layer_prefixes(model) -> list[str]:
    adapter = get_adapter(model)
    layers = adapter.layers()
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(l)] + "." for l in layers]


def _llama_zero_biases(model, lay: list[dict], attention_bias: bool, mlp_bias: bool) -> dict[str, int]:
    """Zero biases a stock LLaMA layout needs but the model lacks (e.g. q/k/v when only o has one)."""
    fills = {}
    hidden = _hidden_size(model)
    for prefix, l in zip(_layer_prefixes(model), lay):
        dh = l["head_dim"]
        if attention_bias:
            if not l["qkv_bias"]:
                fills.update({f"{prefix}self_attn.q_proj.bias": l["heads"] * dh,
                              f"{prefix}self_attn.k_proj.bias": l["kv_heads"] * dh,
                              f"{prefix}self_attn.v_proj.bias": l["kv_heads"] * dh})
            if not l["o_bias"]:
                fills[f"{prefix}self_attn.o_proj.bias"] = hidden
        if mlp_bias:
            if not l["mlp_in_bias"]:
                fills.update({f"{prefix}mlp.gate_proj.bias": l["mlp"], f"{prefix}mlp.up_proj.bias": l["mlp"]})
            if not l["mlp_out_bias"]:
                fills[f"{prefix}mlp.down_proj.bias"] = hidden
    return fills


def _opt_zero_biases(model, lay: list[dict]) -> dict[str, int]:
    fills = {}
    hidden = model.config.hidden_size
    for prefix, l in zip(_layer_prefixes(model), lay):
        n = l["heads"] * l["head_dim"]
        if not l["qkv_bias"]:
            fills.update({f"{prefix}self_attn.{p}.bias": n for p in ("q_proj", "k_proj", "v_proj")})
        if not l["o_bias"]:
            fills[f"{prefix}self_attn.out_proj.bias"] = hidden
        if not l["mlp_in_bias"]:
            fills[f"{prefix}fc1.bias"] = l["mlp"]
        if not l["mlp_out_bias"]:
            fills[f"{prefix}fc2.bias"] = hidden
    return fills


def _make_config(model_type: str, d: dict):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **d)


def _stock_config(model, lay: list[dict]) -> tuple[ExportConfig | None, str]:
    """A stock config equal to the model, or ``(None, why not)``."""
    first = lay[0]
    if any(l != first for l in lay[1:]):
        return None, "layers have different widths or bias layouts"
    base = base_model_type(model)
    d = _base_dict(model)
    heads, kv, inter, dh = first["heads"], first["kv_heads"], first["mlp"], first["head_dim"]
    if base == "opt":
        if heads * dh != model.config.hidden_size:
            # Stock OPT sizes q/k/v to hidden_size: it cannot express removed heads.
            return None, "stock OPT cannot express removed attention heads"
        biases = [first[k] for k in ("qkv_bias", "o_bias", "mlp_in_bias", "mlp_out_bias")]
        d.update(num_attention_heads=heads, ffn_dim=inter, enable_bias=any(biases))
        fills = _opt_zero_biases(model, lay) if any(biases) and not all(biases) else {}
        return ExportConfig(_make_config("opt", d), "stock", "uniform widths", fills), ""
    if base in fused_moe.FAMILIES:  # Phi-3, Mixtral, Qwen2-MoE (export/fused_moe.py)
        fields, why = fused_moe.stock_fields(model.config, base, first)
        if fields is None:
            return None, why
        d.update(fields)
        try:
            return ExportConfig(_make_config(base, d), "stock", "uniform widths"), ""
        except Exception as exc:  # transformers' config validation
            return None, f"stock {base} config rejects these widths ({str(exc).strip().splitlines()[-1].strip()})"

    _text_dict(base, d).update(num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                               head_dim=dh)
    target = base
    layout = tuple(first[k] for k in ("qkv_bias", "o_bias", "mlp_in_bias", "mlp_out_bias"))
    if base in ATTENTION_BIAS_ONLY:
        return _attention_bias_only_stock(model, lay, base, d, layout)
    stock_layout = {"llama": None, "mistral": (False, False, False, False), "qwen2": (True, False, False, False)}
    if base in ("mistral", "qwen2") and layout != stock_layout[base]:
        # A refit added an o/down bias that Qwen2/Mistral cannot hold; without sliding
        # windows these families are LLaMA with different bias flags, so write LLaMA.
        sliding = d.get("use_sliding_window", False) if base == "qwen2" else d.get("sliding_window") is not None
        if sliding:
            return None, f"{base} with sliding windows cannot hold the refitted biases"
        for k in _SLIDING_KEYS:
            d.pop(k, None)
        target = "llama"
    fills = {}
    if target == "llama":
        attention_bias = first["qkv_bias"] or first["o_bias"]
        mlp_bias = first["mlp_in_bias"] or first["mlp_out_bias"]
        d.update(attention_bias=attention_bias, mlp_bias=mlp_bias)
        fills = _llama_zero_biases(model, lay, attention_bias, mlp_bias)
    try:
        config = _make_config(target, d)
    except Exception as exc:  # transformers' config validation (e.g. hidden not divisible by heads)
        return None, f"stock {target} config rejects these widths ({str(exc).strip().splitlines()[-1].strip()})"
    reason = "uniform widths" + (f" ({base} written as llama to hold its biases)" if target != base else "")
    return ExportConfig(config, "stock", reason, fills), ""


# Families whose config has one ``attention_bias`` flag (q, k, v and o) and no MLP bias.
ATTENTION_BIAS_ONLY = ("qwen3", "gemma2", "gemma3_text", "gemma3")


def _attention_bias_only_stock(model, lay: list[dict], base: str, d: dict,
                               layout: tuple) -> tuple[ExportConfig | None, str]:
    """Stock Qwen3 / Gemma config: attention biases are all-or-none (zeros fill the missing
    ones); an MLP bias (a refit's ``down_proj`` bias) has no place in the family's layout."""
    qkv_bias, o_bias, mlp_in_bias, mlp_out_bias = layout
    if mlp_in_bias or mlp_out_bias:
        return None, f"stock {base} has no MLP biases (a refit added one)"
    text = _text_dict(base, d)
    text["attention_bias"] = qkv_bias or o_bias
    fills = _llama_zero_biases(model, lay, text["attention_bias"], False)
    try:
        config = _make_config(base, d)
    except Exception as exc:  # transformers' config validation
        return None, f"stock {base} config rejects these widths ({str(exc).strip().splitlines()[-1].strip()})"
    return ExportConfig(config, "stock", "uniform widths", fills), ""


def _custom_config(model, lay: list[dict], reason: str) -> ExportConfig:
    base = base_model_type(model)
    if base not in modeling.CLASSES:
        raise StructPruneError(f"cannot export model type {base!r}: supported {', '.join(sorted(modeling.CLASSES))}")
    config_cls, model_cls = modeling.CLASSES[base]
    d = _base_dict(model)
    dh = {l["head_dim"] for l in lay}
    if len(dh) != 1:
        raise StructPruneError(f"layers have different head dimensions {sorted(dh)}; cannot export")
    dh = dh.pop()
    if base == "opt":
        if model.config.hidden_size // model.config.num_attention_heads != dh:
            raise StructPruneError("OPT config's num_attention_heads no longer matches the head dimension")
    else:
        _text_dict(base, d)["head_dim"] = dh  # explicit: the dense head count no longer describes the layers
    # The family's own layout must hold the q/k/v and MLP-input biases (slicing never adds them);
    # only the output projections' biases vary per layer.
    if base == "llama":
        d["attention_bias"] = lay[0]["qkv_bias"]
        d["mlp_bias"] = lay[0]["mlp_in_bias"]
    if base in ATTENTION_BIAS_ONLY:  # q/k/v biases come from the flag; o's is per layer
        _text_dict(base, d)["attention_bias"] = lay[0]["qkv_bias"]
    if base == "opt":
        d["enable_bias"] = lay[0]["qkv_bias"]
    for i, l in enumerate(lay):
        if l["qkv_bias"] != lay[0]["qkv_bias"] or l["mlp_in_bias"] != lay[0]["mlp_in_bias"] or (
                base == "opt" and l["mlp_in_bias"] != l["qkv_bias"]):
            raise StructPruneError(f"layer {i} has a q/k/v or MLP-input bias layout the {base} family cannot hold")
    d.update(
        layer_num_heads=[l["heads"] for l in lay],
        layer_num_kv_heads=[l["kv_heads"] for l in lay],
        layer_intermediate_size=[l["mlp"] for l in lay],
        layer_o_bias=[l["o_bias"] for l in lay],
        layer_mlp_out_bias=[l["mlp_out_bias"] for l in lay],
        structprune_base_model_type=base,
    )
    if base in fused_moe.FAMILIES:  # expert widths instead of the layer's total MLP channels
        d.update(fused_moe.per_layer_fields(model.config, base, lay))
    config = config_cls(**d)
    config.auto_map = {"AutoConfig": f"{MODELING_FILE.stem}.{config_cls.__name__}",
                       "AutoModelForCausalLM": f"{MODELING_FILE.stem}.{model_cls.__name__}"}
    config.architectures = [model_cls.__name__]
    return ExportConfig(config, "custom", reason)


def export_config(model) -> ExportConfig:
    """The config a pruned ``model`` is exported with: stock if it can be, else per-layer (custom)."""
    lay = layer_layouts(model)
    stock, why_not = _stock_config(model, lay)
    export = stock or _custom_config(model, lay, why_not)
    record = dict(getattr(model.config, "structprune", None) or {})
    record.update(format_version=EXPORT_FORMAT_VERSION, format=export.format,
                  layers=[{k: l[k] for k in ("heads", "kv_heads", "mlp", "o_bias", "mlp_out_bias")} for l in lay])
    if export.format == "custom":
        # load_pruned refuses a shipped modeling file that no longer has this hash (code that runs
        # under trust_remote_code must be the code that was exported).
        export.modeling_sha256 = record["modeling_sha256"] = file_sha256(MODELING_FILE)
    export.config.structprune = record
    if export.format == "stock":
        export.config.architectures = [_stock_architecture(export.config.model_type)]
    return export


def _name_base_family(config_file: Path, base: str) -> None:
    """Write the base family (``llama``...) as a per-layer export's ``model_type``.

    ``AutoTokenizer`` always reads ``config.json``; with an unknown model_type and an
    ``AutoConfig`` entry in ``auto_map`` it would ask to run the folder's code although a
    tokenizer needs none. A known model_type lets it (and ``AutoConfig`` without
    ``trust_remote_code``) read the config locally; the model itself still loads through
    ``auto_map`` with ``trust_remote_code=True``, whose config class restores its own type."""
    d = json.loads(config_file.read_text())
    d["model_type"] = base
    config_file.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def _stock_architecture(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


def _state_dict(model, zero_biases: dict[str, int]) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    ref = next(model.parameters())
    for key, n in zero_biases.items():
        sd[key] = torch.zeros(n, dtype=ref.dtype)
    return sd


def save_pruned(model, tokenizer, out_dir: str | os.PathLike, report: dict | None = None, plans=None,
                max_shard_size: int | str = "2GB") -> ExportConfig:
    """Write ``model`` (pruned in place) as a Hugging Face folder that loads with plain transformers.

    Weights go to safetensors, sharded above ``max_shard_size``; ``config.json`` is
    stock when every layer has the same widths (see :func:`export_config`), else a
    per-layer ``structprune_<family>`` config whose modeling code is copied alongside.
    The tokenizer, ``report.json`` (with an ``export`` entry) and ``plan.json`` (kept
    indices per layer) are written when given. Returns what was written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    export = export_config(model)
    log.info("exporting a %s %s config (%s)", export.format, export.config.model_type, export.reason)
    model.save_pretrained(out, state_dict=_state_dict(model, export.zero_biases), max_shard_size=max_shard_size,
                          **save_kwargs(model))
    write_export_files(export, base_model_type(model), out, tokenizer, report=report, plans=plans)
    return export


def save_kwargs(model) -> dict:
    """``save_pretrained`` options of an export: tensors under the model's own names and layout.

    transformers 5.x writes some families back in an older layout by default (MoE experts per
    expert, see ``fused_moe.save_kwargs``; Gemma 3 multimodal as ``language_model.model.*``). The
    per-layer modeling code is custom code, to which transformers applies no load-time renaming,
    and :func:`structprune.load_pruned` compares the file's names with the model's: both need the
    model's own names, which ``from_pretrained`` of the stock class reads as well."""
    import inspect

    base = base_model_type(model)
    kwargs = fused_moe.save_kwargs(model, base)
    if base in NESTED_TEXT and "save_original_format" in inspect.signature(model.save_pretrained).parameters:
        kwargs["save_original_format"] = False
    return kwargs


def write_export_files(export: ExportConfig, base: str, out: Path, tokenizer=None, report: dict | None = None,
                       plans=None) -> None:
    """Everything of an export but the weights: ``config.json`` (replacing any the weights' writer
    left), the modeling file of a per-layer export, the tokenizer, ``report.json``, ``plan.json``."""
    export.config.save_pretrained(out)
    if export.format == "custom":
        _name_base_family(out / "config.json", base)
        shutil.copyfile(MODELING_FILE, out / MODELING_FILE.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if report is not None:
        report = dict(report)
        report["export"] = export.to_dict()
        if "plots" not in report:  # kept widths per layer (plots.py); a missing matplotlib is a note, not an error
            from ..plots import write_run_plots

            report["plots"] = write_run_plots(report, out)
        write_json(out / "report.json", report)
    if plans is not None:
        write_json(out / "plan.json", [p.to_dict() for p in plans])
    from .card import write_model_card

    write_model_card(out, report)  # README.md (the CLI rewrites it once the perplexities are measured)
