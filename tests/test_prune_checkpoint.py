"""Pruning a checkpoint folder streamed from disk (issue 10): equal to the in-memory path,
one decoder layer resident, output written shard by shard and loadable with plain transformers."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import FACTORIES, calib_ids, tiny_llama
from transformers import AutoModelForCausalLM

from structprune import PruneConfig, load_pruned, prune
from structprune.api import prune_checkpoint
from structprune.engine.residency import is_materialized
from structprune.errors import StructPruneError


@pytest.fixture(autouse=True)
def _single_thread(one_torch_thread):
    """Tiny models on one torch thread (see conftest.one_torch_thread)."""


def _save(model, folder, shard="4KB", dtype=None):
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


def _cfg(method, **kw):
    return PruneConfig(method=method, sparsity=0.4, nsamples=4, seqlen=16, mlp_multiple=1, **kw)


def _state(model):
    return {k: v.detach().float() for k, v in model.state_dict().items()}


CASES = [("llama-gqa", "structprune", {}), ("qwen2", "structprune", {}), ("opt", "structprune", {}),
         ("llama-gqa", "structprune", {"iterations": 2}), ("llama-gqa", "wanda-sp", {}),
         ("opt", "obs-local", {}), ("llama-gqa", "flap", {}), ("qwen2", "magnitude-sp", {})]


@pytest.mark.parametrize("family,method,extra", CASES, ids=[f"{f}-{m}-{len(e)}" for f, m, e in CASES])
def test_streamed_from_disk_equals_in_memory(tmp_path, family, method, extra):
    folder = _save(FACTORIES[family](), tmp_path / "dense")
    assert len(list(folder.glob("model-*.safetensors"))) > 1  # sharded
    calib = calib_ids(4, 16)
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    ref_result = prune(ref, calib, _cfg(method, **extra), device="cpu", progress=False)
    out = tmp_path / "pruned"
    result = prune_checkpoint(folder, out, calib, _cfg(method, **extra), device="cpu", progress=False)
    assert [p.to_dict() for p in result.plans] == [p.to_dict() for p in ref_result.plans]
    assert result.report["residency"] == "disk" and result.report["layers"] == ref_result.report["layers"]
    nlayers = len(result.report["layers"])  # every pass reads every layer from disk; in memory nothing is read
    assert result.report["layer_reads"]["count"] >= nlayers and ref_result.report["layer_reads"] is None
    assert result.report["sparsity_achieved"] == ref_result.report["sparsity_achieved"]
    loaded = load_pruned(out)
    want, got = _state(ref), _state(loaded)
    assert want.keys() == got.keys()
    diff = max(float((want[k] - got[k]).abs().max()) for k in want)
    assert diff < 1e-6, diff
    assert json.loads((out / "report.json").read_text())["method"] == method
    assert (out / "model.safetensors.index.json").is_file() or (out / "model.safetensors").is_file()


def test_at_most_one_decoder_layer_is_resident(tmp_path):
    folder = _save(tiny_llama(layers=4), tmp_path / "dense")
    seen = []
    from structprune.models import checkpoint as ckpt

    real = ckpt.load_skeleton

    def spying_skeleton(*a, **k):
        model, reader = real(*a, **k)

        def spy(module, args, kwargs):
            seen.append(sum(is_materialized(layer) for layer in model.model.layers))
        for layer in model.model.layers:
            layer.register_forward_pre_hook(spy, with_kwargs=True)
        return model, reader

    import structprune.models.checkpoint
    structprune.models.checkpoint.load_skeleton = spying_skeleton
    try:
        prune_checkpoint(folder, tmp_path / "out", calib_ids(4, 16), _cfg("structprune"), device="cpu",
                         progress=False)
    finally:
        structprune.models.checkpoint.load_skeleton = real
    assert seen and max(seen) == 1


def test_bf16_checkpoint_computes_in_fp32_and_stays_bf16(tmp_path):
    folder = _save(tiny_llama(), tmp_path / "dense", dtype=torch.bfloat16)
    out = tmp_path / "out"
    result = prune_checkpoint(folder, out, calib_ids(4, 16), _cfg("wanda-sp"), device="cpu", progress=False)
    assert result.report["dtype"] == "float32"
    loaded = load_pruned(out)
    assert next(loaded.parameters()).dtype == torch.bfloat16


def test_global_reference_is_refused_on_disk(tmp_path):
    folder = _save(tiny_llama(), tmp_path / "dense")
    with pytest.raises(StructPruneError, match="whole model"):
        prune_checkpoint(folder, tmp_path / "out", calib_ids(4, 16), _cfg("global"), device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


def test_tied_embeddings_count_once_and_match_in_memory(tmp_path):
    """SmolLM2 ties its LM head to the embeddings: the skeleton must too (counts, export)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=37, num_hidden_layers=3,
                                         num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                         max_position_embeddings=128, tie_word_embeddings=True)).eval()
    folder = _save(model, tmp_path / "dense")
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    want = prune(ref, calib_ids(4, 16), _cfg("structprune"), device="cpu", progress=False).report
    got = prune_checkpoint(folder, tmp_path / "out", calib_ids(4, 16), _cfg("structprune"), device="cpu",
                           progress=False).report
    assert (got["params_before"], got["params_after"]) == (want["params_before"], want["params_after"])
    loaded = load_pruned(tmp_path / "out")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert max(float((a - b).abs().max()) for a, b in zip(_state(ref).values(), _state(loaded).values())) < 1e-6


