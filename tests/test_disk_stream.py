"""Disk streaming (issue 10): meta skeletons, layers read from safetensors one at a time,
resumable shard writing, and perplexity with one layer resident."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny import FACTORIES, calib_ids
from transformers import AutoModelForCausalLM

from structprune.adapters import LayerPlan, get_adapter
from structprune.engine.capture import capture_first_layer_inputs, run_layer
from structprune.engine.disk import DiskLayerStore, DiskStoreFactory, export_sink, module_prefixes
from structprune.engine.residency import LayerStore, is_materialized
from structprune.errors import StructPruneError
from structprune.eval.perplexity import perplexity_from_ids
from structprune.eval.streamed import streamed_perplexity
from structprune.export import shards as shards_mod
from structprune.export.shards import ShardWriter, read_back
from structprune.models.checkpoint import CheckpointReader, dematerialize, load_skeleton, materialize
from structprune.surgery import apply_layer_plan

SRC = Path(__file__).resolve().parents[1] / "src"
CASES = [("llama-gqa", "20KB"), ("qwen2", "20KB"), ("opt", "20KB"), ("llama-gqa", None)]  # None: one file


@pytest.fixture(autouse=True)
def _single_thread(one_torch_thread):
    """Tiny models on one torch thread (see conftest.one_torch_thread)."""


def _save(path: Path, family: str, shard: str | None, dtype=torch.float32) -> Path:
    model = FACTORIES[family]().to(dtype)
    model.save_pretrained(path, max_shard_size=shard or "1GB")
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(family, shard) -> folder`` of the saved tiny model (sharded, or one file)."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for family, shard in CASES:
        out[family, shard] = _save(root / f"{family}-{shard}", family, shard)
    return out


def _ref(folder, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def _stream_logits(model, adapter, factory, ids, device="cpu", batch_size=2, spy=None):
    """Boundaries (first-layer inputs, each layer's output) and logits, streamed from disk."""
    store = factory(adapter.layers(), device)
    with factory.resident(adapter.pre_layer_modules(), device):
        inputs = capture_first_layer_inputs(model, adapter, ids, device, batch_size)
    bounds = [torch.cat(inputs.hidden)]
    try:
        for i in range(len(adapter.layers())):
            layer = store.fetch(i)
            if spy is not None:
                spy(store)
            inputs = run_layer(layer, inputs, device)
            store.release(i)
            bounds.append(torch.cat(inputs.hidden))
    finally:
        store.finish()
    with factory.resident(adapter.head_modules(), device), torch.no_grad():
        x = bounds[-1]
        for m in adapter.head_modules():
            x = m(x)
    return bounds, x


def _sha256(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# -- skeleton and streaming ------------------------------------------------------------------------

@pytest.mark.parametrize("family,shard", CASES)
def test_skeleton_holds_no_tensors(saved, family, shard):
    folder = saved[family, shard]
    model, reader = load_skeleton(folder, torch.float32)
    assert not is_materialized(model)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    index = folder / "model.safetensors.index.json"
    assert index.is_file() == (shard is not None)
    if shard is not None:
        assert len(reader.files) > 3
    if family == "opt":  # tied: lm_head is read from the embeddings
        assert reader.aliases == {"lm_head.weight": "model.decoder.embed_tokens.weight"}
    else:
        assert "model.rotary_emb.inv_freq" in reader.computed


@pytest.mark.parametrize("family,shard", CASES)
def test_disk_stream_reproduces_in_memory_model(saved, family, shard):
    folder = saved[family, shard]
    ref = _ref(folder)
    model, reader = load_skeleton(folder, torch.float32)
    adapter = get_adapter(model)
    ids = calib_ids(5, 16)
    counts = []

    def spy(module, args, kwargs):
        counts.append(sum(is_materialized(layer) for layer in adapter.layers()))

    hooks = [layer.register_forward_pre_hook(spy, with_kwargs=True) for layer in adapter.layers()]
    factory = DiskStoreFactory.from_model(model, adapter, reader, torch.float32)
    bounds, logits = _stream_logits(model, adapter, factory, ids)
    for h in hooks:
        h.remove()
    assert counts and max(counts) == 1 and len(counts) == 3 * len(adapter.layers())  # 3 chunks of batch 2
    assert not is_materialized(model), "a tensor stayed materialised after the pass"
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
    for i in range(len(adapter.layers())):  # hidden_states[L] is after the final norm in some families
        assert (bounds[i] - out.hidden_states[i]).abs().max() < 1e-6, f"boundary {i}"
    assert (logits - out.logits).abs().max() < 1e-6


def test_rotary_buffers_match_from_pretrained(saved):
    folder = saved["llama-gqa", "20KB"]
    ref = _ref(folder)
    model, reader = load_skeleton(folder, torch.bfloat16)
    rotary = model.model.rotary_emb
    materialize(rotary, "model.rotary_emb.", reader, "cpu", torch.bfloat16)
    assert rotary.inv_freq.dtype == torch.float32  # as from_pretrained leaves it
    assert torch.equal(rotary.inv_freq, ref.model.rotary_emb.inv_freq)
    dematerialize(rotary)
    assert rotary.inv_freq.is_meta


def test_bf16_storage_fp32_compute(tmp_path):
    folder = _save(tmp_path / "bf16", "llama-gqa", "20KB", dtype=torch.bfloat16)
    ref = _ref(folder, torch.float32)
    model, reader = load_skeleton(folder, torch.float32)
    assert reader.stored_dtype == torch.bfloat16
    adapter = get_adapter(model)
    factory = DiskStoreFactory.from_model(model, adapter, reader, torch.float32)
    ids = calib_ids(3, 16)
    _, logits = _stream_logits(model, adapter, factory, ids, batch_size=3)
    with torch.no_grad():
        assert (logits - ref(ids).logits).abs().max() < 1e-6


def test_store_contract(saved):
    model, reader = load_skeleton(saved["qwen2", "20KB"], torch.float32)
    adapter = get_adapter(model)
    store = DiskStoreFactory.from_model(model, adapter, reader)(adapter.layers(), "cpu")
    assert isinstance(store, DiskLayerStore) and isinstance(store, LayerStore) and len(store) == 3
    layer = store.fetch(1)
    assert store.resident_layers() == [1] and layer.self_attn.q_proj.weight.device.type == "cpu"
    with pytest.raises(RuntimeError, match="still on the device"):
        store.fetch(2)
    store.finish()  # an interrupted pass: the borrowed layer is dropped
    assert store.resident_layers() == [] and not store.borrowed
    # A pruned layer (meta, smaller) must not be filled from the dense checkpoint.
    layer = store.fetch(0)
    apply_layer_plan(adapter, layer, LayerPlan([0, 1], [0], list(range(20))))
    store.release(0)
    with pytest.raises(StructPruneError, match="shape"):
        store.fetch(0)
    assert store.resident_layers() == []


# -- shard writer ----------------------------------------------------------------------------------

def _tensors(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    return [(f"t.{i:02d}.weight", torch.randn(7 + i, 9, generator=g).to(dtypes[i % 3])) for i in range(n)]


def _write_all(folder, tensors, size=600, writer=None):
    w = writer if writer is not None else ShardWriter(folder, size)
    for name, t in tensors:
        w.add(name, t)
    w.finalize()
    return w


def test_shard_writer_output_loads_with_from_pretrained(saved, tmp_path):
    src = saved["opt", "20KB"]
    reader = CheckpointReader(src)
    out = tmp_path / "out"
    w = ShardWriter(out, "30KB")
    for name in reader.keys():
        w.add(name, reader.get(name))
    assert w.pending_bytes <= 30_000
    w.finalize()
    (out / "config.json").write_bytes((src / "config.json").read_bytes())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == reader.nbytes()
    assert not (out / "shards.json").exists() and sorted(out.iterdir()) == sorted(
        [out / f for f in files] + [out / "model.safetensors.index.json", out / "config.json"])
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = _ref(src)
    ref_sd, got_sd = ref.state_dict(), loaded.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    assert all(torch.equal(ref_sd[k], got_sd[k]) for k in ref_sd)
    # The same inputs give the same bytes.
    again = _write_all(tmp_path / "again", [(n, reader.get(n)) for n in reader.keys()], "30KB")
    (again.folder / "config.json").write_bytes((src / "config.json").read_bytes())
    assert _sha256(out) == _sha256(again.folder)
    assert torch.equal(read_back(out, "model.decoder.layers.1.fc1.weight"), ref_sd["model.decoder.layers.1.fc1.weight"])


@pytest.mark.parametrize("state", ["journaled", "unjournaled-part", "temp-file"])
@pytest.mark.parametrize("k", [1, 3])
def test_resume_after_kill_is_byte_identical(tmp_path, state, k):
    tensors = _tensors()
    clean = _write_all(tmp_path / "clean", tensors).folder
    folder = tmp_path / "killed"
    w = ShardWriter(folder, 600)
    i = 0
    while len(w.shards) < k:
        w.add(*tensors[i])
        i += 1
    # The process dies here: pending tensors are lost; maybe a later shard reached the disk
    # without its journal entry, or only its temp file did.
    nxt = folder / f"model-part-{k + 1:05d}.safetensors"
    if state == "unjournaled-part":
        nxt.write_bytes(b"half a shard")
    elif state == "temp-file":
        nxt.with_name(nxt.name + ".tmp").write_bytes(b"garbage")
    del w
    with pytest.raises(StructPruneError, match="resume"):
        ShardWriter(folder, 600)
    w = ShardWriter.resume(folder)
    assert len(w.shards) == k and not nxt.exists()
    first_done = w.shards[0]["tensors"][0][0]
    assert first_done in w and torch.equal(w.get(first_done), tensors[0][1])
    assert torch.equal(read_back(folder, first_done), tensors[0][1])  # journaled shards read back
    _write_all(folder, tensors, writer=w)  # replay every add: names on disk are skipped
    assert _sha256(folder) == _sha256(clean)
    assert ShardWriter.resume(folder).finalized  # resuming a finished folder is a no-op


def test_resume_during_finalize(tmp_path, monkeypatch):
    tensors = _tensors()
    clean = _write_all(tmp_path / "clean", tensors).folder
    folder = tmp_path / "killed"
    w = ShardWriter(folder, 600)
    for t in tensors:
        w.add(*t)
    real, calls = os.replace, []

    def dying_replace(a, b):
        if "-of-" in Path(b).name:
            calls.append(b)
            if len(calls) == 2:
                raise KeyboardInterrupt("killed while renaming")
        real(a, b)

    monkeypatch.setattr(shards_mod.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        w.finalize()
    monkeypatch.setattr(shards_mod.os, "replace", real)
    w = ShardWriter.resume(folder)  # completes the renames and the index
    assert w.finalized
    _write_all(folder, tensors, writer=w)
    assert _sha256(folder) == _sha256(clean)


def test_resume_after_sigkill(tmp_path):
    """A real SIGKILL between a shard's os.replace and its journal entry."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(SRC)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_disk_stream import _tensors
        from structprune.export.shards import ShardWriter
        real = ShardWriter._write_journal
        def journal(self):
            if len(self.shards) == 3 and self._total is None:
                os.kill(os.getpid(), signal.SIGKILL)
            real(self)
        ShardWriter._write_journal = journal
        w = ShardWriter(sys.argv[1], 600)
        for name, t in _tensors():
            w.add(name, t)
        w.finalize()
    """)
    folder = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (folder / "model-part-00003.safetensors").is_file()  # written, not journaled
    w = ShardWriter.resume(folder)
    assert len(w.shards) == 2
    _write_all(folder, _tensors(), writer=w)
    assert _sha256(folder) == _sha256(_write_all(tmp_path / "clean", _tensors()).folder)


def test_writer_refuses_duplicates_and_changed_runs(tmp_path):
    w = ShardWriter(tmp_path / "w", 600)
    name, t = _tensors(1)[0]
    w.add(name, t)
    with pytest.raises(StructPruneError, match="twice"):
        w.add(name, t)
    for n, x in _tensors()[1:]:
        w.add(n, x)
    w = ShardWriter.resume(tmp_path / "w")
    with pytest.raises(StructPruneError, match="not the same run"):
        w.add(name, t[:3])
    with pytest.raises(StructPruneError, match="max_shard_size"):
        ShardWriter.resume(tmp_path / "w", 2000)


# -- errors ----------------------------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _shard(folder: Path) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / sorted(set(index["weight_map"].values()))[1]


def test_missing_shard_is_named(saved, tmp_path):
    folder = _copy(saved["llama-gqa", "20KB"], tmp_path / "m")
    shard = _shard(folder)
    shard.unlink()
    with pytest.raises(StructPruneError, match=f"{shard.name}.*missing"):
        CheckpointReader(folder)


@pytest.mark.parametrize("damage", ["truncate", "corrupt-header"])
@pytest.mark.parametrize("shard", ["20KB", None])
def test_damaged_shard_is_named(saved, tmp_path, damage, shard):
    folder = _copy(saved["llama-gqa", shard], tmp_path / "d")
    path = _shard(folder) if shard else folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100] if damage == "truncate" else b"\xff" * 16 + data[16:])
    with pytest.raises(StructPruneError, match=f"{path.name} is truncated or corrupt"):
        load_skeleton(folder)


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../x.safetensors"])
def test_index_escaping_the_folder_is_refused(saved, tmp_path, bad):
    folder = _copy(saved["qwen2", "20KB"], tmp_path / "e")
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(_shard(folder).read_bytes())
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = sorted(index["weight_map"])[0]
    index["weight_map"][name] = bad
    index_path.write_text(json.dumps(index))
    with pytest.raises(StructPruneError, match="outside the folder") as err:
        CheckpointReader(folder)
    assert bad in str(err.value)


def test_missing_tensor_is_reported(saved, tmp_path):
    folder = _copy(saved["llama-gqa", "20KB"], tmp_path / "t")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(StructPruneError, match="lack 1 tensor.*model.layers.2.mlp.up_proj.weight"):
        load_skeleton(folder)


# -- perplexity ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,shard", CASES[:3])
def test_streamed_perplexity_equals_in_memory(saved, family, shard):
    folder = saved[family, shard]
    ids = calib_ids(7, 16, seed=3).reshape(-1)
    expected = perplexity_from_ids(_ref(folder), ids, 16, limit=6, batch_size=2, progress=False)
    model, reader = load_skeleton(folder)
    adapter = get_adapter(model)
    hidden = model.config.hidden_size
    # A budget of two windows per group: three groups, every layer read three times.
    got, nlls = streamed_perplexity(model, reader, adapter, ids, 16, limit=6, batch_size=2, progress=False,
                                    ram_budget=2 * 2 * 16 * hidden * 4)
    assert (got.nwindows, got.ntokens, got.seqlen) == (expected.nwindows, expected.ntokens, expected.seqlen)
    assert got.ppl == pytest.approx(expected.ppl, rel=1e-5)
    assert len(nlls) == 6 and sum(nlls) / 6 == pytest.approx(torch.tensor(expected.ppl).log().item(), rel=1e-5)
    assert not is_materialized(model)
    # "inf" (the CLI's "no limit") sizes the groups as no budget does, and scores the same.
    inf, _ = streamed_perplexity(model, reader, adapter, ids, 16, limit=6, batch_size=2, progress=False,
                                 ram_budget="inf")
    assert inf.ppl == pytest.approx(expected.ppl, rel=1e-5)


def test_prune_from_disk_write_shards_and_evaluate(saved, tmp_path):
    """The pipeline the streamed pruning run follows: fetch a layer from the checkpoint, cut it,
    write it out on release, and later passes (here: evaluation) read the pruned layer back."""
    folder = saved["llama-gqa", "20KB"]
    plans = [LayerPlan([0, 1, 3, 4], [0, 1], list(range(0, 37, 2))), LayerPlan([2, 5], [0, 1], list(range(20))),
             LayerPlan([0, 1, 2], [0], list(range(5, 35)))]
    model, reader = load_skeleton(folder)
    adapter = get_adapter(model)
    writer = ShardWriter(tmp_path / "pruned", "20KB")
    prefixes = module_prefixes(model, adapter.layers())
    factory = DiskStoreFactory.from_model(model, adapter, reader)
    factory.on_release = export_sink(writer, prefixes, factory)
    store = factory(adapter.layers(), "cpu")
    for i, plan in enumerate(plans):
        apply_layer_plan(adapter, store.fetch(i), plan)
        store.release(i)  # written to the shards, then read back from there
        assert not is_materialized(model)
    for m in (*adapter.pre_layer_modules(), *adapter.head_modules()):
        with factory.resident([m], "cpu"):
            writer.add_module(module_prefixes(model, [m])[0], m)
    writer.finalize()
    factory.on_release = None  # the final pass is over: later passes only read

    ids = calib_ids(4, 16, seed=5).reshape(-1)
    got, _ = streamed_perplexity(model, factory, adapter, ids, 16, batch_size=2, progress=False)
    ref = _ref(folder)
    ref_adapter = get_adapter(ref)
    for layer, plan in zip(ref_adapter.layers(), plans):
        apply_layer_plan(ref_adapter, layer, plan)
    expected = perplexity_from_ids(ref, ids, 16, batch_size=2, progress=False)
    assert got.ppl == pytest.approx(expected.ppl, rel=1e-5)
    # The same function on the in-memory model through a plain LayerStore.
    plain, _ = streamed_perplexity(ref, LayerStore(ref_adapter.layers(), "cpu"), ref_adapter, ids, 16,
                                   batch_size=2, progress=False)
    assert plain.ppl == pytest.approx(expected.ppl, rel=1e-5)
    sd = ref.state_dict()
    for name in writer.names:
        assert torch.equal(read_back(writer.folder, name), sd[name]), name


def test_skeleton_of_a_per_layer_export(tmp_path):
    """A pruned export with per-layer widths (packaged modeling code) streams like any checkpoint."""
    from structprune.export import load_pruned, save_pruned

    model = FACTORIES["llama-gqa"]()
    adapter = get_adapter(model)
    for layer, plan in zip(adapter.layers(), [LayerPlan([0, 1, 2], [0], list(range(10))),
                                              LayerPlan([3, 4], [1], list(range(20))),
                                              LayerPlan([0, 1, 2, 3, 4, 5], [0, 1], list(range(30)))]):
        apply_layer_plan(adapter, layer, plan)
    save_pruned(model, None, tmp_path / "export", max_shard_size="10KB")
    ids = calib_ids(4, 16).reshape(-1)
    expected = perplexity_from_ids(load_pruned(tmp_path / "export"), ids, 16, progress=False)
    skeleton, reader = load_skeleton(tmp_path / "export")
    assert type(skeleton).__name__.startswith("StructPrune") and not is_materialized(skeleton)
    got, _ = streamed_perplexity(skeleton, reader, None, ids, 16, progress=False)
    assert got.ppl == pytest.approx(expected.ppl, rel=1e-5)


def test_streamed_perplexity_budget_follows_the_activation_budget(saved, monkeypatch):
    """Without ``ram_budget`` the evaluation sizes its groups of windows by the activation budget in
    force (here ``$STRUCTPRUNE_ACTIVATION_BUDGET`` of two windows), not a fixed 2 GiB: three groups,
    so every layer is read three times, and the same perplexity."""
    from structprune.engine.disk import DiskLayerStore
    from structprune.eval.streamed import eval_ram_budget

    folder = saved["llama-gqa", "20KB"]
    ids = calib_ids(7, 16, seed=3).reshape(-1)
    model, reader = load_skeleton(folder)
    hidden = model.config.hidden_size
    ref, _ = streamed_perplexity(model, reader, None, ids, 16, limit=6, batch_size=2, progress=False)
    fetches = []
    orig = DiskLayerStore.fetch
    monkeypatch.setattr(DiskLayerStore, "fetch", lambda self, i: fetches.append(i) or orig(self, i))
    monkeypatch.setenv("STRUCTPRUNE_ACTIVATION_BUDGET", str(2 * 2 * 16 * hidden * 4))
    assert eval_ram_budget() == 2 * 2 * 16 * hidden * 4
    got, _ = streamed_perplexity(model, reader, None, ids, 16, limit=6, batch_size=2, progress=False)
    assert fetches.count(0) == 3 and got.ppl == pytest.approx(ref.ppl, rel=1e-6)
    monkeypatch.delenv("STRUCTPRUNE_ACTIVATION_BUDGET")
    assert eval_ram_budget() > 2 * 2 * 16 * hidden * 4  # a quarter of the available memory
