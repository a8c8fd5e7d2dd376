"""Several processes, one pruning job: the process group and every collective StructPrune uses.

A run is distributed when ``torchrun`` (or any launcher) started it with ``WORLD_SIZE > 1``, or
when the caller already initialised torch.distributed's default group (Ray Train, Accelerate, a
user's own script). Nothing else changes: no flag, and a one-process run never imports a
backend or calls a collective (every helper here is the identity at world size 1).

The split is data parallel over calibration *chunks* (``batch_size`` windows): chunk ``c`` is
rank ``c mod R``'s, so every chunk holds the same windows, goes through the same kernels and
gives the same per-chunk bits as in one process. What is a sum over tokens is reduced in float64
(exact for per-chunk float32 products in practice, so the rank split and the order do not
matter; docs/distributed.md); scalar sums are gathered per chunk and added with ``math.fsum``
(correctly rounded, hence order-free). Every rank then holds bit-identical statistics and runs
the same deterministic solver on them, so decisions agree; :func:`check_same` verifies that after
every layer (a heterogeneous cluster whose kernels round differently is refused with one line,
never left to deadlock or drift).

Collectives time out after ``$STRUCTPRUNE_DIST_TIMEOUT`` seconds (default 1800): a rank that
died or hangs ends the job with one line (:class:`RankFailure`) instead of a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
import pickle
import socket
import time

import torch

from ..errors import RankFailure, StructPruneError

ENV_TIMEOUT = "STRUCTPRUNE_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0  # seconds; owner-free solves of big layers run while the others wait


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """Whether this process is one rank of a group of more than one."""
    if not torch.distributed.is_available():
        return False
    dist = _dist()
    return dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return _dist().get_world_size() if is_distributed() else 1


def rank() -> int:
    return _dist().get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0 (or a one-process run): the rank that prints, writes and reports."""
    return rank() == 0


def local_world_size() -> int:
    """Ranks on this machine (torchrun's ``LOCAL_WORLD_SIZE``; 1 when unknown)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if is_distributed() else 1


def timeout_seconds() -> float:
    text = os.environ.get(ENV_TIMEOUT, str(DEFAULT_TIMEOUT))
    try:
        value = float(text)
    except ValueError:
        raise StructPruneError(f"${ENV_TIMEOUT} must be a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise StructPruneError(f"${ENV_TIMEOUT} must be a positive number of seconds, got {text!r}")
    return value


def backend_for(device) -> str:
    """gloo for CPU tensors, NCCL for CUDA ones (one group serving both on a GPU machine)."""
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


def setup(device=None) -> bool:
    """Join the job's process group if this is a distributed run; returns whether it is.

    An initialised default group is used as it is. Otherwise ``WORLD_SIZE > 1`` in the environment
    (torchrun) initialises one from ``env://`` with the backend for ``device`` and the collective
    timeout. A one-process run returns False and touches nothing."""
    if not torch.distributed.is_available():
        return False
    dist = _dist()
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return False
        if device is None:
            device = default_device()
        if torch.device(device).type == "cuda":  # NCCL's object collectives use the current device
            torch.cuda.set_device(torch.device(device) if torch.device(device).index is not None
                                  else default_device())
        timeout = datetime.timedelta(seconds=timeout_seconds())
        store, rank_, world = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun's agent keeps one store across restarts: without a prefix per attempt, a restarted
        # rank could read a dead rank's address from the previous attempt (gloo then fails with
        # "connectFullMesh ... Connection refused", seen in about half of the restarts here).
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or "0"
        dist.init_process_group(backend=backend_for(device), store=dist.PrefixStore(f"structprune/{attempt}", store),
                                rank=rank_, world_size=world, timeout=timeout)
    if dist.get_world_size() <= 1:
        return False
    global _PEERS
    # Where every rank runs, so that a rank whose peer vanished can say which one (its process is gone).
    _PEERS = gather_objects((socket.gethostname(), os.getpid()))
    return True


_PEERS: list | None = None  # (host, pid) of every rank, from setup()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` (on this machine) still runs: not gone, not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True


def _dead_ranks() -> list[int]:
    """Ranks on this machine whose process is gone (the others cannot be checked from here)."""
    if not _PEERS:
        return []
    host = socket.gethostname()
    return [r for r, (h, pid) in enumerate(_PEERS) if h == host and r != rank() and not _alive(pid)]


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` where CUDA is, else the CPU: each rank of a node its own GPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _collective(fn, what: str):
    """Run one collective; a peer's death or a timeout becomes one :class:`RankFailure` line."""
    try:
        return fn()
    except (RuntimeError, ConnectionError) as e:
        cause = " ".join(str(e).split())[:160]
        dead = _dead_ranks()
        for _ in range(30):  # a killed peer's sockets close while it is still exiting: give it 3 s to be gone
            if dead or not _PEERS:
                break
            time.sleep(0.1)
            dead = _dead_ranks()
        who = (f"rank {', '.join(map(str, dead))} died (its process is gone: killed, out of memory or crashed)"
               if dead else "another rank died or stopped responding (on another machine, or hung)")
        raise RankFailure(f"rank {rank()} of {world_size()}: {what} failed: {who} [{cause}]; the partial output "
                          "is kept: torchrun --max-restarts continues it, or rerun the same command with "
                          "--resume") from None


