"""Write safetensors shards tensor by tensor, with bounded memory and resumable after a kill.

A streamed pruning run finishes one layer at a time; :class:`ShardWriter` takes each
final tensor as it comes (``add``), holds at most ``max_shard_size`` bytes, and writes a
shard whenever the next tensor would overflow it. :meth:`ShardWriter.finalize` names the
shards as transformers does (``model-00001-of-00003.safetensors``) and writes
``model.safetensors.index.json``; the folder then loads with ``from_pretrained``.

Crash safety: a shard is written to a temporary name and ``os.replace``-d into place,
then the journal ``shards.json`` (replaced atomically too) records it. After a kill,
:meth:`ShardWriter.resume` keeps the journaled shards and forgets the rest; replaying
the same ``add`` calls (names already on disk are skipped) and finalising gives a
folder byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import StructPruneError
from ..files import current_umask
from ..checkpoint_files import INDEX_NAME, SINGLE_NAME, check_shard_name, own_copy

log = logging.getLogger(__name__)

JOURNAL_NAME = "shards.json"
JOURNAL_VERSION = 1
_PART = "model-part-{:05d}.safetensors"
_PENDING = "pending-{:05d}.safetensors"
_FINAL = "model-{:05d}-of-{:05d}.safetensors"
_OWN_RE = re.compile(r"^(model-part-\d{5}\.safetensors|pending-\d{5}\.safetensors|model-\d{5}-of-\d{5}\.safetensors|model\.safetensors"
                     r"(\.index\.json)?|shards\.json)(\.tmp)?$")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of ``size``: an int, or ``"2GB"`` / ``"500MiB"`` (decimal and binary units, as transformers)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise StructPruneError(f"max_shard_size {size!r} is not a size such as 2GB, 500MB or 1GiB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise StructPruneError(f"max_shard_size must be positive, got {size!r}")
    return value


def _safetensors_error() -> type[BaseException]:
    from safetensors import SafetensorError

    return SafetensorError


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_file(tensors: dict, tmp: Path, metadata: dict | None = None) -> None:
    """Write a safetensors file at ``tmp`` (readable as the umask allows) and fsync it; on failure
    remove it (never a half-written file: a full disk, Ctrl-C) and raise an OS error inside
    safetensors as the OSError it is, naming the file."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~current_umask())  # safetensors creates 0600; shards are as readable as config.json
        _fsync_file(tmp)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, _safetensors_error()):
            code = re.search(r"(?:code: |os error )(\d+)", str(exc))
            code = int(code.group(1)) if code else errno.EIO
            raise OSError(code, os.strerror(code), str(tmp)) from exc
        raise


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Collect named tensors into safetensors shards of at most ``max_shard_size`` bytes.

    ``folder`` is created if needed; other files in it (config, tokenizer) are left
    alone. A folder already holding shards, an index or a journal is refused unless
    ``overwrite=True`` (which deletes them); continue a killed run with :meth:`resume`.
    The writer keeps references to the tensors it is given until their shard is
    written: do not modify them in place after :meth:`add`. It is also a tensor source
    (``get``, ``in``) for layers already written, pending or on disk.
    """

    def __init__(self, folder: str | os.PathLike, max_shard_size: int | str = "2GB", overwrite: bool = False):
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_size = parse_size(max_shard_size)
        own = self._own_files()
        if own and not overwrite:
            raise StructPruneError(
                f"{self.folder} already holds weights or a shard journal ({own[0]}); continue with "
                "ShardWriter.resume(folder) or pass overwrite=True")
        for name in own:
            (self.folder / name).unlink()
        self._reset()

    def _reset(self) -> None:
        self.shards: list[dict] = []  # journal entries: {"file", "size", "tensors": [[name, dtype, shape]]}
        self._on_disk: dict[str, tuple[int, str, tuple]] = {}  # name -> (shard index, dtype, shape)
        self._pending: list[tuple[str, torch.Tensor]] = []
        self._pending_index: dict[str, torch.Tensor] = {}
        self._pending_ptrs: set[int] = set()
        self.pending_bytes = 0
        self._session: set[str] = set()  # names added by this process
        self._spills: list[dict] = []  # checkpointed pending tensors: {"file", "tensors": [names]}
        self._spilled = 0  # how many of the pending tensors are in those files
        self._restored: dict[str, tuple[str, tuple]] = {}  # pending names read back by resume()
        self._total = None  # shard count once finalising
        self.finalized = False

    def _own_files(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir() if p.is_file() and _OWN_RE.match(p.name))

    # -- adding -----------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` under ``name``; writes a shard first if it would overflow the current one.

        A name already in a shard written before :meth:`resume` is skipped (after
        checking its dtype and shape); adding a name twice otherwise is an error.
        """
        t = tensor.detach()
        if (name in self._on_disk or name in self._restored) and name not in self._session:
            dtype, shape = self._restored[name] if name in self._restored else self._on_disk[name][1:]
            if dtype != _dtype_name(t.dtype) or shape != tuple(t.shape):
                raise StructPruneError(f"tensor {name!r} was written as {dtype} {list(shape)} before the resume, "
                                       f"now {_dtype_name(t.dtype)} {list(t.shape)}: not the same run")
            self._session.add(name)
            return
        if self.finalized:
            raise StructPruneError(f"{self.folder}: shards already finalised, cannot add {name!r}")
        if name in self._session:
            raise StructPruneError(f"tensor {name!r} added twice to {self.folder}")
        if t.device.type != "cpu":
            t = t.to("cpu")
        elif (not t.is_contiguous() or t.storage_offset() or t.untyped_storage().nbytes() != t.nbytes
              or t.untyped_storage().data_ptr() in self._pending_ptrs):
            # safetensors refuses views and tensors sharing memory; copy those.
            t = t.contiguous().clone()
        nbytes = t.numel() * t.element_size()
        if self._pending and self.pending_bytes + nbytes > self.max_shard_size:
            self._flush()
        self._pending.append((name, t))
        self._pending_index[name] = t
        self._pending_ptrs.add(t.untyped_storage().data_ptr())
        self.pending_bytes += nbytes
        self._session.add(name)

    def add_module(self, prefix: str, module: nn.Module) -> None:
        """:meth:`add` every tensor of ``module.state_dict()`` as ``prefix + key``, in state-dict order."""
        for key, t in module.state_dict().items():
            self.add(prefix + key, t)

    def _flush(self) -> None:

        k = len(self.shards) + 1
        part = _PART.format(k)
        tmp = self.folder / (part + ".tmp")
        _write_file(dict(self._pending), tmp, metadata={"format": "pt"})
        os.replace(tmp, self.folder / part)
        entry = {"file": part, "size": (self.folder / part).stat().st_size,
                 "tensors": [[n, _dtype_name(t.dtype), list(t.shape)] for n, t in self._pending]}
        self.shards.append(entry)
        spills, self._spills, self._spilled = self._spills, [], 0
        self._write_journal()
        for sp in spills:  # now in the shard: the checkpoint copies are obsolete
            (self.folder / sp["file"]).unlink(missing_ok=True)
        for n, t in self._pending:
            self._on_disk[n] = (k - 1, _dtype_name(t.dtype), tuple(t.shape))
        log.debug("wrote %s (%d tensors, %d bytes)", part, len(self._pending), self.pending_bytes)
        self._pending, self._pending_index, self._pending_ptrs, self.pending_bytes = [], {}, set(), 0

    def checkpoint(self) -> None:
        """Make every tensor added so far survive a kill: the pending ones (not yet in a shard) not
        checkpointed before are written to a ``pending-NNNNN.safetensors`` file the journal names.
        :meth:`resume` reads them back into the pending shard, so the shards written afterwards are
        the same bytes as without the kill. Costs one extra write of each tensor at most."""

        new = self._pending[self._spilled:]
        if not new:
            return
        n = 0
        while (self.folder / _PENDING.format(n)).exists():
            n += 1
        name = _PENDING.format(n)
        tmp = self.folder / (name + ".tmp")
        _write_file(dict(new), tmp)
        os.replace(tmp, self.folder / name)
        self._spills.append({"file": name, "tensors": [k for k, _ in new]})
        self._spilled = len(self._pending)
        self._write_journal()

    def _write_journal(self) -> None:
        _write_json_atomic(self.folder / JOURNAL_NAME, {
            "version": JOURNAL_VERSION, "max_shard_size": self.max_shard_size, "shards": self.shards,
            "pending": self._spills, "finalizing": self._total})

    # -- finishing --------------------------------------------------------------------------
    def _file(self, k: int) -> Path:
        """Where shard ``k`` (0-based) is now: its final name once renamed, else its part name."""
        if self._total is not None:
            final = self.folder / _FINAL.format(k + 1, self._total)
            if final.is_file() or not (self.folder / self.shards[k]["file"]).is_file():
                return final
        return self.folder / self.shards[k]["file"]

    def finalize(self) -> Path:
        """Write the last shard, give the shards their final names and write the index; returns its path."""
        index = self.folder / INDEX_NAME
        if self.finalized:
            return index
        if self._pending:
            self._flush()
        if not self.shards:
            raise StructPruneError(f"no tensors were added to {self.folder}; nothing to finalise")
        if self._total is None:
            self._total = len(self.shards)
            self._write_journal()  # a kill while renaming is then resumable
        for k, sh in enumerate(self.shards):
            part, final = self.folder / sh["file"], self.folder / _FINAL.format(k + 1, self._total)
            if part.is_file():
                os.replace(part, final)
            elif not final.is_file():
                raise StructPruneError(f"shard {part} (or {final.name}) is missing from {self.folder}")
        weight_map, total_size, total_params = {}, 0, 0
        for k, sh in enumerate(self.shards):
            for name, dtype, shape in sh["tensors"]:
                numel = 1
                for s in shape:
                    numel *= s
                weight_map[name] = _FINAL.format(k + 1, self._total)
                total_params += numel
                total_size += numel * getattr(torch, dtype).itemsize
        _write_json_atomic(index, {"metadata": {"total_parameters": total_params, "total_size": total_size},
                                   "weight_map": dict(sorted(weight_map.items()))})
        (self.folder / JOURNAL_NAME).unlink(missing_ok=True)
        self.finalized = True
        return index

    # -- resuming ---------------------------------------------------------------------------
    @classmethod
    def resume(cls, folder: str | os.PathLike, max_shard_size: int | str | None = None) -> "ShardWriter":
        """Reopen a folder a killed writer left: journaled shards are kept, anything later is deleted.

        A folder with no journal and no index starts afresh (with ``max_shard_size``,
        default 2GB); a finalised folder gives a finished writer whose ``add`` of the
        same names is a no-op. ``max_shard_size``, if given, must match the journal's.
        """
        folder = Path(folder).expanduser()
        journal = folder / JOURNAL_NAME
        if not journal.is_file():
            if (folder / INDEX_NAME).is_file():
                return cls._finished(folder)
            return cls(folder, max_shard_size if max_shard_size is not None else "2GB", overwrite=True)
        try:
            j = json.loads(journal.read_text())
            if j.get("version") != JOURNAL_VERSION:
                raise ValueError(f"version {j.get('version')!r}")
            shards, size, total = j["shards"], int(j["max_shard_size"]), j.get("finalizing")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StructPruneError(
                f"shard journal {journal} is unreadable ({exc}); delete the folder and rerun") from exc
        if max_shard_size is not None and parse_size(max_shard_size) != size:
            raise StructPruneError(f"{folder} was written with max_shard_size={size} bytes, not {max_shard_size}")
        w = cls.__new__(cls)
        w.folder, w.max_shard_size = folder, size
        w._reset()
        w.shards, w._total = shards, total
        for k, sh in enumerate(shards):
            check_shard_name(folder, sh["file"], journal)
            path = w._file(k)
            if not path.is_file() or path.stat().st_size != sh["size"]:
                raise StructPruneError(f"shard {path} recorded in {journal} is missing or truncated; "
                                       "delete the folder and rerun")
            for name, dtype, shape in sh["tensors"]:
                w._on_disk[name] = (k, dtype, tuple(shape))
        spills = j.get("pending") or []
        for sp in spills:  # checkpointed pending tensors, back into the pending shard in order
            check_shard_name(folder, sp["file"], journal)
            from safetensors import safe_open

            try:
                with safe_open(str(folder / sp["file"]), framework="pt") as f:
                    for name in sp["tensors"]:
                        t = f.get_tensor(name)
                        w._pending.append((name, t))
                        w._pending_index[name] = t
                        w._pending_ptrs.add(t.untyped_storage().data_ptr())
                        w.pending_bytes += t.numel() * t.element_size()
                        w._restored[name] = (_dtype_name(t.dtype), tuple(t.shape))
            except Exception as exc:
                raise StructPruneError(f"checkpointed tensors {folder / sp['file']} recorded in {journal} are "
                                       f"missing or unreadable ({exc}); delete the folder and rerun") from exc
        w._spills, w._spilled = list(spills), len(w._pending)
        keep = {sh["file"] for sh in shards} | {sp["file"] for sp in spills} | {JOURNAL_NAME}
        if total is not None:
            keep |= {_FINAL.format(k + 1, total) for k in range(len(shards))}
        for name in w._own_files():
            if name not in keep:  # a shard or temp file written after the last journal entry
                (folder / name).unlink()
        if total is not None:
            w.finalize()
        log.info("resuming %s: %d shard(s), %d tensors kept", folder, len(shards), len(w._on_disk))
        return w

    @classmethod
    def _finished(cls, folder: Path) -> "ShardWriter":
        w = cls.__new__(cls)
        w.folder, w.max_shard_size = folder, 0
        w._reset()
        reader_map = _index_map(folder)
        from safetensors import safe_open

        for name, path in reader_map.items():
            with safe_open(str(path), framework="pt") as f:
                sl = f.get_slice(name)
                dtype = {v: k for k, v in _ST_DTYPES.items()}.get(sl.get_dtype(), sl.get_dtype())
                w._on_disk[name] = (-1, dtype, tuple(sl.get_shape()))
        w.finalized = True
        return w

    # -- reading back -----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Every tensor name written or pending."""
        return [*self._on_disk, *self._pending_index]

    def __contains__(self, name: str) -> bool:
        return name in self._pending_index or name in self._on_disk

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """A copy of tensor ``name``, pending or already in a shard, on ``device`` in ``dtype``."""
        if name in self._pending_index:
            return own_copy(self._pending_index[name], dtype, device)
        if name not in self._on_disk:
            raise StructPruneError(f"tensor {name!r} has not been written to {self.folder}")
        k = self._on_disk[name][0]
        path = self._file(k) if k >= 0 else _index_map(self.folder)[name]
        return _read(path, name, dtype, device)


