"""Activation stores: exact round trips in RAM and on disk, the RAM budget, file clean-up,
and streaming, sensitivities and a whole StructPrune run identical with everything spilled."""

import gc
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import FACTORIES, calib_ids, tiny_llama

from structprune import api
from structprune.adapters import get_adapter
from structprune.config import PruneConfig
from structprune.engine import LayerInputs, LayerStream, capture_first_layer_inputs, run_layer
from structprune.engine import activations
from structprune.engine.activations import ActivationBudget, ActivationStore, activation_budget, current_budget, parse_size
from structprune.engine.sensitivity import boundaries_alive, checkpoint_interval, fitting_interval, module_sensitivities


@pytest.fixture(autouse=True)
def _single_thread(one_torch_thread):
    """Tiny models on one torch thread (see conftest.one_torch_thread)."""


def _chunks(dtype, n=4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 5, 7, generator=g) * 100).to(dtype) for _ in range(n)]


def _files(budget):
    return sorted(os.listdir(budget.folder)) if budget.folder and os.path.isdir(budget.folder) else []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("limit", [float("inf"), 0])
def test_round_trip_is_exact(dtype, limit, tmp_path):
    chunks = _chunks(dtype)
    with activation_budget(limit, tmp_path):
        store = ActivationStore()
        for c in chunks:
            store.append(c)
        assert len(store) == 4
        assert all(store.on_disk(i) == (limit == 0) for i in range(4))
        assert [torch.equal(a, b) and a.dtype == dtype for a, b in zip(store, chunks)] == [True] * 4
        assert torch.equal(store[-1], chunks[-1]) and torch.equal(store[1], chunks[1])
        assert torch.equal(torch.cat(store), torch.cat(chunks))  # C-level readers see the same chunks
        part = store[1:3]
        assert isinstance(part, ActivationStore) and len(part) == 2 and torch.equal(part[0], chunks[1])
        assert torch.equal(store.clone()[2], chunks[2])
        assert store.spilled_bytes == (store.nbytes if limit == 0 else 0)
        store[0].add_(1)  # a reader's in-place change never reaches a spilled chunk's file
        if limit == 0:
            assert torch.equal(store[0], chunks[0])


def test_storage_dtype_and_cast_back(tmp_path):
    chunks = _chunks(torch.float32)
    with activation_budget(0, tmp_path):
        store = ActivationStore(chunks, dtype=torch.bfloat16)
        assert store.dtype == store[0].dtype == torch.bfloat16 and store.source_dtype == torch.float32
        assert torch.equal(store[3], chunks[3].bfloat16())
        assert store.nbytes == sum(c.numel() * 2 for c in chunks)


def test_ram_budget_is_shared_and_respected(tmp_path):
    chunk = _chunks(torch.float32, 1)[0]
    size = chunk.numel() * chunk.element_size()
    with activation_budget(int(2.5 * size), tmp_path) as budget:
        a = ActivationStore(c.clone() for c in _chunks(torch.float32, 3))
        assert [a.on_disk(i) for i in range(3)] == [False, False, True]
        b = ActivationStore(_chunks(torch.float32, 2))  # the budget is process-wide: b spills
        assert [b.on_disk(i) for i in range(2)] == [True, True]
        assert budget.resident == 2 * size <= budget.limit and budget.peak_resident <= budget.limit
        assert budget.spilled == 3 * size and budget.stores == 2
        a.close()
        assert budget.resident == 0 and budget.spilled == 2 * size and budget.stores == 1
        c = ActivationStore(_chunks(torch.float32, 1))  # freed RAM is reused
        assert not c.on_disk(0)
        del b, c


def test_files_removed_on_close_and_garbage_collection(tmp_path):
    with activation_budget(0, tmp_path) as budget:
        a = ActivationStore(_chunks(torch.float32))
        b = ActivationStore(_chunks(torch.float16))
        assert len(_files(budget)) == 8
        a.close()
        assert len(_files(budget)) == 4 and a.closed and len(a) == 0
        view = b[:2]
        del b
        gc.collect()
        assert len(_files(budget)) == 4  # the slice keeps the chunks alive
        assert torch.equal(view[1], _chunks(torch.float16)[1])
        del view
        gc.collect()
        assert _files(budget) == [] and budget.spilled == 0 and budget.stores == 0
        with pytest.raises(ValueError):
            a.append(torch.zeros(1))
        with pytest.raises(TypeError):
            ActivationStore()[0:0].pop()
    assert budget.folder is None and os.listdir(tmp_path) == []  # the scratch folder went with the block


