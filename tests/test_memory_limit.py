"""One layer resident with the default flags (issue 25): the output writer holds no tensor, its
shards are the bytes ``save_file`` writes, the memory limit is read from the container (cgroup v1
and v2) or ``--max-memory``, and the activation budget follows from it."""

from __future__ import annotations

import gc
import json
import random
import struct
import weakref

import pytest
import torch
from safetensors.torch import save_file

from structprune import memory
from structprune.checkpoint_files import safetensors_header
from structprune.engine import budget
from structprune.export.shards import ShardWriter

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.uint8, torch.float64,
          torch.int32]


def _random_tensors(seed: int, n: int):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        shape = tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 3)))
        out.append((f"model.layers.{rng.randint(0, 30)}.m{i}.weight", (torch.randn(shape) * 4).to(rng.choice(DTYPES))))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_streamed_shards_are_the_bytes_save_file_writes(tmp_path, seed):
    """Every shard equals ``safetensors.torch.save_file`` of the tensors it holds (header order by
    dtype then name, offsets, padding, metadata), for mixed dtypes, scalars and empty tensors."""
    items = _random_tensors(seed, 14)
    w = ShardWriter(tmp_path / "out", 64)
    for name, t in items:
        w.add(name, t)
    w.finalize()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    by_file: dict[str, dict] = {}
    for name, t in items:
        by_file.setdefault(index[name], {})[name] = t
    assert len(by_file) > 1
    for fname, tensors in by_file.items():
        save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
        assert (tmp_path / "out" / fname).read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), fname


def test_header_matches_safetensors_for_one_file():
    tensors = dict(_random_tensors(99, 20))
    from safetensors.torch import save

    blob = save(tensors, metadata={"format": "pt"})
    entries = [(n, t.dtype, tuple(t.shape), t.numel() * t.element_size()) for n, t in tensors.items()]
    prefix, order = safetensors_header(entries, {"format": "pt"})
    (n,) = struct.unpack("<Q", blob[:8])
    assert prefix == blob[:8 + n]
    names = list(tensors)
    assert b"".join(tensors[names[i]].reshape(-1).view(torch.uint8).numpy().tobytes() for i in order) == blob[8 + n:]


def test_the_writer_keeps_no_tensor_and_reads_pending_ones_back(tmp_path):
    """Whatever the shard size, an added tensor is on disk at once: the writer holds no reference
    to it (memory is one tensor, not one shard), and ``get`` reads the pending copy back exactly."""
    w = ShardWriter(tmp_path / "out", "2GB")
    t = torch.randn(64, 48)
    want = t.clone()
    w.add("a", t)
    ref = weakref.ref(t)
    del t
    gc.collect()
    assert ref() is None
    assert w.pending_bytes == 64 * 48 * 4 and "a" in w
    w.add("b", torch.arange(10, dtype=torch.int64))
    assert torch.equal(w.get("a"), want) and torch.equal(w.get("b"), torch.arange(10))
    assert w.get("a", dtype=torch.bfloat16).dtype == torch.bfloat16
    w.finalize()
    assert torch.equal(w.get("a"), want)


# -- the limit --------------------------------------------------------------------------------------

def _fake_cgroups(monkeypatch, tmp_path, proc: str, files: dict[str, str]):
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (tmp_path / "proc_cgroup").write_text(proc)
    monkeypatch.setattr(memory, "_CGROUP", root)
    monkeypatch.setattr(memory, "_PROC_CGROUP", tmp_path / "proc_cgroup")


def test_cgroup_v1_limit_is_the_tightest_of_the_group_and_its_ancestors(monkeypatch, tmp_path):
    _fake_cgroups(monkeypatch, tmp_path, "5:cpu:/\n4:memory:/jobs/run1\n0::/\n", {
        "memory/memory.limit_in_bytes": str(2**63 - 4096),  # no limit, as v1 writes it
        "memory/jobs/memory.limit_in_bytes": str(3 * 2**30),
        "memory/jobs/run1/memory.limit_in_bytes": str(5 * 2**30),
        "memory/jobs/run1/memory.usage_in_bytes": str(2**30),
        "memory/jobs/memory.usage_in_bytes": str(2**30),
    })
    value, where = memory.cgroup_limit()
    assert value == 3 * 2**30 and where.startswith("cgroup v1 ") and where.endswith("jobs/memory.limit_in_bytes")
    assert memory.available_memory() <= 2 * 2**30