_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def _read(path: Path, name: str, dtype, device) -> torch.Tensor:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return own_copy(f.get_tensor(name), dtype, device)
    except (SafetensorError, OSError) as exc:
        raise StructPruneError(f"weights file {path} is truncated or corrupt ({' '.join(str(exc).split())})") from exc


def _index_map(folder: Path) -> dict[str, Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise StructPruneError(f"{index} is not a valid safetensors index ({exc})") from exc
        return {n: check_shard_name(folder, f, index) for n, f in wm.items()}
    single = folder / SINGLE_NAME
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {n: single for n in f.keys()}
    return {}


def read_back(folder: str | os.PathLike, name: str, dtype: torch.dtype | None = None,
              device: str | torch.device = "cpu") -> torch.Tensor:
    """Tensor ``name`` from a folder a :class:`ShardWriter` wrote: finalised (index) or still in
    progress (journaled shards; tensors still pending in a live writer are not on disk yet)."""
    folder = Path(folder).expanduser()
    journal = folder / JOURNAL_NAME
    if journal.is_file():
        try:
            j = json.loads(journal.read_text())
            shards, total = j["shards"], j.get("finalizing")
        except (ValueError, KeyError, TypeError) as exc:
            raise StructPruneError(f"shard journal {journal} is unreadable ({exc})") from exc
        for k, sh in enumerate(shards):
            if any(n == name for n, _, _ in sh["tensors"]):
                path = check_shard_name(folder, sh["file"], journal)
                if not path.is_file() and total is not None:
                    path = folder / _FINAL.format(k + 1, total)
                return _read(path, name, dtype, device)
    path = _index_map(folder).get(name)
    if path is None:
        raise StructPruneError(f"tensor {name!r} is not in the shards written to {folder}")
    return _read(path, name, dtype, device)