def restarted() -> bool:
    """Whether torchrun restarted this job after a failure (``--max-restarts``): it then continues the
    interrupted run from its journal, as ``--resume`` would."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) >= 1


@contextlib.contextmanager
def main_only(context):
    """Enter ``context`` on rank 0 only (an output folder it alone creates, moves or removes) and
    yield what it gives on every rank; if entering it was refused (a StructPruneError), every rank
    raises the same line."""
    if not is_distributed():
        with context as got:
            yield got
        return
    with contextlib.ExitStack() as stack:
        got = agree(lambda: stack.enter_context(context) if is_main() else None)
        yield broadcast(got)


# -- chunks ---------------------------------------------------------------------------------------

def chunk_count(nwindows: int, batch_size: int) -> int:
    return -(-nwindows // batch_size)


def my_chunks(nchunks: int) -> range:
    """The global indices of this rank's chunks: ``rank, rank + R, ...``."""
    return range(rank(), nchunks, world_size())


def window_indices(nwindows: int, batch_size: int) -> list[int]:
    """The global window indices of this rank's chunks, in order."""
    return [w for c in my_chunks(chunk_count(nwindows, batch_size))
            for w in range(c * batch_size, min((c + 1) * batch_size, nwindows))]


def local_windows(calib: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This rank's calibration windows (its chunks', in order): chunked by ``batch_size`` again they
    are exactly the single-process run's chunks it owns. The whole tensor at world size 1."""
    if not is_distributed():
        return calib
    return calib[window_indices(int(calib.shape[0]), batch_size)]


def check_chunks(nwindows: int, batch_size: int) -> None:
    """Refuse a calibration with fewer chunks than ranks (a rank would have nothing to sum)."""
    n = chunk_count(nwindows, batch_size)
    if is_distributed() and n < world_size():
        raise StructPruneError(f"{nwindows} calibration windows in chunks of {batch_size} make {n} chunks, fewer "
                               f"than the {world_size()} ranks: use more windows (--nsamples), a smaller batch "
                               "size, or fewer ranks")


# -- reductions -----------------------------------------------------------------------------------

def sum_tensors(tensors: list[torch.Tensor]) -> None:
    """Sum float64 ``tensors`` over the ranks, in place, in one collective (never one per tensor)."""
    if not is_distributed() or not tensors:
        return
    for t in tensors:
        if t.dtype != torch.float64:
            raise TypeError("sum_tensors reduces float64 accumulators only (exact sums)")
    if len(tensors) == 1 and tensors[0].is_contiguous():  # a Gram: reduced where it is, no copy
        _collective(lambda: _dist().all_reduce(tensors[0]), "a sum of statistics")
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    _collective(lambda: _dist().all_reduce(flat), "a sum of statistics")
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` at world size 1)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    _collective(lambda: _dist().all_gather_object(out, obj), "a gather")
    return out


def fsum_parts(parts: list[float]) -> float:
    """The correctly rounded sum of every rank's per-chunk ``parts`` (the same bits whatever the split)."""
    return math.fsum(p for ps in gather_objects(list(parts)) for p in ps)


def gather_rows(local: torch.Tensor, indices: list[int], total: int) -> torch.Tensor:
    """The ``[total, ...]`` tensor whose rows ``indices`` each rank holds in ``local``: every rank's
    rows placed in global order (``local`` itself at world size 1)."""
    if not is_distributed():
        return local
    out = local.new_zeros((total, *local.shape[1:]))
    for rows, idx in gather_objects((local.cpu(), list(indices))):
        if idx:
            out[torch.tensor(idx)] = rows.to(out.device)
    return out


def broadcast(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    _collective(lambda: _dist().broadcast_object_list(box, src=src), "a broadcast")
    return box[0]


def barrier() -> None:
    if is_distributed():
        _collective(lambda: _dist().barrier(), "a barrier")


def agree(fn):
    """``fn()`` on every rank; if it raised a StructPruneError on any, all ranks raise the lowest
    rank's (the same line everywhere, so a bad input is refused identically before any work)."""
    err = None
    try:
        value = fn()
    except RankFailure:
        raise  # the others learn of it from their own failed collective
    except StructPruneError as e:
        err, value = e, None
    if not is_distributed():
        if err is not None:
            raise err
        return value
    errors = gather_objects(None if err is None else (type(err).__name__, str(err)))
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        if err is not None:
            raise err
        raise StructPruneError(first[1])
    return value


# -- consistency ----------------------------------------------------------------------------------

def tensor_digest(tensors) -> str:
    """SHA-256 of tensors' names, dtypes, shapes and bytes (``(name, tensor)`` pairs)."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(pickle.dumps((name, str(t.dtype), tuple(t.shape))))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


SAME_JOB = "every rank must see the same checkpoint, calibration and options on the same kind of device"


def check_same(value, what: str, fix: str = SAME_JOB) -> None:
    """Refuse, on every rank with the same line, a ``value`` (a hash, a plan) that differs between
    ranks: they would not be running the same job. ``fix``: what to do about it."""
    if not is_distributed():
        return
    values = gather_objects(value)
    odd = [r for r, v in enumerate(values) if v != values[0]]
    if odd:
        raise StructPruneError(f"ranks disagree on {what} (rank {odd[0]} differs from rank 0): {fix}")


__all__ = ["RankFailure", "agree", "backend_for", "barrier", "broadcast", "check_chunks", "check_same",
           "chunk_count", "default_device", "fsum_parts", "gather_objects", "gather_rows", "is_distributed",
           "is_main", "local_windows", "local_world_size", "main_only", "my_chunks", "rank", "restarted", "setup", "sum_tensors",
           "tensor_digest", "timeout_seconds", "window_indices", "world_size"]
