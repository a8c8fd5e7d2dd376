"""Resume after a kill: checkpointed shard writers and run journals give the same bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from structprune.errors import StructPruneError
from structprune.export.shards import ShardWriter


def _tensors(n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(f"model.layers.{i}.w", torch.randn(3 + i, 5, generator=g)) for i in range(n)]


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("kill_after", [0, 1, 2, 4, 6, 8])
def test_shard_writer_resumed_from_checkpoints_writes_the_same_bytes(tmp_path, kill_after):
    """Checkpoint after every tensor; 'kill' (drop the writer) after ``kill_after`` + 1 tensors,
    with one more added but not checkpointed; resume and add the rest: the folder is byte-identical
    to an uninterrupted writer's, pending tensors included (shards of 3 tensors' worth of bytes)."""
    items = _tensors()
    size = sum(t.numel() * 4 for _, t in items[:3])
    ref = ShardWriter(tmp_path / "ref", size)
    for name, t in items:
        ref.add(name, t)
        ref.checkpoint()
    ref.finalize()

    out = tmp_path / "out"
    w = ShardWriter(out, size)
    for name, t in items[:kill_after + 1]:
        w.add(name, t)
        w.checkpoint()
    if kill_after + 1 < len(items):
        w.add(*items[kill_after + 1])  # lost with the process: not checkpointed
    del w
    w = ShardWriter.resume(out, size)
    assert set(w.names) == {n for n, _ in items[:kill_after + 1]}
    for name, t in items:  # the same adds again: what survived is skipped after a check
        w.add(name, t)
        w.checkpoint()
    w.finalize()
    assert _digest(out) == _digest(tmp_path / "ref")
    assert not list(out.glob("pending-*"))


def test_shard_writer_resume_refuses_a_changed_pending_tensor(tmp_path):
    w = ShardWriter(tmp_path, "1MB")
    w.add("a", torch.zeros(4))
    w.checkpoint()
    del w
    w = ShardWriter.resume(tmp_path)
    with pytest.raises(StructPruneError, match="not the same run"):
        w.add("a", torch.zeros(5))


def test_shard_writer_resume_refuses_a_lost_checkpoint_file(tmp_path):
    w = ShardWriter(tmp_path, "1MB")
    w.add("a", torch.zeros(4))
    w.checkpoint()
    del w
    next(tmp_path.glob("pending-*")).unlink()
    with pytest.raises(StructPruneError, match="missing or unreadable"):
        ShardWriter.resume(tmp_path)


# -- run journal values -------------------------------------------------------------------------

def test_journal_values_round_trip_exactly(tmp_path):
    from dataclasses import dataclass

    from structprune.engine import LayerInputs
    from structprune.engine.activations import ActivationStore
    from structprune.engine.journal import load_value, register, save_value

    @register
    @dataclass(frozen=True)
    class Point:
        x: float
        kept: dict

    h = [torch.randn(1, 4, 3), torch.randn(1, 4, 3).to(torch.bfloat16)]
    shared = torch.arange(6.0)
    value = {"plans": [Point(0.1 + 0.2, {0: [1, 2], 3: []})], "nan": float("nan"), "inf": -float("inf"),
             "t": (shared, shared[2:]), "inputs": LayerInputs(h, [{"pos": (shared, shared), "mask": None}]),
             "store": ActivationStore([torch.ones(2)], dtype=torch.float16), "dtype": torch.bfloat16, "n": 2**40}
    save_value(tmp_path / "v.json", value)
    got = load_value(tmp_path / "v.json")
    p = got["plans"][0]
    assert isinstance(p, Point) and p.x == 0.1 + 0.2 and p.kept == {0: [1, 2], 3: []}
    assert got["nan"] != got["nan"] and got["inf"] == -float("inf") and got["n"] == 2**40
    assert torch.equal(got["t"][1], shared[2:]) and got["dtype"] is torch.bfloat16
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got["inputs"].hidden, h))
    assert got["inputs"].kwargs[0]["mask"] is None and torch.equal(got["inputs"].kwargs[0]["pos"][0], shared)
    assert got["store"].dtype is torch.float16 and torch.equal(got["store"][0], torch.ones(2, dtype=torch.float16))
    # Replacing a value leaves one tensors file.
    save_value(tmp_path / "v.json", {"t": torch.zeros(1)})
    assert len(list(tmp_path.glob("v.*.safetensors"))) == 1


def test_journal_refuses_unregistered_types_and_another_runs_journal(tmp_path):
    from structprune.engine.journal import RunJournal, save_value

    with pytest.raises(TypeError, match="cannot journal"):
        save_value(tmp_path / "x.json", object())
    RunJournal(tmp_path / "j", {"model": "a", "sparsity": 0.3})
    with pytest.raises(StructPruneError, match="different sparsity"):
        RunJournal(tmp_path / "j", {"model": "a", "sparsity": 0.4})
    assert RunJournal(tmp_path / "j", {"model": "a", "sparsity": 0.3}).resumed
    assert not RunJournal(tmp_path / "j", {"model": "a", "sparsity": 0.4}, resume=False).resumed
