"""What a run was made from: library versions, the calibration's content hash, the model's fingerprint.

The report records all three, and the solvers' reuse cache is keyed by the same hashes, so a
cached computation is only reused for the very same calibration windows (in the same order)
on the very same dense model.

Fingerprints are content hashes (SHA-256):

* calibration: the token ids as int64, with their shape;
* an in-memory model: its config (without the fields that name where it was loaded from)
  and every tensor of its state dict (name, dtype, shape and bytes); tensors on the
  ``meta`` device have no bytes and contribute their name, dtype and shape only;
* a checkpoint folder (the disk-streamed path, where the weights are never in memory):
  ``config.json`` and, per safetensors file, its header (every tensor's name, dtype, shape
  and offsets), its size and its data region: in full up to 256 KiB, else 64 blocks of
  4 KiB at evenly spaced offsets plus the last block. That reads at most ~260 KiB per
  shard however large the model; two checkpoints that differ in a few weights only (not
  a fine-tune: that changes every block) can share a checkpoint fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import struct
from pathlib import Path

import torch

from .version import __version__

# Config fields that say where a model was loaded from or by what, not what it is.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset")
_SAMPLE_BLOCKS, _BLOCK = 64, 4096


def library_versions() -> dict:
    """Versions of Python, torch, transformers, safetensors and StructPrune in this process."""
    import safetensors
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "structprune": __version__}


def calibration_sha256(calib: torch.Tensor) -> str:
    """SHA-256 of calibration token ids: their shape and their values as int64 (so the same ids in
    another integer dtype hash alike, and the same windows in another order do not)."""
    ids = calib.detach().to("cpu", torch.int64).contiguous()
    h = hashlib.sha256(json.dumps(list(ids.shape)).encode())
    h.update(ids.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _config_digest(d: dict) -> str:
    d = {k: v for k, v in d.items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    # A uint8 view of the storage: works for every dtype, bfloat16 included (numpy lacks it).
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def model_fingerprint(model: torch.nn.Module) -> dict:
    """``{"sha256", "basis"}`` of an in-memory model: its config and every state-dict tensor's name,
    dtype, shape and bytes (name, dtype and shape only for ``meta`` tensors)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update(_config_digest(config.to_dict() if config is not None else {}).encode())
    meta = 0
    for name, t in sorted(model.state_dict().items()):
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.is_meta:
            meta += 1
        else:
            h.update(_tensor_bytes(t))
    basis = "config + every state-dict tensor's name, dtype, shape and bytes"
    if meta:
        basis += f" ({meta} meta tensor(s): name, dtype and shape only)"
    return {"sha256": h.hexdigest(), "basis": basis}


def _shard_digest(path: Path, h) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        header = f.read(min(n, max(size - 8, 0)))
        h.update(json.dumps([path.name, size]).encode())
        h.update(header)
        start = 8 + len(header)
        span = size - start
        if span <= _SAMPLE_BLOCKS * _BLOCK:
            h.update(f.read())
            return
        step = span // _SAMPLE_BLOCKS
        for k in [*range(_SAMPLE_BLOCKS), None]:
            f.seek(start + k * step if k is not None else size - _BLOCK)
            h.update(f.read(_BLOCK))


def checkpoint_fingerprint(folder: str | os.PathLike, files) -> dict:
    """``{"sha256", "basis"}`` of a checkpoint folder without loading its weights: ``config.json`` and,
    for each safetensors file in ``files``, its header, size and sampled data (module docstring)."""
    folder = Path(folder)
    h = hashlib.sha256()
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    h.update(_config_digest(config if isinstance(config, dict) else {}).encode())
    for path in sorted(Path(p) for p in files):
        _shard_digest(path, h)
    return {"sha256": h.hexdigest(),
            "basis": "config.json + each safetensors file's header, size and data (in full up to 256 KiB, "
                     f"else {_SAMPLE_BLOCKS + 1} sampled blocks of {_BLOCK} bytes)"}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
