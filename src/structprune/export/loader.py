"""Load a pruned model folder and prove every weight arrived with the right shape.

transformers reports (and, depending on the version and flags, re-initialises)
weights whose shapes disagree with the config; a pruned model with one layer
silently re-initialised still runs and produces plausible text. So
:func:`load_pruned` reads the safetensors headers first (a truncated file fails
there), loads, and then compares every tensor of the model with the file: any
missing, unexpected or differently shaped weight is a :class:`StructPruneError`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from ..errors import StructPruneError
from ..checkpoint_files import check_shard_name
from ..provenance import file_sha256
from .modeling import modeling_structprune as modeling

log = logging.getLogger(__name__)

CUSTOM_PREFIX = "structprune_"


def read_model_config(path: Path) -> dict:
    """The parsed ``config.json`` of a model folder, or a :class:`StructPruneError` saying why not."""
    if not path.is_dir():
        raise StructPruneError(f"{path} is not a folder; pass a folder written by `structprune prune --output`")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise StructPruneError(f"{path} is not a model folder (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StructPruneError(f"{cfg_file} is not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise StructPruneError(f"{cfg_file} has no model_type: not a Hugging Face model folder")
    return cfg


def is_structprune_export(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder written by :func:`~structprune.export.save_pruned`."""
    cfg_file = Path(path) / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and ("structprune" in cfg or str(cfg.get("model_type", "")).startswith(CUSTOM_PREFIX))


def _is_per_layer(cfg: dict) -> bool:
    """A per-layer export: ``structprune_<family>`` model_type (format 1) or a custom record (format 2+)."""
    record = cfg.get("structprune")
    return cfg["model_type"].startswith(CUSTOM_PREFIX) or (isinstance(record, dict) and record.get("format") == "custom")


def weight_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a folder's safetensors file(s), read from the headers only."""
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()), key=str)
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            raise StructPruneError(f"{index} is not a valid safetensors index ({exc})") from exc
        files = [check_shard_name(path, name, index) for name in names]  # none may leave the folder
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise StructPruneError(f"{path} has no safetensors weights (model.safetensors or its index)")
    shapes = {}
    for f in files:
        if not f.is_file():
            raise StructPruneError(f"weights shard {f} is missing")
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    shapes[key] = tuple(st.get_slice(key).get_shape())
        except Exception as exc:  # safetensors raises its own error type for truncated/corrupt files
            raise StructPruneError(f"weights file {f} is truncated or corrupt ({exc})".splitlines()[0]) from exc
    return shapes


def verify_weights(model, shapes: dict[str, tuple[int, ...]], path: str | os.PathLike = "the folder") -> None:
    """Raise unless every tensor of ``model`` was in the file with the same shape, and nothing else was."""
    sd = model.state_dict()
    mismatched = [f"{k}: file {list(s)} vs model {list(sd[k].shape)}" for k, s in shapes.items()
                  if k in sd and tuple(sd[k].shape) != s]
    unexpected = sorted(k for k in shapes if k not in sd)
    # Tied weights (lm_head = embeddings) are stored once: a key absent from the file is
    # fine only if it is the very same tensor as one that was loaded.
    loaded_ptrs = {sd[k].data_ptr() for k in shapes if k in sd}
    missing = sorted(k for k in sd if k not in shapes and sd[k].data_ptr() not in loaded_ptrs)
    if mismatched:
        raise StructPruneError(f"config.json's widths disagree with the weights in {path}: {mismatched[0]}"
                               + (f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""))
    if missing or unexpected:
        what = (f"missing {missing[:3]}" if missing else "") + (" " if missing and unexpected else "") + (
            f"unexpected {unexpected[:3]}" if unexpected else "")
        raise StructPruneError(f"weights in {path} do not match its config.json: {what}")


MODELING_NAME = Path(modeling.__file__).name
# An auto_map entry: "module.Class" of a file in the folder itself (no path, no "repo--" prefix).
_AUTO_MAP_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")


def check_auto_map(cfg: dict, path: Path) -> None:
    """Refuse a config whose ``auto_map`` points at code outside the folder: a path (``../x.Cls``) or
    another repository (``org/repo--x.Cls``), which ``trust_remote_code`` would fetch and run.
    A per-layer StructPrune export may only name its own modeling file."""
    auto_map = cfg.get("auto_map") or {}
    if not isinstance(auto_map, dict):
        raise StructPruneError(f"{path / 'config.json'} has an auto_map that is not an object")
    own = MODELING_NAME.removesuffix(".py")
    for key, ref in auto_map.items():
        for r in (ref if isinstance(ref, (list, tuple)) else [ref]):
            if r is None:
                continue
            if not isinstance(r, str) or not _AUTO_MAP_RE.match(r) or (_is_per_layer(cfg) and
                                                                    r.split(".")[0] != own):
                raise StructPruneError(f"{path / 'config.json'} maps {key} to {r!r}, code outside "
                                       + (f"{MODELING_NAME}" if _is_per_layer(cfg) else "the folder")
                                       + "; refusing to load it")


