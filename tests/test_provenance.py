"""Issue 12, items 3 and 4: the report says what a run was made from (library versions, calibration
hash, model fingerprint), the reuse cache keys by the same hashes, and ``prune`` leaves the model
where and how it found it, error or success."""

import copy

import pytest
import torch
from tiny import FACTORIES, calib_ids

from structprune import api
from structprune.adapters import get_adapter
from structprune.errors import StructPruneError
from structprune.modelstate import ModelState
from structprune.provenance import calibration_sha256, checkpoint_fingerprint, model_fingerprint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prune(model, calib=None, **kw):
    kw.setdefault("method", "wanda-sp")
    kw.setdefault("allocation", "uniform")
    return api.prune(model, calib_ids(4, 16) if calib is None else calib, device="cpu", progress=False, nsamples=4,
                     seqlen=16, sparsity=0.3, **kw)


# -- the report -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FACTORIES))
def test_report_records_versions_calibration_hash_and_fingerprint(family):
    import platform

    import transformers

    model = FACTORIES[family]()
    dense = model_fingerprint(model)
    calib = calib_ids(4, 16)
    r = _prune(model, calib).report
    assert r["versions"]["python"] == platform.python_version()
    assert r["versions"]["torch"] == torch.__version__
    assert r["versions"]["transformers"] == transformers.__version__
    assert r["versions"]["structprune"]
    assert r["calibration"]["sha256"] == calibration_sha256(calib)
    assert r["model_fingerprint"] == dense  # of the dense model, not the pruned one
    assert model_fingerprint(model)["sha256"] != dense["sha256"]


def test_calibration_hash_is_of_content_order_and_shape():
    ids = calib_ids(4, 16)
    assert calibration_sha256(ids) == calibration_sha256(ids.clone().to(torch.int32))
    assert calibration_sha256(ids) != calibration_sha256(ids[[1, 0, 2, 3]])  # same sums, other order
    assert calibration_sha256(ids) != calibration_sha256(ids.reshape(8, 8))
    other = ids.clone()
    other[0, 0] += 1
    assert calibration_sha256(ids) != calibration_sha256(other)


def test_model_fingerprint_sees_one_weight_and_the_dtype():
    model = FACTORIES["llama-gqa"]()
    fp = model_fingerprint(model)["sha256"]
    assert model_fingerprint(copy.deepcopy(model))["sha256"] == fp
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] += 1e-6
    assert model_fingerprint(model)["sha256"] != fp
    assert model_fingerprint(FACTORIES["llama-gqa"]().to(torch.bfloat16))["sha256"] != fp


def test_checkpoint_fingerprint_reads_no_weights_whole_and_sees_a_changed_block(tmp_path):
    FACTORIES["qwen2"]().save_pretrained(tmp_path / "a")
    files = sorted((tmp_path / "a").glob("*.safetensors"))
    fp = checkpoint_fingerprint(tmp_path / "a", files)
    assert fp == checkpoint_fingerprint(tmp_path / "a", files)
    data = bytearray(files[0].read_bytes())
    data[-3] ^= 0xFF  # the last block is always read
    files[0].write_bytes(bytes(data))
    assert checkpoint_fingerprint(tmp_path / "a", files)["sha256"] != fp["sha256"]


@pytest.mark.parametrize("family", list(FACTORIES))
def test_streamed_report_carries_the_checkpoints_fingerprint(family, tmp_path):
    FACTORIES[family]().save_pretrained(tmp_path / "dense")
    calib = calib_ids(4, 16)
    r = api.prune_checkpoint(tmp_path / "dense", tmp_path / "out", calib, device="cpu", progress=False,
                             method="wanda-sp", allocation="uniform", sparsity=0.3, nsamples=4, seqlen=16).report
    files = sorted((tmp_path / "dense").glob("*.safetensors"))
    assert r["model_fingerprint"] == checkpoint_fingerprint(tmp_path / "dense", files)
    assert r["calibration"]["sha256"] == calibration_sha256(calib) and r["versions"]["torch"] == torch.__version__


# -- the reuse cache --------------------------------------------------------------------------------

def _profile_calls(monkeypatch):
    import structprune.solvers.structprune as sp

    calls = []
    real = sp.module_sensitivities

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(sp, "module_sensitivities", counted)
    return calls


def test_permuted_windows_do_not_share_a_cache_entry(monkeypatch):
    """Swapping two windows keeps every sum of the token ids (the old key) but changes the sensitivity
    subset (sens_nsamples=2 uses the first two): the old cache served the first run's profile."""
    calls = _profile_calls(monkeypatch)
    calib = calib_ids(4, 16)
    permuted = calib[[2, 3, 0, 1]]
    assert int(calib.sum()) == int(permuted.sum()) and int((calib * calib).sum()) == int((permuted ** 2).sum())
    base = FACTORIES["llama-gqa"]()
    cache = {}
    a = _prune(copy.deepcopy(base), calib, method="structprune", allocation="auto", sens_nsamples=2, cache=cache)
    b = _prune(copy.deepcopy(base), permuted, method="structprune", allocation="auto", sens_nsamples=2, cache=cache)
    assert len(calls) == 2 and len(cache) == 4  # a profile and its sensitivities per window order
    fresh = _prune(copy.deepcopy(base), permuted, method="structprune", allocation="auto", sens_nsamples=2)
    assert b.report["solver_log"][-1]["sensitivities"] == fresh.report["solver_log"][-1]["sensitivities"]
    assert a.report["solver_log"][-1]["sensitivities"] != b.report["solver_log"][-1]["sensitivities"]


