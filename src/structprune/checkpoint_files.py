"""Names and safety checks of a safetensors checkpoint folder, shared by the reader
(:mod:`structprune.models.checkpoint`) and the writer (:mod:`structprune.export.shards`):
one place that knows the file names, so neither package imports the other for them."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import StructPruneError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def check_shard_name(folder: Path, name: object, index: Path) -> Path:
    """``folder / name`` for a shard file named in an index; refuse names that leave ``folder``.

    Lexical check only: Hugging Face cache snapshots are symlinks into a blob folder,
    so resolving links and requiring the target inside ``folder`` would refuse them.
    """
    if not isinstance(name, str) or not name:
        raise StructPruneError(f"{index} names a shard {name!r} that is not a file name")
    parts = re.split(r"[\\/]", name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts or Path(name).is_absolute():
        raise StructPruneError(f"{index} names the shard {name!r}, a path outside the folder; refusing to read it")
    return folder / name


def own_copy(t: torch.Tensor, dtype: torch.dtype | None, device: str | torch.device) -> torch.Tensor:
    """A copy of ``t`` on ``device`` in ``dtype`` that owns its memory."""
    device = torch.device(device)
    if device.type == "cpu":
        return t.to(dtype=dtype or t.dtype, copy=True)
    # Transfer in the stored (usually narrower) dtype, cast on the device.
    out = t.to(device)
    return out.to(dtype) if dtype is not None and out.dtype != dtype else out