def test_files_removed_when_a_layer_fails(tmp_path):
    model = tiny_llama(layers=2)
    adapter = get_adapter(model)
    ids = calib_ids(4, 16)

    class Boom(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer, self.calls = layer, 0

        def forward(self, h, **kw):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("boom")
            return self.layer(h, **kw)

    with activation_budget(0, tmp_path) as budget:
        inputs = capture_first_layer_inputs(model, adapter, ids, torch.device("cpu"), batch_size=1)
        with pytest.raises(RuntimeError, match="boom"):
            run_layer(Boom(adapter.layers()[0]), inputs, "cpu")
        assert budget.stores == 1 and len(_files(budget)) == 4  # only the inputs' files are left
        adapter.layers()[1] = Boom(adapter.layers()[1])  # fails in the forward sweep, layer 1 chunk 3
        with pytest.raises(RuntimeError, match="boom"):
            module_sensitivities(model, adapter, inputs, ids, "cpu", progress=False)
        assert budget.stores == 1 and len(_files(budget)) == 4
        del inputs
    assert budget.stores == 0 and os.listdir(tmp_path) == []


def test_scratch_folder_removed_at_exit_after_an_error(tmp_path):
    script = textwrap.dedent(f"""
        import torch
        from structprune.engine.activations import ActivationStore, activation_budget
        keep = []
        with activation_budget(0, {str(tmp_path)!r}):
            keep.append(ActivationStore([torch.ones(3, 4)]))
            raise SystemExit("failed on purpose")
    """)
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode != 0 and "failed on purpose" in res.stderr
    assert os.listdir(tmp_path) == []


def test_budget_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("STRUCTPRUNE_ACTIVATION_BUDGET", "0")
    monkeypatch.setenv("STRUCTPRUNE_OFFLOAD_DIR", str(tmp_path))
    store = ActivationStore(_chunks(torch.float32, 2))
    assert store.on_disk(0) and current_budget().limit == 0
    assert os.path.dirname(current_budget().folder) == str(tmp_path)
    store.close()
    monkeypatch.setenv("STRUCTPRUNE_ACTIVATION_BUDGET", "1G")
    assert current_budget().limit == 2 ** 30 and not ActivationStore(_chunks(torch.float32, 1)).on_disk(0)


def test_parse_size():
    assert parse_size("0") == 0 and parse_size(512) == 512 and parse_size("512M") == 512 * 2 ** 20
    assert parse_size("6GiB") == parse_size("6G") == parse_size("6gb") == 6 * 2 ** 30
    assert parse_size("1.5K") == 1536 and parse_size("inf") == float("inf") and parse_size(None) == float("inf")
    with pytest.raises(ValueError):
        parse_size("lots")


@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
def test_capture_shares_equal_kwargs(family):
    model = FACTORIES[family](layers=1)
    inputs = capture_first_layer_inputs(model, get_adapter(model), calib_ids(5, 16), torch.device("cpu"),
                                        batch_size=2)
    assert isinstance(inputs.hidden, ActivationStore) and len(inputs.kwargs) == 3
    assert inputs.kwargs[0] is inputs.kwargs[1]  # equal windows: one copy of cos/sin, masks, positions
    # LLaMA's rotary tables do not depend on the batch; OPT's position ids are [batch, seqlen].
    assert (inputs.kwargs[2] is inputs.kwargs[0]) == (family == "llama-gqa")
    assert isinstance(LayerInputs([torch.zeros(1, 2, 3)], [{}]).hidden, ActivationStore)


def _stream(family, track_dense=True):
    model = FACTORIES[family](layers=3)
    got = []
    for ctx in LayerStream(model, get_adapter(model), calib_ids(5, 16), "cpu", batch_size=2, progress=False,
                           track_dense=track_dense):
        got.append((torch.cat(ctx.inputs.hidden), torch.cat(ctx.dense_inputs.hidden),
                    torch.cat(list(ctx.dense_outputs.hidden))))
    return got


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_streaming_spilled_equals_in_ram(family, tmp_path):
    ref = _stream(family)
    with activation_budget(0, tmp_path) as budget:
        got = _stream(family)
    assert budget.peak_resident == 0 and budget.peak_spilled > 0
    assert all(torch.equal(a, b) for r, g in zip(ref, got) for a, b in zip(r, g))


def test_sensitivities_spilled_and_checkpointed_equal_all_in_ram(tmp_path, monkeypatch):
    num = 16
    model = tiny_llama(layers=num)
    adapter = get_adapter(model)
    ids = calib_ids(4, 16)
    dev = torch.device("cpu")
    runs = {}
    k = checkpoint_interval(num)
    monkeypatch.setattr(activations, "_in_memory_filesystem", lambda path: False)  # tmp_path on a real disk
    for name, limit, every, room in (("all boundaries", float("inf"), 1, None), ("checkpoints", float("inf"), k, None),
                                     ("default, no room", 0, None, 0.0), ("default, on disk", 0, None, None),
                                     ("default, in RAM", float("inf"), None, None)):
        with monkeypatch.context() as m:
            if room is not None:  # neither RAM nor disk to spare
                m.setattr(ActivationBudget, "room", lambda self, ranks=1: room)
            with activation_budget(limit, tmp_path) as budget:
                inputs = capture_first_layer_inputs(model, adapter, ids, dev, batch_size=2)
                runs[name] = (module_sensitivities(model, adapter, inputs, ids, dev, progress=False,
                                                   checkpoint_every=every), budget.peak_stores, budget.peak_spilled)
                del inputs
        assert budget.stores == 0  # every boundary released
    assert len({str(r[0]) for r in runs.values()}) == 1  # the same sensitivities, bit for bit
    # Stores alive at once: checkpoints (inputs included) + one segment + the one being built + gradients.
    assert runs["checkpoints"][1] <= -(-num // k) + k + 2 < runs["all boundaries"][1]
    assert runs["all boundaries"][1] >= num + 1
    # The default keeps what the budget's RAM and scratch disk hold: every boundary (on disk beyond a
    # zero RAM budget), or the square-root checkpoints when there is no room at all.
    assert runs["default, in RAM"][1] == runs["default, on disk"][1] == runs["all boundaries"][1]
    assert runs["default, in RAM"][2] == 0 < runs["default, on disk"][2]
    assert runs["default, no room"][1] == runs["checkpoints"][1]


def test_the_checkpoint_interval_is_the_smallest_that_fits():
    """Fewer recomputed forwards (smaller k) while the boundaries fit; the square root, which holds
    fewest, when nothing smaller does."""
    assert [boundaries_alive(16, k) for k in (1, 2, 3, 4)] == [18, 11, 10, 9]
    assert fitting_interval(16, 100, float("inf")) == 1
    assert fitting_interval(16, 100, 18 * 100) == 1 and fitting_interval(16, 100, 18 * 100 - 1) == 2
    assert fitting_interval(16, 100, 10 * 100) == 3
    assert fitting_interval(16, 100, 9 * 100) == 4 == fitting_interval(16, 100, 0) == checkpoint_interval(16)


def test_prune_identical_with_everything_spilled(tmp_path):
    cfg = PruneConfig(method="structprune", sparsity=0.3, nsamples=4, seqlen=16, batch_size=2, iterations=2)
    ids = calib_ids(4, 16)
    ref = tiny_llama(layers=3)
    api.prune(ref, ids, cfg, device="cpu", progress=False)
    model = tiny_llama(layers=3)
    with activation_budget(0, tmp_path) as budget:
        api.prune(model, ids, cfg, device="cpu", progress=False)
    assert budget.peak_resident == 0 and budget.peak_spilled > 0
    a, b = ref.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert os.listdir(tmp_path) == []


def test_room_is_the_ram_left_plus_half_the_scratch_disk(tmp_path, monkeypatch):
    import shutil
    monkeypatch.setattr(activations, "_in_memory_filesystem", lambda path: False)
    with activation_budget(1000, tmp_path / "not-yet") as budget:
        store = ActivationStore([torch.zeros(100)])  # 400 bytes in RAM
        disk = shutil.disk_usage(tmp_path).free / 2
        assert abs(budget.room() - (600 + disk)) <= 0.01 * disk + 1  # the disk's free space moves a little
        assert abs(budget.room(ranks=4) - (600 + disk / 4)) <= 0.01 * disk + 1  # ranks share the disk
        monkeypatch.setattr(activations, "_in_memory_filesystem", lambda path: True)  # tmpfs: its space is RAM
        assert budget.room() == 600
        store.close()
    with activation_budget(float("inf"), tmp_path) as budget:  # no limit: at most the default RAM budget
        from structprune.memory import default_ram_budget
        assert budget.room() <= default_ram_budget()