def test_another_model_does_not_share_a_cache_entry_but_a_copy_does(monkeypatch):
    calls = _profile_calls(monkeypatch)
    calib, cache = calib_ids(4, 16), {}
    base = FACTORIES["llama-gqa"]()
    for model in (copy.deepcopy(base), copy.deepcopy(base), FACTORIES["llama-gqa"](seed=1)):
        _prune(model, calib, method="structprune", allocation="auto", cache=cache)
    assert len(calls) == 2  # the copy reused the first run's profile; the other model did not


# -- the model is left as it was found ---------------------------------------------------------------

def _state(model):
    return ({n: m.training for n, m in model.named_modules()},
            {n: (p.device, p.dtype, p.requires_grad, p.grad is None) for n, p in model.named_parameters()})


def _mixed(model):
    """Train mode, gradients on, and one submodule in eval mode (a frozen part): the mix must survive."""
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    get_adapter(model).layers()[0].eval()
    return model


@pytest.mark.parametrize("family", list(FACTORIES))
def test_an_error_mid_run_leaves_the_model_as_found(family, monkeypatch):
    import structprune.solvers.structprune as sp

    model = _mixed(FACTORIES[family]())
    before = _state(model)
    real, seen = sp.cut_mlp, []

    def fail_on_second_layer(*a, **k):  # after sensitivities (which turn gradients off) and one cut layer
        seen.append(1)
        if len(seen) == 2:
            raise RuntimeError("injected failure")
        return real(*a, **k)
    monkeypatch.setattr(sp, "cut_mlp", fail_on_second_layer)
    with pytest.raises(RuntimeError, match="injected"):
        _prune(model, method="structprune", allocation="auto")
    training, tensors = _state(model)
    assert training == before[0]
    assert {n: t for n, t in tensors.items() if n in before[1]} == {n: t for n, t in before[1].items() if n in tensors}
    assert all(rg and no_grad for _, _, rg, no_grad in tensors.values())  # cut layers' new tensors too


@pytest.mark.parametrize("family", list(FACTORIES))
def test_success_leaves_the_model_as_found(family):
    model = _mixed(FACTORIES[family]())
    before = _state(model)
    _prune(model, method="structprune", allocation="auto")
    training, tensors = _state(model)
    assert training == before[0]
    assert all(t == (torch.device("cpu"), torch.float32, True, True) for t in tensors.values())


def test_devices_dtypes_and_flags_the_run_changed_are_put_back(monkeypatch):
    """Without a GPU: a model on the meta device, and a solver that (like the layer stores on a GPU)
    hands a layer back elsewhere (to the CPU), casts one, turns gradients off and leaves a .grad."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(FACTORIES["llama-gqa"]().config)
    model.train()
    before = _state(model)

    def misbehave(run):
        layers = run.adapter.layers()
        layers[0].to_empty(device="cpu")
        layers[1].to(torch.float64)
        for p in run.model.parameters():
            p.requires_grad_(False)
        run.model.lm_head.weight.grad = torch.zeros_like(run.model.lm_head.weight)
        raise RuntimeError("injected failure")
    monkeypatch.setitem(api.METHODS, "wanda-sp", misbehave)
    with pytest.raises(RuntimeError, match="injected"):
        _prune(model)
    assert _state(model) == before
    assert all(t.is_meta for t in model.state_dict().values())


def test_restore_puts_back_what_it_recorded():
    model = _mixed(FACTORIES["opt"]())
    state = ModelState.capture(model)
    model.eval().to(torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    assert state.restore(model) == []
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    assert model.training and not get_adapter(model).layers()[0].training


def test_refused_before_work_also_leaves_the_model(monkeypatch):
    model = _mixed(FACTORIES["qwen2"]())
    before = _state(model)
    with pytest.raises(StructPruneError):
        _prune(model, calib=torch.full((2, 16), 10_000))  # ids beyond the vocabulary
    assert _state(model) == before


def test_a_knob_of_the_paths_only_reuses_the_sensitivities(monkeypatch):
    """damp and refit_bias change the removal paths, not the streamed backward: a sweep of them
    back-propagates once, and each run's sensitivities equal a fresh run's."""
    calls = _profile_calls(monkeypatch)
    calib, cache = calib_ids(4, 16), {}
    base = FACTORIES["llama-gqa"]()
    runs = [_prune(copy.deepcopy(base), calib, method="structprune", allocation="auto", cache=cache, **kw)
            for kw in ({}, {"damp": 0.1}, {"refit_bias": False})]
    assert len(calls) == 1 and sum(k[0] == "structprune-profile" for k in cache) == 3
    fresh = _prune(copy.deepcopy(base), calib, method="structprune", allocation="auto", damp=0.1)
    assert runs[1].report["solver_log"][-1]["sensitivities"] == fresh.report["solver_log"][-1]["sensitivities"]
    assert runs[1].report["layers"] == fresh.report["layers"]
