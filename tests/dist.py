"""Run a function on several ranks of a CPU (gloo) process group, as torchrun would, for tests.

``run_ranks(fn, tmp_path, world=2, args=...)`` spawns ``world`` processes; each joins a gloo group
through a file store in ``tmp_path`` (no port, so parallel runs never collide), runs on one torch
thread (as the suite does) and calls ``fn(rank, *args)``. Models must be saved *before*: inside a
group, transformers' ``save_pretrained`` writes on rank 0 only."""

from __future__ import annotations

import datetime
import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_SRC = os.path.join(os.path.dirname(_HERE), "src")


def _entry(rank: int, world: int, store: str, fn, args) -> None:
    for p in (_HERE, _SRC):
        if p not in sys.path:
            sys.path.insert(0, p)
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, tmp_path, world: int = 2, args: tuple = ()) -> None:
    """``fn(rank, *args)`` on each of ``world`` spawned ranks; raises if any rank fails."""
    import torch.multiprocessing as mp

    store = os.path.join(str(tmp_path), "dist-store")
    if os.path.exists(store):
        os.remove(store)
    mp.start_processes(_entry, args=(world, store, fn, args), nprocs=world, start_method="spawn")
