"""Process memory figures: peak resident memory (resettable on Linux) and peak GPU memory.

``ru_maxrss`` only ever grows over a process's life, so two measurements in one process
(dense then pruned, one phase then the next) would read the same peak. On Linux the
kernel keeps the peak as ``VmHWM`` in ``/proc/self/status`` and resets it when ``5`` is
written to ``/proc/self/clear_refs``; elsewhere we fall back to ``ru_maxrss`` and say so.
"""

from __future__ import annotations

import ctypes
import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _glibc_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:  # by its soname: find_library would run ldconfig at every import
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


_MALLOC_TRIM = _glibc_malloc_trim()


def empty_caches(device: torch.device | str = "cpu") -> None:
    """Give freed memory back between layers: the CUDA cache on a GPU, and on glibc the C heap's
    free pages (``malloc_trim(0)``, which also releases free pages inside the heap).

    Why on the CPU: glibc serves allocations below its mmap threshold (which grows to 32 MB
    as large blocks are freed) from heap arenas, and a streamed pass allocates and frees many
    per-window activations of a few MB; the holes stay resident. On the 7B shape (4 layers,
    8x512 calibration) the first profile layer peaked 1 GB higher than the live tensors
    (3.3 GB with a fixed 1 MiB mmap threshold against 4.3 GB without), and the 32-layer run
    was killed at its 6 GiB cap. Trimming once per layer costs milliseconds."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss() -> int | None:
    """Resident memory of this process now, in bytes (None where /proc is absent)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def default_ram_budget() -> int:
    """RAM for activations when no budget and no memory limit is known: a quarter of the memory
    available now (cgroup-aware; 4 GiB where it cannot be read). Activations of a long calibration
    (ADMM's consensus and duals: two stores per module of every layer) outgrow a small model many times.
    A streamed run with a known limit sizes it from that limit instead (:mod:`structprune.engine.budget`)."""
    return int(0.25 * (available_memory() or 16 * 2**30))


_CGROUP = Path("/sys/fs/cgroup")
_PROC_CGROUP = Path("/proc/self/cgroup")
_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a page-rounded 2**63


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value < _UNLIMITED else None


def _own_cgroups() -> list[tuple[str, Path, str]]:
    """``(version, folder, limit file)`` of this process's memory cgroup and of each of its
    ancestors up to the mount's root (a parent's limit binds its children too)."""
    try:
        lines = _PROC_CGROUP.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if "memory" in parts[1].split(","):  # v1: N:memory:/path
            found.append(("cgroup v1", _CGROUP / "memory", parts[2], "memory.limit_in_bytes"))
        elif parts[0] == "0" and parts[1] == "":  # v2: 0::/path (the unified hierarchy)
            root = _CGROUP if (_CGROUP / "cgroup.controllers").exists() else _CGROUP / "unified"
            found.append(("cgroup v2", root, parts[2], "memory.max"))
    out = []
    for version, root, rel, name in found:
        folder = root / rel.lstrip("/")
        while True:
            out.append((version, folder, name))
            if folder == root or root not in folder.parents:
                break
            folder = folder.parent
    return out


def cgroup_limit() -> tuple[int, str] | None:
    """``(bytes, where)``: the tightest memory limit of this process's cgroups (v1 ``memory.limit_in_bytes``
    or v2 ``memory.max``, its own group and every ancestor), or None where none is set or readable."""
    best = None
    for version, folder, name in _own_cgroups():
        value = _read_int(folder / name)
        if value is not None and (best is None or value < best[0]):
            best = (value, f"{version} {folder / name}")
    return best


def physical_memory() -> int | None:
    """MemTotal of /proc/meminfo in bytes (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory() -> int | None:
    """Memory available to this process now, in bytes: the smaller of the system's MemAvailable
    and the room left under its cgroup's memory limit (None where neither can be read)."""
    sizes = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                sizes.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    for version, folder, name in _own_cgroups():
        limit = _read_int(folder / name)
        usage = _read_int(folder / ("memory.usage_in_bytes" if version == "cgroup v1" else "memory.current"))
        if limit is not None and usage is not None:
            sizes.append(max(limit - usage, 0))
    return min(sizes) if sizes else None


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window; False where the platform cannot (then :func:`peak_rss` is cumulative)."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> tuple[int, str]:
    """``(bytes, what it is)``: the peak resident memory since the last reset (or since start)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024, "peak RSS since the last reset (VmHWM)"
    return process_peak_rss(), "peak RSS of the process (ru_maxrss, cumulative)"


def process_peak_rss() -> int:
    """Peak resident memory over the whole life of the process, in bytes (``ru_maxrss``; the kernel
    updates it lazily, so it can trail the current ``VmHWM`` by a few pages: the larger is taken)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    hwm = _status_kib("VmHWM")
    return max(rss, hwm * 1024 if hwm is not None else 0)


def reset_peak_gpu(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gpu(device: torch.device) -> int | None:
    """``torch.cuda.max_memory_allocated`` since the last reset, or None off the GPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def mib(n: int | float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"