def test_a_checkpoint_saved_without_the_model_prefix_exports_model_names_once(tmp_path):
    """OPT checkpoints saved from the base model store ``decoder.layers...``: the export must use
    the model's names (as save_pretrained does), write each tensor once, and load verified."""
    from tiny import tiny_opt

    base = tiny_opt().model  # OPTModel: names without the "model." prefix, no lm_head (tied)
    folder = _save(base, tmp_path / "dense")
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    want = prune(ref, calib_ids(4, 16), _cfg("wanda-sp"), device="cpu", progress=False)
    out = tmp_path / "out"
    got = prune_checkpoint(folder, out, calib_ids(4, 16), _cfg("wanda-sp"), device="cpu", progress=False)
    assert [p.to_dict() for p in got.plans] == [p.to_dict() for p in want.plans]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert all(name.startswith("model.") for name in index), sorted(index)[:3]
    loaded = load_pruned(out)  # verifies every weight: nothing missing, nothing unexpected
    assert max(float((a - b).abs().max()) for a, b in zip(_state(ref).values(), _state(loaded).values())) < 1e-6


def test_disk_path_bounds_activations_by_default(tmp_path, monkeypatch):
    """Without --activation-budget the disk path still bounds activations in RAM: half of what the
    memory limit (here an injected cgroup limit) leaves after the process and one layer's work, or,
    where no limit can be read, a quarter of the available memory; the report says so. An explicit
    budget is kept."""
    from structprune import memory
    from structprune.engine import budget

    monkeypatch.delenv("STRUCTPRUNE_ACTIVATION_BUDGET", raising=False)
    monkeypatch.setattr(budget, "cgroup_limit", lambda: (2**31, "cgroup v2 /sys/fs/cgroup/job/memory.max"))
    monkeypatch.setattr(budget, "current_rss", lambda: 2**29)
    folder = _save(tiny_llama(), tmp_path / "dense")
    r = prune_checkpoint(folder, tmp_path / "c", calib_ids(4, 16), _cfg("wanda-sp"), device="cpu",
                         progress=False).report
    plan = r["memory"]["plan"]
    want = int(budget.ACTIVATION_SHARE * (2**31 - 2**29 - plan["working_set_bytes"]))
    assert plan["limit"] == 2**31 and plan["limit_source"] == "cgroup v2 /sys/fs/cgroup/job/memory.max"
    assert r["config"]["activation_budget"] == want and r["memory"]["activation_budget"] == want

    monkeypatch.setattr(budget, "cgroup_limit", lambda: None)
    monkeypatch.setattr(budget, "physical_memory", lambda: None)
    monkeypatch.setattr(memory, "available_memory", lambda: 4 * 2**20)
    r = prune_checkpoint(folder, tmp_path / "a", calib_ids(4, 16), _cfg("wanda-sp"), device="cpu",
                         progress=False).report
    assert r["memory"]["plan"]["limit"] is None
    assert r["config"]["activation_budget"] == 2**20 and r["memory"]["activation_budget"] == 2**20
    r = prune_checkpoint(folder, tmp_path / "b", calib_ids(4, 16), _cfg("wanda-sp", activation_budget="0"),
                         device="cpu", progress=False).report
    assert r["memory"]["activations_peak_ram_bytes"] == 0 and r["memory"]["activations_spilled_bytes"] > 0
