"""Calibration activations whose RAM does not grow with depth: chunk stores that spill to disk.

An :class:`ActivationStore` holds one layer boundary: the chunks ``[batch, seqlen, hidden]``
of the calibration windows entering (or leaving) a decoder layer. It behaves like a list of
CPU tensors (``append``, ``len``, ``store[c]``, iteration, slicing, ``torch.cat(store)``).
A chunk stays in RAM while the **activation budget** allows; beyond it the chunk is written
to a file in a scratch folder and read back memory-mapped (``torch.from_file``, private
mapping), so reading a chunk pages in that chunk only, and its pages leave the process
when the returned tensor is dropped.

Why one budget for the whole process rather than one per store: the user's question is
"how much RAM may activations take", and the number of live boundaries varies (streaming
holds two or three, the sensitivity pass a few more, a solver may keep dense outputs);
a per-store budget would multiply with that number, which is the dependence we remove.
Stores take RAM first come, first served: the long-lived first-layer inputs, captured
first, stay in RAM; later, shorter-lived boundaries spill. The budget in force is the one
of the innermost :func:`activation_budget` block, else ``$STRUCTPRUNE_ACTIVATION_BUDGET``
(bytes, ``512M``, ``6GiB``, ``inf``; default ``inf``: everything in RAM, as before), with
files under ``$STRUCTPRUNE_OFFLOAD_DIR`` (default: the system temporary folder; it should
be a disk, not a tmpfs).

Chunks are stored bit for bit (in the store's ``dtype``, by default the tensor's own, i.e.
the compute dtype), so spilling never changes a result. A store's files are deleted when
it is closed or garbage-collected; every scratch folder is removed at interpreter exit,
including after an unhandled exception.
"""

from __future__ import annotations

import atexit
import itertools
import math
import os
import re
import shutil
import tempfile
import threading
import weakref
from contextlib import contextmanager

import torch

ENV_BUDGET = "STRUCTPRUNE_ACTIVATION_BUDGET"
ENV_DIR = "STRUCTPRUNE_OFFLOAD_DIR"

_UNITS = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}


def parse_size(text: str | int | float | None) -> float:
    """Bytes from ``1073741824``, ``"512M"``, ``"6G"``, ``"6GiB"``, ``"1.5GB"`` (binary multiples)
    or ``"inf"``/``None`` (no limit)."""
    if text is None:
        return math.inf
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = text.strip().lower()
        if s in ("inf", "infinity", "none", "unlimited", ""):
            return math.inf
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?", s)
        if m is None:
            raise ValueError(f"cannot read a size from {text!r} (examples: 0, 512M, 6GiB, inf)")
        value = float(m.group(1)) * _UNITS[m.group(2)]
    if value < 0:
        raise ValueError(f"a size cannot be negative: {text!r}")
    return math.inf if math.isinf(value) else int(value)


# Scratch folders created by this process, removed at exit whatever happened.
_FOLDERS: set[str] = set()


@atexit.register
def _remove_folders() -> None:
    for folder in list(_FOLDERS):
        shutil.rmtree(folder, ignore_errors=True)
        _FOLDERS.discard(folder)


class ActivationBudget:
    """RAM budget shared by every store created while it is in force, and their counters.

    ``resident``/``spilled``: bytes of chunks held in RAM / on disk now (``peak_*``: the
    most at any time); ``stores``: stores alive now (``peak_stores``: the most at once)."""

    def __init__(self, limit: str | int | float | None = math.inf, scratch_dir: str | os.PathLike | None = None):
        self.limit = parse_size(limit)
        self.scratch_dir = os.fspath(scratch_dir) if scratch_dir is not None else None
        self.resident = self.peak_resident = 0
        self.spilled = self.peak_spilled = 0
        self.stores = self.peak_stores = 0
        self._folder: str | None = None
        self._retired = False  # its activation_budget block has ended
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"ActivationBudget(limit={self.limit}, resident={self.resident}, spilled={self.spilled}, "
                f"stores={self.stores})")

    @property
    def folder(self) -> str | None:
        """The scratch folder of this budget's spilled chunks (created on the first spill)."""
        return self._folder

    def _base(self) -> str:
        return self.scratch_dir or os.environ.get(ENV_DIR) or tempfile.gettempdir()

    def room(self, ranks: int = 1) -> float:
        """Bytes new chunks may still take: what the RAM limit leaves (without a limit, what
        :func:`~structprune.memory.default_ram_budget` would), plus half the free space of the disk
        spilled chunks go to (the other half is left to everything else on it; none when that
        "disk" is memory, tmpfs), shared by ``ranks`` processes spilling to the same disk."""
        from ..memory import default_ram_budget

        limit = self.limit if math.isfinite(self.limit) else default_ram_budget()
        base = self._base()
        while not os.path.isdir(base) and os.path.dirname(base) != base:  # the folder may not exist yet
            base = os.path.dirname(base)
        try:
            disk = 0.0 if _in_memory_filesystem(base) else shutil.disk_usage(base).free / 2 / max(1, ranks)
        except OSError:
            disk = 0.0
        return max(limit - self.resident, 0) + disk

    def _make_folder(self) -> str:
        with self._lock:
            if self._folder is None:
                base = self._base()
                os.makedirs(base, exist_ok=True)
                self._folder = tempfile.mkdtemp(prefix="structprune-act-", dir=base)
                _FOLDERS.add(self._folder)
            return self._folder

    def _reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.resident + nbytes > self.limit:
                return False
            self.resident += nbytes
            self.peak_resident = max(self.peak_resident, self.resident)
            return True

    def _add_spilled(self, nbytes: int) -> None:
        with self._lock:
            self.spilled += nbytes
            self.peak_spilled = max(self.peak_spilled, self.spilled)

    def _open_store(self) -> None:
        with self._lock:
            self.stores += 1
            self.peak_stores = max(self.peak_stores, self.stores)

    def _close_store(self, resident: int, spilled: int) -> None:
        with self._lock:
            self.resident -= resident
            self.spilled -= spilled
            self.stores -= 1
        if self._retired and self.spilled == 0:
            self._remove_folder()

    def _remove_folder(self) -> None:
        with self._lock:
            folder, self._folder = self._folder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
            _FOLDERS.discard(folder)


