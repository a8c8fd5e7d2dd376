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
    assert not list(out.glob("*.data"))


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
    next(tmp_path.glob("model-part-*.data")).unlink()
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


# -- a killed streamed run continues and writes the same bytes ------------------------------------

class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing catches it and no cleanup of the output runs
    (``atomic=False``); the subprocess test below kills for real."""


def _run_files(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        # report.json: timings; README.md (the model card) names its folder, and these runs' folders differ
        if p.is_file() and rel.parts[0] != ".resume" and p.name not in ("report.json", "README.md"):
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _stable_report(folder: Path) -> dict:
    """report.json without what measures this process rather than the model (time, memory)."""
    import json

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k != "seconds" and not k.endswith("_seconds")}
        return [strip(v) for v in obj] if isinstance(obj, list) else obj

    r = json.loads((folder / "report.json").read_text())
    for k in ("timings", "peak_rss_bytes", "peak_rss_kind", "peak_gpu_mem_bytes", "memory", "layer_reads"):
        r.pop(k, None)
    r["config"].pop("activation_budget")  # by default a quarter of the memory available at the start
    return strip(r)


KILL_CASES = [("structprune", {"iterations": 2}, 2), ("obs-local", {}, 1), ("magnitude-sp", {}, 1), ("flap", {}, 2)]


@pytest.mark.parametrize("method,extra,every", KILL_CASES, ids=[c[0] for c in KILL_CASES])
def test_killed_streamed_run_resumes_to_the_same_bytes(tmp_path, monkeypatch, method, extra, every):
    """Kill at every ``every``-th layer fetch of the run (inside the sensitivity sweeps, the profile,
    each ADMM pass, the scoring and cutting passes), then during the final save; ``resume=True`` continues from the journal and the output
    folder is byte-identical to an uninterrupted run's, with the same report but for timings."""
    from tiny import calib_ids, tiny_llama

    from structprune import PruneConfig
    from structprune.api import prune_checkpoint
    from structprune.engine import disk
    from structprune.export import shards

    monkeypatch.setenv("STRUCTPRUNE_CHECKPOINT_SECONDS", "0")
    torch.set_num_threads(1)
    folder = tmp_path / "dense"
    tiny_llama(layers=3).save_pretrained(folder, max_shard_size="8KB")
    cfg = PruneConfig(method=method, sparsity=0.4, nsamples=4, seqlen=16, mlp_multiple=1, **extra)
    calib = calib_ids(4, 16)

    def run(out, resume=False):
        return prune_checkpoint(folder, out, calib, cfg, device="cpu", progress=False, atomic=False,
                                max_shard_size="6KB", resume=resume, overwrite=True)

    ref = tmp_path / "ref"
    fetch, finalize = disk.DiskLayerStore.fetch, shards.ShardWriter.finalize
    fetches = []
    monkeypatch.setattr(disk.DiskLayerStore, "fetch", lambda self, i: fetches.append(i) or fetch(self, i))
    run(ref)
    monkeypatch.setattr(disk.DiskLayerStore, "fetch", fetch)
    assert len(fetches) >= 3
    for n in [*range(1, len(fetches) + 1, every), "save"]:
        out = tmp_path / f"out-{n}"
        count = [0]

        def killing_fetch(self, i):
            count[0] += 1
            if count[0] == n:
                raise Killed
            return fetch(self, i)

        def killing_finalize(self):
            if self.folder == out:
                raise Killed
            return finalize(self)

        if n == "save":
            monkeypatch.setattr(shards.ShardWriter, "finalize", killing_finalize)
        else:
            monkeypatch.setattr(disk.DiskLayerStore, "fetch", killing_fetch)
        with pytest.raises(Killed):
            run(out)
        monkeypatch.setattr(disk.DiskLayerStore, "fetch", fetch)
        monkeypatch.setattr(shards.ShardWriter, "finalize", finalize)
        assert (out / ".resume" / "run.json").is_file()
        result = run(out, resume=True)
        assert result.report["timings"]["resumed"] is True
        assert _run_files(out) == _run_files(ref), n
        assert _stable_report(out) == _stable_report(ref), n


def test_resume_refuses_another_run(tmp_path, monkeypatch):
    from tiny import calib_ids, tiny_llama

    from structprune import PruneConfig
    from structprune.api import prune_checkpoint
    from structprune.engine import disk

    folder = tmp_path / "dense"
    tiny_llama(layers=3).save_pretrained(folder)
    calib = calib_ids(4, 16)
    cfg = PruneConfig(method="obs-local", sparsity=0.4, nsamples=4, seqlen=16, mlp_multiple=1)
    fetch = disk.DiskLayerStore.fetch
    monkeypatch.setattr(disk.DiskLayerStore, "fetch", lambda self, i: (_ for _ in ()).throw(Killed) if i == 2
                        else fetch(self, i))
    with pytest.raises(Killed):
        prune_checkpoint(folder, tmp_path / "out", calib, cfg, device="cpu", progress=False, atomic=False)
    monkeypatch.setattr(disk.DiskLayerStore, "fetch", fetch)
    with pytest.raises(StructPruneError, match="different config"):
        prune_checkpoint(folder, tmp_path / "out", calib, PruneConfig(method="obs-local", sparsity=0.3, nsamples=4,
                         seqlen=16, mlp_multiple=1), device="cpu", progress=False, atomic=False, resume=True)