def verify_modeling_file(path: Path, cfg: dict, trust_remote_code: bool = False) -> None:
    """Check a per-layer export's shipped modeling file against the SHA-256 recorded in its config at export.

    A file that differs is refused (it was modified after the export; with ``trust_remote_code`` it
    would run). With ``trust_remote_code``, a missing file or an export without a recorded hash (written
    before hashes were recorded) is refused too, as it cannot be verified before it runs; without it,
    StructPrune's packaged code is used and those pass."""
    if not _is_per_layer(cfg):
        return
    check_auto_map(cfg, path)
    record = cfg.get("structprune") if isinstance(cfg.get("structprune"), dict) else {}
    want, f = record.get("modeling_sha256"), path / MODELING_NAME
    if not f.is_file():
        if trust_remote_code:
            raise StructPruneError(f"{f} is missing: this per-layer export cannot load with trust_remote_code; "
                                   "load it without (StructPrune's packaged code) or re-export")
        return
    if want is None:
        if trust_remote_code:
            raise StructPruneError(f"{path / 'config.json'} records no SHA-256 of {MODELING_NAME}, so the file "
                                   "cannot be verified before it runs; load without trust_remote_code or re-export")
        return
    got = file_sha256(f)
    if got != want:
        raise StructPruneError(f"{f} was modified after the export (SHA-256 {got[:12]}..., recorded {want[:12]}...): "
                               "refusing to load it; restore the file or re-export the model")


def model_classes(cfg: dict, trust_remote_code: bool):
    """``(config class, model class)`` to load with, or ``(None, None)`` for transformers' Auto classes."""
    model_type = cfg["model_type"]
    if _is_per_layer(cfg):
        base = cfg.get("structprune_base_model_type") or model_type.removeprefix(CUSTOM_PREFIX)
        if model_type not in (base, CUSTOM_PREFIX + base):
            raise StructPruneError(f"model_type {model_type!r} in config.json does not match the export's "
                                   f"family {base!r}; the config was edited or damaged")
        if base not in modeling.CLASSES:
            raise StructPruneError(f"unknown StructPrune model type {model_type!r}; was it written by a newer version?")
        if trust_remote_code:
            return None, None  # the folder's own modeling_structprune.py, through auto_map
        return modeling.CLASSES[base]
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise StructPruneError(f"unknown model_type {model_type!r} in config.json: not a StructPrune or "
                               "transformers model folder")
    return None, None


def load_pruned(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
                trust_remote_code: bool = False):
    """Load a pruned model exported by StructPrune (or any safetensors causal-LM folder), verified.

    Per-layer (``structprune_*``) exports are built with StructPrune's packaged copy of
    the modeling code, so ``trust_remote_code`` is not needed; with
    ``trust_remote_code=True`` the folder's own copy is used instead (what plain
    transformers does). ``dtype`` defaults to the dtype the weights were saved in.
    Every weight is checked against the file (see :func:`verify_weights`), and a per-layer
    export's shipped modeling file against the SHA-256 recorded at export (see
    :func:`verify_modeling_file`). Returns the
    model in eval mode on ``device``; load the tokenizer with ``AutoTokenizer``.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path).expanduser()
    cfg = read_model_config(path)
    verify_modeling_file(path, cfg, trust_remote_code)
    shapes = weight_shapes(path)  # before loading: a truncated file fails here, clearly
    config_cls, model_cls = model_classes(cfg, trust_remote_code)
    kwargs = {"dtype": dtype if dtype is not None else "auto", "output_loading_info": True}
    try:
        if model_cls is not None:
            model, info = model_cls.from_pretrained(path, config=config_cls.from_pretrained(path), **kwargs)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except StructPruneError:
        raise
    except Exception as exc:  # transformers raises ValueError/RuntimeError/OSError for bad folders
        msg = " ".join(str(exc).split())[:300]
        if "mismatch" in msg.lower():
            raise StructPruneError(f"config.json's widths disagree with the weights in {path} ({msg})") from exc
        raise StructPruneError(f"could not load {path}: {msg}") from exc
    problems = {k: sorted(v) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if (v := info.get(k))}
    if problems or info.get("error_msgs"):
        what = problems or info["error_msgs"]
        raise StructPruneError(f"weights in {path} do not match its config.json: {what}"[:400])
    verify_weights(model, shapes, path)
    log.info("loaded %s (%s, %d parameters)", path, cfg["model_type"], sum(p.numel() for p in model.parameters()))
    return model.to(device).eval()