def _in_memory_filesystem(path: str) -> bool:
    """Whether ``path`` lies on tmpfs/ramfs (its "disk" space is RAM), from /proc/mounts (Linux;
    elsewhere False)."""
    try:
        mounts = [line.split()[1:3] for line in open("/proc/mounts", encoding="utf-8")]
    except OSError:
        return False
    real = os.path.realpath(path)
    best = max((m for m in mounts if real == m[0] or real.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best is not None and best[1] in ("tmpfs", "ramfs")


_context: list[ActivationBudget] = []  # innermost activation_budget block last
_env_budget: tuple[tuple, ActivationBudget] | None = None


def current_budget() -> ActivationBudget:
    """The budget new stores charge: the innermost :func:`activation_budget` block's, else
    the one described by ``$STRUCTPRUNE_ACTIVATION_BUDGET`` / ``$STRUCTPRUNE_OFFLOAD_DIR``."""
    global _env_budget
    if _context:
        return _context[-1]
    key = (os.environ.get(ENV_BUDGET), os.environ.get(ENV_DIR))
    if _env_budget is None or _env_budget[0] != key:  # re-read so that a changed variable takes effect
        _env_budget = (key, ActivationBudget(key[0], key[1]))
    return _env_budget[1]


def explicit_budget() -> ActivationBudget | None:
    """The budget someone set: the innermost :func:`activation_budget` block's, else the one
    ``$STRUCTPRUNE_ACTIVATION_BUDGET`` describes; None when neither is set (callers then apply
    their default)."""
    if _context or os.environ.get(ENV_BUDGET):
        return current_budget()
    return None


@contextmanager
def activation_budget(limit: str | int | float | None, scratch_dir: str | os.PathLike | None = None):
    """Stores created inside the block keep at most ``limit`` bytes of chunks in RAM (together)
    and spill the rest to a fresh folder under ``scratch_dir``; yields the
    :class:`ActivationBudget` (its counters are readable after the block). The folder is
    removed when the block ends and its stores are gone (at the latest at exit)."""
    budget = ActivationBudget(limit, scratch_dir)
    _context.append(budget)
    try:
        yield budget
    finally:
        _context.remove(budget)
        budget._retired = True
        if budget.spilled == 0:
            budget._remove_folder()


class _Files:
    """RAM bytes and files of one store (shared with its slices); released once."""

    _ids = itertools.count()

    def __init__(self, budget: ActivationBudget):
        self.budget = budget
        self.id = next(self._ids)
        self.paths: list[str] = []
        self.resident = self.spilled = 0
        self.closed = False
        budget._open_store()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for p in self.paths:
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
        self.paths.clear()
        self.budget._close_store(self.resident, self.spilled)


class _Lease:
    """Its death (the store and all its slices gone) closes the files."""

    __slots__ = ("files", "finalizer", "__weakref__")

    def __init__(self, files: _Files):
        self.files = files
        self.finalizer = weakref.finalize(self, files.close)


def _map(path: str, shape, dtype) -> torch.Tensor:
    n = math.prod(shape)
    # Private mapping: pages are read on touch and writes to the tensor never reach the file.
    return torch.from_file(path, shared=False, size=n, dtype=dtype).view(shape)


def _rebuild(chunks, dtype, source_dtype):
    store = ActivationStore(dtype=dtype)
    store.source_dtype = source_dtype
    store.extend(chunks)
    return store


class ActivationStore(list):
    """Chunks of one layer boundary: in RAM up to the activation budget, on disk beyond.

    Use it as a list of CPU tensors: ``append``/``extend``/``+=``, ``len``, ``store[c]``,
    iteration, ``store[a:b]`` (a slice sharing the chunks) and ``torch.cat(store)``.
    ``store[c]`` of a spilled chunk maps its file anew: keep the tensor only while you use
    it. Appending takes the tensor as is when it stays in RAM (no copy: do not modify it
    afterwards); ``dtype`` (default: each tensor's own) is the dtype chunks are kept in, and
    ``source_dtype`` the dtype the first chunk arrived in (what readers cast back to).
    Only appending is supported as mutation; :meth:`close` (or dropping the store and its
    slices) releases the RAM budget and deletes the files.
    """

    # The list's own items are real tensors (a RAM chunk, or a mapping of a spilled chunk's
    # file that Python-level access never touches), so C-level readers like torch.cat work;
    # Python-level access returns a fresh mapping per call so pages do not accumulate (pages
    # that C-level reads touch stay mapped until the store is dropped).

    def __init__(self, chunks=(), *, dtype: torch.dtype | None = None, budget: ActivationBudget | None = None):
        super().__init__()
        self.dtype = dtype
        self.source_dtype: torch.dtype | None = None
        self._budget = budget if budget is not None else current_budget()
        self._lease: _Lease | None = _Lease(_Files(self._budget))
        self._owner = True
        self._paths: list[str | None] = []  # per chunk: its file, None when in RAM
        self.extend(chunks)

    # -- adding chunks -------------------------------------------------------------------------

    def append(self, chunk: torch.Tensor) -> None:
        """Add a chunk: kept in RAM if the budget allows, else written to disk."""
        if self._lease is None:
            raise ValueError("append to a closed ActivationStore")
        files = self._lease.files
        if self.source_dtype is None:
            self.source_dtype = chunk.dtype
        t = chunk.detach().to("cpu", self.dtype or chunk.dtype)
        nbytes = t.numel() * t.element_size()
        if self._budget._reserve(nbytes):
            if not t.is_contiguous() or t.untyped_storage().nbytes() > nbytes:
                t = t.clone(memory_format=torch.contiguous_format)  # count (and keep) only its own bytes
            files.resident += nbytes
            super().append(t)
            self._paths.append(None)
            return
        path = os.path.join(self._budget._make_folder(), f"{files.id}-{len(files.paths)}.bin")
        files.paths.append(path)  # before writing: a failed write is cleaned up too
        with open(path, "xb") as f:
            t.contiguous().reshape(-1).view(torch.uint8).numpy().tofile(f)
        files.spilled += nbytes
        self._budget._add_spilled(nbytes)
        super().append(_map(path, tuple(t.shape), t.dtype))
        self._paths.append(path)

    def extend(self, chunks) -> None:
        for c in chunks:
            self.append(c)

    def __iadd__(self, chunks):
        self.extend(chunks)
        return self

    def _refuse(self, *args, **kwargs):
        raise TypeError("an ActivationStore only supports appending (and close())")

    insert = pop = remove = sort = reverse = clear = __setitem__ = __delitem__ = __imul__ = _refuse

    # -- reading -------------------------------------------------------------------------------

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._slice(index)
        t = super().__getitem__(index)
        path = self._paths[index]
        return t if path is None else _map(path, tuple(t.shape), t.dtype)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __reversed__(self):
        for i in reversed(range(len(self))):
            yield self[i]

    def _slice(self, index: slice) -> "ActivationStore":
        view = ActivationStore.__new__(ActivationStore)
        list.extend(view, list.__getitem__(self, index))
        view.dtype, view.source_dtype = self.dtype, self.source_dtype
        view._budget, view._lease, view._owner = self._budget, self._lease, False
        view._paths = self._paths[index]
        return view

    def on_disk(self, index: int) -> bool:
        """Whether chunk ``index`` is spilled to disk."""
        return self._paths[index] is not None

    @property
    def nbytes(self) -> int:
        """Bytes of all chunks (RAM and disk)."""
        return sum(t.numel() * t.element_size() for t in list.__iter__(self))

    @property
    def spilled_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t, p in zip(list.__iter__(self), self._paths) if p is not None)

    @property
    def resident_bytes(self) -> int:
        return self.nbytes - self.spilled_bytes

    def clone(self) -> "ActivationStore":
        """An independent copy (a new store under the same budget: it spills as needed)."""
        out = ActivationStore(dtype=self.dtype, budget=self._budget)
        out.source_dtype = self.source_dtype
        try:
            for t in self:
                out.append(t.clone())
        except BaseException:
            out.close()
            raise
        return out

    def close(self) -> None:
        """Release the chunks now: RAM budget returned, files deleted. Slices of a closed
        store are unusable; closing a slice only drops the slice's own references."""
        lease, self._lease = self._lease, None
        list.clear(self)
        self._paths = []
        if lease is not None and self._owner:
            lease.finalizer()

    @property
    def closed(self) -> bool:
        return self._lease is None

    def __repr__(self) -> str:
        mib = 2 ** 20
        return (f"ActivationStore({len(self)} chunks, {self.resident_bytes / mib:.1f} MiB in RAM, "
                f"{self.spilled_bytes / mib:.1f} MiB on disk)")

    def __reduce_ex__(self, protocol):
        # copy/deepcopy/pickle: a new store (under the budget in force) built from the chunks.
        return _rebuild, (list(self), self.dtype, self.source_dtype)
