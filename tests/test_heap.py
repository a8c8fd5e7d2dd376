"""Freed memory goes back to the OS between layers (memory.empty_caches, called at every layer
release): on glibc, holes left in the C heap by freed activations stay resident otherwise."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import structprune
from structprune import memory

_HOLES = textwrap.dedent('''
    import torch
    from structprune.memory import current_rss, empty_caches
    torch.set_num_threads(1)
    x = torch.ones(4 << 20)  # 16 MB, mmapped: freeing it raises glibc's mmap threshold to 16 MB
    del x
    blocks = [torch.ones(512 << 10) for _ in range(200)]  # 2 MB each, now from the heap
    before = current_rss()
    del blocks[::2]  # every other one: holes between live blocks, which free() keeps resident
    freed = current_rss()
    empty_caches("cpu")
    print(before, freed, current_rss())
''')


@pytest.mark.skipif(memory._MALLOC_TRIM is None or memory.current_rss() is None
                    or any(a in os.environ.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc", "mimalloc")),
                    reason="needs glibc's malloc (malloc_trim) and /proc")
def test_empty_caches_returns_the_heap_holes_freed_tensors_leave():
    src = str(Path(structprune.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", _HOLES], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    before, freed, after = map(int, out.stdout.split())
    holes = 100 * (2 << 20)
    assert before - freed < holes / 4  # free() alone gave (almost) nothing back: the holes are resident
    assert freed - after > 0.8 * holes  # empty_caches returned them


def test_layer_release_empties_the_caches(monkeypatch):
    """The in-memory layer stores call it when a layer is given back (the disk store's release
    does too; it is exercised by every streamed test)."""
    import torch

    from structprune.engine import residency

    calls = []
    monkeypatch.setattr(residency, "empty_caches", lambda device: calls.append(("memory", str(device))))
    layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    for kind in (residency.LayerStore, residency.SwapLayerStore):
        store = kind(layers, "cpu")
        store.fetch(0)
        store.release(0)
        store.finish()
    assert calls == [("memory", "cpu")] * 2