def test_cgroup_v2_memory_max(monkeypatch, tmp_path):
    _fake_cgroups(monkeypatch, tmp_path, "0::/user.slice/job\n", {
        "cgroup.controllers": "memory",
        "memory.max": "max",
        "user.slice/memory.max": "max",
        "user.slice/job/memory.max": str(1536 * 2**20),
        "user.slice/job/memory.current": str(512 * 2**20),
    })
    assert memory.cgroup_limit() == (1536 * 2**20, f"cgroup v2 {tmp_path}/cgroup/user.slice/job/memory.max")
    assert memory.available_memory() <= 1024 * 2**20


def test_no_cgroup_limit(monkeypatch, tmp_path):
    _fake_cgroups(monkeypatch, tmp_path, "4:memory:/\n", {"memory/memory.limit_in_bytes": str(2**63 - 4096)})
    assert memory.cgroup_limit() is None
    limit, where = budget.memory_limit()
    assert where == "physical memory (MemTotal)" and limit == memory.physical_memory()
    assert budget.memory_limit(2**30) == (2**30, "--max-memory")


def test_the_activation_budget_follows_the_limit(monkeypatch, make_tiny_llama):
    """Half of what the limit leaves after the process and one layer's work; a tighter limit gives a
    smaller budget; a limit below the need is refused; a given budget is left alone."""
    from structprune.adapters import get_adapter
    from structprune.api import layer_widths
    from structprune.errors import StructPruneError

    adapter = get_adapter(make_tiny_llama())
    widths = layer_widths(adapter)
    monkeypatch.setattr(budget, "current_rss", lambda: 500 * 2**20)
    monkeypatch.setattr(budget, "cgroup_limit", lambda: None)
    big = budget.plan_memory(adapter, widths, 4, "structprune", 256, max_memory=4 * 2**30)
    small = budget.plan_memory(adapter, widths, 4, "structprune", 256, max_memory=2 * 2**30)
    for p, limit in ((big, 4 * 2**30), (small, 2 * 2**30)):
        assert p.limit == limit and p.limit_source == "--max-memory" and p.baseline_bytes == 500 * 2**20
        assert p.activation_budget == int(budget.ACTIVATION_SHARE * (limit - p.baseline_bytes - p.working_set_bytes))
    assert small.activation_budget < big.activation_budget
    sizes = big.sizes
    layer = sizes["layer_weights_bytes"] + sizes["statistics_bytes"] + sizes["solver_workspace_bytes"]
    assert big.working_set_bytes == int(budget.WORKING_SET_FACTOR * max(layer, sizes["head_bytes"]))
    with pytest.raises(StructPruneError, match=r"not enough memory for one layer: .* but may use 0\.49 GiB \(--max-memory\)"):
        budget.plan_memory(adapter, widths, 4, "structprune", 256, max_memory=500 * 2**20)
    given = budget.plan_memory(adapter, widths, 4, "structprune", 256, max_memory=2 * 2**30, budget_given=True)
    assert given.activation_budget is None and given.need_bytes == small.need_bytes - budget.MIN_ACTIVATIONS


def test_a_streamed_run_reports_its_memory_plan(tmp_path, make_tiny_llama, byte_tokenizer):
    """prune_checkpoint under --max-memory: the budget in force is the plan's, and the report says
    where the limit came from; the same run without the limit gives the same weights."""
    from structprune import PruneConfig, prune_checkpoint
    from structprune.data import get_calibration

    model = make_tiny_llama(vocab_size=257, max_position_embeddings=64)
    model.save_pretrained(tmp_path / "ckpt")
    calib = get_calibration(byte_tokenizer, "c4", nsamples=2, seqlen=32, seed=0)
    cfg = PruneConfig(method="wanda-sp", sparsity=0.3, nsamples=2, seqlen=32, mlp_multiple=1)
    r = prune_checkpoint(tmp_path / "ckpt", tmp_path / "a", calib, cfg, progress=False, max_memory="3GiB")
    plan = r.report["memory"]["plan"]
    assert plan["limit_source"] in ("--max-memory",) or plan["limit_source"].startswith("cgroup")
    assert plan["limit"] <= 3 * 2**30 and plan["activation_budget"] == r.report["memory"]["activation_budget"]
    assert r.report["config"]["activation_budget"] == plan["activation_budget"]
    r2 = prune_checkpoint(tmp_path / "ckpt", tmp_path / "b", calib, cfg, progress=False, max_shard_size="20KB")
    assert r2.report["memory"]["plan"]["limit_source"] != "--max-memory"
    from structprune import load_pruned

    a = load_pruned(tmp_path / "a")
    b = load_pruned(tmp_path / "b")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
