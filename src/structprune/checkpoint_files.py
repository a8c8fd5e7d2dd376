"""Names and safety checks of a safetensors checkpoint folder, shared by the reader
(:mod:`structprune.models.checkpoint`) and the writer (:mod:`structprune.export.shards`):
one place that knows the file names, so neither package imports the other for them."""

from __future__ import annotations

import json
import re
import struct
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


#: safetensors' dtype names (the header's ``dtype`` field) of the torch dtypes a checkpoint holds.
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
_ORDER_CACHE: dict[tuple, list[int]] = {}


def safetensors_order(entries: list[tuple[str, torch.dtype]]) -> list[int]:
    """The order in which ``safetensors`` lays out tensors ``(name, dtype)`` in a file (by dtype,
    then name, in its version's rule), taken from safetensors itself on one-element stand-ins, so
    that a file written piece by piece is byte-identical to ``save_file``'s whatever the version."""
    key = tuple((n, str(d)) for n, d in entries)
    if key not in _ORDER_CACHE:
        from safetensors.torch import save

        blob = save({n: torch.zeros(1, dtype=d) for n, d in entries})
        (n,) = struct.unpack("<Q", blob[:8])
        names = [k for k in json.loads(blob[8:8 + n]) if k != "__metadata__"]
        where = {name: i for i, (name, _) in enumerate(entries)}
        _ORDER_CACHE.clear()  # one shard's worth: the next shard has other names
        _ORDER_CACHE[key] = [where[name] for name in names]
    return _ORDER_CACHE[key]


def safetensors_header(entries: list[tuple[str, torch.dtype, tuple, int]], metadata: dict | None = None
                       ) -> tuple[bytes, list[int]]:
    """``(prefix, order)`` of a safetensors file holding ``entries`` ``(name, dtype, shape, nbytes)``:
    the 8-byte length and the JSON header exactly as ``safetensors.torch.save_file`` writes them,
    and the order in which the tensors' bytes must follow."""
    order = safetensors_order([(n, d) for n, d, _, _ in entries])
    header: dict = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for i in order:
        name, dtype, shape, nbytes = entries[i]
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(blob)) + blob, order
