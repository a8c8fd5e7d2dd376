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
    """RAM for activations when no budget is given: a quarter of the memory available now
    (cgroup-aware; 4 GiB where it cannot be read). Activations of a long calibration (ADMM's
    consensus and duals: two stores per module of every layer) outgrow a small model many times."""
    return int(0.25 * (available_memory() or 16 * 2**30))


def available_memory() -> int | None:
    """Memory available to this process now, in bytes: the smaller of the system's MemAvailable
    and the room left under a cgroup v1 memory limit (None where neither can be read)."""
    sizes = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                sizes.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:
        group = next(l.split(":", 2)[2] for l in Path("/proc/self/cgroup").read_text().splitlines()
                     if ":memory:" in l)
        base = Path("/sys/fs/cgroup/memory") / group.lstrip("/")
        limit = int((base / "memory.limit_in_bytes").read_text())
        usage = int((base / "memory.usage_in_bytes").read_text())
        if limit < 2**60:
            sizes.append(max(limit - usage, 0))
    except (OSError, ValueError, StopIteration):
        pass
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
