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
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import StructPruneError
from ..files import current_umask
from ..checkpoint_files import INDEX_NAME, SINGLE_NAME, check_shard_name, own_copy, safetensors_header

log = logging.getLogger(__name__)

JOURNAL_NAME = "shards.json"
JOURNAL_VERSION = 2  # 1: pending tensors checkpointed to pending-N.safetensors files (before streaming)
_PART = "model-part-{:05d}.safetensors"
_DATA = "model-part-{:05d}.data"  # the open shard's tensor bytes, in the order added
_COPY_CHUNK = 16 << 20
_FINAL = "model-{:05d}-of-{:05d}.safetensors"
_OWN_RE = re.compile(r"^(model-part-\d{5}\.(safetensors|data)|pending-\d{5}\.safetensors|model-\d{5}-of-\d{5}\.safetensors|model\.safetensors"
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


def _write_shard(tmp: Path, entries: list, spans: list[tuple[int, int]], data: Path) -> None:
    """Write the safetensors file ``tmp`` of ``entries`` ``(name, dtype, shape, nbytes)`` whose bytes
    are at ``spans`` ``(offset, nbytes)`` of the file ``data``: the header, then each tensor's bytes
    in safetensors' order, copied in chunks (memory: one chunk). Readable as the umask allows and
    fsynced; on failure it is removed (never a half-written file: a full disk, Ctrl-C) and the
    error raised as the OSError it is, naming the file."""
    prefix, order = safetensors_header(entries, {"format": "pt"})
    try:
        with open(tmp, "wb") as out, open(data, "rb") as src:
            out.write(prefix)
            for i in order:
                off, left = spans[i]
                src.seek(off)
                while left:
                    chunk = src.read(min(left, _COPY_CHUNK))
                    if not chunk:
                        raise OSError(errno.EIO, f"{data} ends before its tensors' bytes", str(data))
                    out.write(chunk)
                    left -= len(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # shards are as readable as config.json
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Collect named tensors into safetensors shards of at most ``max_shard_size`` bytes.

    Each tensor's bytes go to disk when it is added (appended to the open shard's data file),
    so the writer holds no tensor in memory whatever the shard size: memory is one tensor at a
    time, not one shard. When the next tensor would overflow the shard, the shard is closed: its
    safetensors header (all shapes are known by then) is written, followed by the tensors' bytes
    copied from the data file in safetensors' own order, in chunks; the result is byte-identical
    to ``safetensors.torch.save_file`` of the same tensors.

    ``folder`` is created if needed; other files in it (config, tokenizer) are left
    alone. A folder already holding shards, an index or a journal is refused unless
    ``overwrite=True`` (which deletes them); continue a killed run with :meth:`resume`.
    It is also a tensor source (``get``, ``in``) for tensors already added, pending or in a shard.
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
        # The open shard's tensors, in the order added: name -> (dtype, shape, offset in the data file, bytes)
        self._pending: dict[str, tuple[torch.dtype, tuple, int, int]] = {}
        self.pending_bytes = 0
        self._data = None  # the open shard's data file (append), opened on the first add
        self._committed = 0  # bytes of the data file a checkpoint recorded
        self._session: set[str] = set()  # names added by this process
        self._restored: set[str] = set()  # pending names a checkpoint recorded, read back by resume()
        self._total = None  # shard count once finalising
        self.finalized = False

    def _own_files(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir() if p.is_file() and _OWN_RE.match(p.name))

    def _data_path(self) -> Path:
        return self.folder / _DATA.format(len(self.shards) + 1)

    # -- adding -----------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` under ``name`` (its bytes are written now: later changes to it do not
        matter); closes the current shard first if the tensor would overflow it.

        A name already written before :meth:`resume` is skipped (after checking its dtype and
        shape); adding a name twice otherwise is an error.
        """
        t = tensor.detach()
        if (name in self._on_disk or name in self._restored) and name not in self._session:
            dtype, shape = ((_dtype_name(self._pending[name][0]), self._pending[name][1]) if name in self._restored
                            else self._on_disk[name][1:])
            if dtype != _dtype_name(t.dtype) or shape != tuple(t.shape):
                raise StructPruneError(f"tensor {name!r} was written as {dtype} {list(shape)} before the resume, "
                                       f"now {_dtype_name(t.dtype)} {list(t.shape)}: not the same run")
            self._session.add(name)
            return
        if self.finalized:
            raise StructPruneError(f"{self.folder}: shards already finalised, cannot add {name!r}")
        if name in self._session:
            raise StructPruneError(f"tensor {name!r} added twice to {self.folder}")
        nbytes = t.numel() * t.element_size()
        if self._pending and self.pending_bytes + nbytes > self.max_shard_size:
            self._flush()
        if self._data is None:
            self._data = open(self._data_path(), "ab")
        offset = self._data.tell()
        # Raw little-endian bytes as safetensors stores them (a byte view: numpy has no bfloat16).
        self._data.write(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
        self._pending[name] = (t.dtype, tuple(t.shape), offset, nbytes)
        self.pending_bytes += nbytes
        self._session.add(name)

    def add_module(self, prefix: str, module: nn.Module) -> None:
        """:meth:`add` every tensor of ``module.state_dict()`` as ``prefix + key``, in state-dict order."""
        for key, t in module.state_dict().items():
            self.add(prefix + key, t)

    def _sync_data(self) -> Path:
        """Flush the open shard's data file to disk; its path."""
        path = self._data_path()
        if self._data is not None:
            self._data.flush()
            os.fsync(self._data.fileno())
        return path

    def _flush(self) -> None:
        """Close the open shard: header, then the data in safetensors' order, as ``save_file`` writes it."""
        k = len(self.shards) + 1
        part = _PART.format(k)
        data = self._sync_data()
        tmp = self.folder / (part + ".tmp")
        entries = [(n, d, shape, nbytes) for n, (d, shape, _, nbytes) in self._pending.items()]
        spans = [(off, nbytes) for d, shape, off, nbytes in self._pending.values()]
        _write_shard(tmp, entries, spans, data)
        os.replace(tmp, self.folder / part)
        entry = {"file": part, "size": (self.folder / part).stat().st_size,
                 "tensors": [[n, _dtype_name(d), list(shape)] for n, (d, shape, _, _) in self._pending.items()]}
        self.shards.append(entry)
        if self._data is not None:
            self._data.close()
        self._data, self._committed = None, 0
        self._write_journal()
        data.unlink(missing_ok=True)  # now in the shard: the data file is obsolete
        for n, (d, shape, _, _) in self._pending.items():
            self._on_disk[n] = (k - 1, _dtype_name(d), shape)
        log.debug("wrote %s (%d tensors, %d bytes)", part, len(self._pending), self.pending_bytes)
        self._pending, self.pending_bytes = {}, 0

    def checkpoint(self) -> None:
        """Make every tensor added so far survive a kill: the open shard's data file is synced and
        the journal records its length and tensors. :meth:`resume` cuts the file back to that
        length, so the shards written afterwards are the same bytes as without the kill."""
        if self._data is None or self._data.tell() == self._committed:
            return
        self._sync_data()
        self._committed = self._data.tell()
        self._write_journal()

    def _write_journal(self) -> None:
        pending = None
        if self._committed:
            pending = {"file": self._data_path().name, "size": self._committed,
                       "tensors": [[n, _dtype_name(d), list(shape), off] for n, (d, shape, off, nbytes)
                                   in self._pending.items() if off + nbytes <= self._committed]}
        _write_json_atomic(self.folder / JOURNAL_NAME, {
            "version": JOURNAL_VERSION, "max_shard_size": self.max_shard_size, "shards": self.shards,
            "pending": pending, "finalizing": self._total})

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
        """Reopen a folder a killed writer left: journaled shards and checkpointed tensors are kept,
        anything later is deleted (the open shard's data file is cut back to its checkpoint).

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
                raise ValueError(f"version {j.get('version')!r}, written by another StructPrune version")
            shards, size, total, pending = j["shards"], int(j["max_shard_size"]), j.get("finalizing"), j.get("pending")
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
        keep = {sh["file"] for sh in shards} | {JOURNAL_NAME}
        if pending:  # checkpointed tensors of the open shard: the data file, cut back to the checkpoint
            try:
                if pending["file"] != w._data_path().name:
                    raise ValueError(f"names {pending['file']}, expected {w._data_path().name}")
                data = w._data_path()
                if data.stat().st_size < pending["size"]:
                    raise ValueError(f"{data.stat().st_size} bytes, {pending['size']} recorded")
                with open(data, "r+b") as fh:
                    fh.truncate(pending["size"])
                for name, dtype, shape, off in pending["tensors"]:
                    d = getattr(torch, dtype)
                    nbytes = d.itemsize * math.prod(shape)
                    w._pending[name] = (d, tuple(shape), off, nbytes)
                    w.pending_bytes += nbytes
                    w._restored.add(name)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise StructPruneError(f"checkpointed tensors {folder / str(pending.get('file'))} recorded in {journal} "
                                       f"are missing or unreadable ({exc}); delete the folder and rerun") from exc
            w._committed = pending["size"]
            keep.add(pending["file"])
        if total is not None:
            keep |= {_FINAL.format(k + 1, total) for k in range(len(shards))}
        for name in w._own_files():
            if name not in keep:  # a shard or temp file written after the last journal entry
                (folder / name).unlink()
        if w._pending:
            w._data = open(w._data_path(), "ab")
        if total is not None:
            w.finalize()
        log.info("resuming %s: %d shard(s), %d tensors kept", folder, len(shards), len(w._on_disk) + len(w._pending))
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
        return [*self._on_disk, *self._pending]

    def __contains__(self, name: str) -> bool:
        return name in self._pending or name in self._on_disk

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """A copy of tensor ``name``, pending or already in a shard, on ``device`` in ``dtype``."""
        if name in self._pending:
            d, shape, off, nbytes = self._pending[name]
            if self._data is not None:
                self._data.flush()
            buf = bytearray(nbytes)
            with open(self._data_path(), "rb") as fh:
                fh.seek(off)
                fh.readinto(buf)
            t = torch.frombuffer(buf, dtype=d) if nbytes else torch.empty(0, dtype=d)
            return own_copy(t.reshape(shape), dtype, device)
        if name not in self._on_disk:
            raise StructPruneError(f"tensor {name!r} has not been written to {self.folder}")
        k = self._on_disk[name][0]
        path = self._file(k) if k >= 0 else _index_map(self.folder)[name]
        return _read(path, name, dtype, device)

    def close(self) -> None:
        """Close the open data file (a writer dropped without finalising: tests, a failed run)."""
        if self._data is not None:
            self._data.close()
            self._data = None


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
