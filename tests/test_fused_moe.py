"""Phi-3's fused projections and MoE experts (Mixtral, Qwen2-MoE): what the shared contract
suite cannot see. Fused rows cut at the right places, per-expert statistics equal a loop
over the routed tokens, the router and the expert count untouched, experts of a layer kept
at one width; every method, sliced == masked and both exports on these families."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from tiny import FAMILIES, calib_ids

from structprune import load_pruned, prune
from structprune.adapters import LayerPlan, get_adapter
from structprune.engine.capture import capture_first_layer_inputs
from structprune.engine.stats import collect_stats
from structprune.export import save_pruned
from structprune.surgery import apply_layer_plan, mask_layer_plan

FUSED_MOE = ("phi3", "mixtral", "qwen2_moe")


def legal_plan(adapter, layer, rng: random.Random, uniform: bool = False) -> LayerPlan:
    """A random legal cut: GQA-legal heads; experts of a layer at one width (a multiple of 8)."""
    s, m = adapter.attention_shape(layer), adapter.mlp_shape(layer)
    kv = [0] if uniform else sorted(rng.sample(range(s.num_kv_heads), rng.randint(1, s.num_kv_heads)))
    per_group = 1 if uniform else rng.randint(1, s.group_size)
    heads = [k * s.group_size + h for k in kv for h in range(per_group)]
    expert = 16 if uniform else rng.choice([8, 16, 24, 32])
    channels, start = [], 0
    for i, n in enumerate(m.sizes):
        k = expert if i < m.tied else (20 if uniform else rng.randint(1, n - 1))
        channels += [start + c for c in sorted(rng.sample(range(n), k))]
        start += n
    return LayerPlan(heads, kv, channels)


def test_phi3_cut_keeps_the_right_fused_rows():
    model = FAMILIES["phi3"]()
    adapter = get_adapter(model)
    layer = adapter.layers()[0]
    qkv = layer.self_attn.qkv_proj.weight.detach().clone()  # [6*8 | 2*8 | 2*8, 48]
    gate_up = layer.mlp.gate_up_proj.weight.detach().clone()  # [37 | 37, 48]
    heads, kv, ch = [3, 5], [1], [0, 4, 36]
    apply_layer_plan(adapter, layer, LayerPlan(heads, kv, ch))
    rows = lambda hs, off: [off + h * 8 + j for h in hs for j in range(8)]  # noqa: E731
    want = qkv[rows(heads, 0) + rows(kv, 48) + rows(kv, 64)]
    assert torch.equal(layer.self_attn.qkv_proj.weight, want)
    assert torch.equal(layer.mlp.gate_up_proj.weight, gate_up[ch + [37 + c for c in ch]])
    assert layer.self_attn.config.num_attention_heads == 2 and model.config.num_attention_heads == 6


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_expert_statistics_equal_a_loop_over_routed_tokens(family):
    model = FAMILIES[family]()
    adapter = get_adapter(model)
    layer = adapter.layers()[0]
    inputs = capture_first_layer_inputs(model, adapter, calib_ids(2, 12), "cpu")
    stats = collect_stats(adapter, layer, inputs, "cpu")["mlp"]
    # Reference: the post-attention hidden states, the router's choice, one token at a time.
    seen = []
    h = layer.mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for x, kw in zip(inputs.hidden, inputs.kwargs):
            layer(x, **kw)
    h.remove()
    x = torch.cat(seen)
    mlp = layer.mlp
    with torch.no_grad():
        _, weights, idx = mlp.gate(x)
        E = mlp.experts.gate_up_proj.shape[0]
        n = mlp.experts.down_proj.shape[2]
        for e in range(E):
            ref = torch.zeros(n, n, dtype=torch.float64)
            for t in range(x.shape[0]):
                for k in range(idx.shape[1]):
                    if idx[t, k] == e:
                        g, u = (mlp.experts.gate_up_proj[e] @ x[t]).chunk(2)
                        z = (mlp.experts.act_fn(g) * u * weights[t, k]).double()
                        ref += torch.outer(z, z)
            torch.testing.assert_close(stats.parts[e].gram.double(), ref, rtol=1e-4, atol=1e-5)
            assert stats.parts[e].count == x.shape[0]
        if family == "qwen2_moe":  # the shared expert, times its sigmoid gate
            s = mlp.shared_expert
            z = torch.sigmoid(mlp.shared_expert_gate(x)) * s.act_fn(s.gate_proj(x)) * s.up_proj(x)
            torch.testing.assert_close(stats.parts[E].gram.double(), (z.T @ z).double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FUSED_MOE)
@pytest.mark.parametrize("seed", [0, 1])
def test_sliced_equals_masked(family, seed):
    model = FAMILIES[family]()
    masked = copy.deepcopy(model)
    adapter, madapter = get_adapter(model), get_adapter(masked)
    rng = random.Random(seed)
    for layer, mlayer in zip(adapter.layers(), madapter.layers()):
        plan = legal_plan(adapter, layer, rng)
        apply_layer_plan(adapter, layer, plan)
        mask_layer_plan(madapter, mlayer, plan)
    ids = calib_ids(3, 20)
    with torch.no_grad():
        d = (model(ids).logits - masked(ids).logits).abs().max()
    print(f"{family} sliced vs masked: max diff {d:.3g}")
    assert d < 1e-4


def test_experts_of_a_layer_keep_one_width():
    model = FAMILIES["mixtral"]()
    adapter = get_adapter(model)
    layer = adapter.layers()[0]
    with pytest.raises(ValueError, match="same number"):
        apply_layer_plan(adapter, layer, LayerPlan([0], [0], [0, 1, 40, 80]))  # 2, 1, 1 channels


@pytest.mark.parametrize("method", ["structprune", "global", "obs-local", "flap", "wanda-sp", "magnitude-sp"])
@pytest.mark.parametrize("family", FUSED_MOE)
def test_every_method_prunes_and_leaves_the_router(family, method):
    model = FAMILIES[family]()
    adapter = get_adapter(model)
    routers = [l.mlp.gate.weight.detach().clone() for l in adapter.layers() if hasattr(l.mlp, "gate")]
    result = prune(model, calib_ids(4, 16), device="cpu", progress=False, method=method, sparsity=0.3,
                   nsamples=4, seqlen=16)
    assert abs(result.report["sparsity_achieved"] - 0.3) < 0.1
    for layer, router in zip(adapter.layers(), routers):
        assert torch.equal(layer.mlp.gate.weight, router)
        parts = adapter.layer_widths(layer)["mlp_parts"]
        assert len(parts) == len(adapter.mlp_shape(layer).sizes)  # every expert kept
        assert len(set(parts[:adapter.tied_parts(layer)])) == 1 and all(p % 8 == 0 for p in parts[:3])
    with torch.no_grad():
        assert torch.isfinite(model(calib_ids(2, 12)).logits).all()


@pytest.mark.parametrize("family", FUSED_MOE)
@pytest.mark.parametrize("uniform", [True, False])
def test_export_roundtrip(family, uniform, tmp_path):
    from transformers import AutoModelForCausalLM

    model = FAMILIES[family]()
    adapter = get_adapter(model)
    rng = random.Random(2)
    for layer in adapter.layers():
        apply_layer_plan(adapter, layer, legal_plan(adapter, layer, rng, uniform))
    export = save_pruned(model, None, tmp_path)
    assert export.format == ("stock" if uniform else "custom"), export.reason
    ids = calib_ids(2, 12)
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=not uniform).eval(),
                   load_pruned(tmp_path)):
        if uniform:
            assert type(loaded) is type(model)
        with torch.no_grad():
            assert (model(ids).logits - loaded(ids).logits).abs().max() < 1e-5
        want = model.generate(ids[:1, :6], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(want, loaded.generate(ids[:1, :6], max_new_tokens=6, do_sample=False, pad_token_id=0))


# -- MoE checkpoints on disk: the Hub's per-expert layout and the fused 3D one ------------------

MOE = ("mixtral", "qwen2_moe")


def _save(model, folder, per_expert: bool):
    """``save_pretrained`` in the Hub's per-expert layout (its default) or the model's own 3D one."""
    model.save_pretrained(folder, max_shard_size="50KB", **({} if per_expert else {"save_original_format": False}))
    from safetensors import safe_open

    names = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            names |= set(s.keys())
    fused = any(n.endswith("experts.gate_up_proj") for n in names)
    per = any(".experts.0." in n for n in names)
    assert (per, fused) == (per_expert, not per_expert), sorted(names)[:8]  # the layout asked for
    return names


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("per_expert", [True, False])
def test_moe_checkpoint_reads_as_transformers_loads_it(family, per_expert, tmp_path):
    """Every tensor read through load_skeleton's reader equals what from_pretrained loads (transformers'
    own conversion), bit for bit, in both layouts; per-expert files are converted, fused ones read as is."""
    from transformers import AutoModelForCausalLM

    from structprune.models.checkpoint import load_skeleton

    torch.manual_seed(0)
    model = FAMILIES[family]()
    _save(model, tmp_path, per_expert)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    skeleton, reader = load_skeleton(tmp_path, torch.float32)
    want = ref.state_dict()
    assert set(skeleton.state_dict()) == set(want)
    layers = len(get_adapter(model).layers())
    converted = {n for n in reader.conversions}
    if per_expert:  # the 3D experts of every layer are built from per-expert tensors
        assert converted == {f"model.layers.{i}.mlp.experts.{p}" for i in range(layers)
                             for p in ("gate_up_proj", "down_proj")}
        E = model.config.num_local_experts if family == "mixtral" else model.config.num_experts
        assert all(len(reader.stored_names(n)) == E * (2 if n.endswith("gate_up_proj") else 1) for n in converted)
    else:
        assert not converted
    for name, t in want.items():
        if name not in reader.computed or name in reader:
            got = reader.get(name)
            assert reader.shape(name) == tuple(t.shape), name
            assert torch.equal(got, t), name
            assert torch.equal(got, model.state_dict()[name]), name  # and what was saved


def test_experts_are_stacked_in_numeric_order(tmp_path):
    """Eleven experts: sorted as strings, expert 10 would come before expert 2."""
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    from structprune.models.checkpoint import load_skeleton

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=101, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=11,
                        num_experts_per_tok=2, tie_word_embeddings=False)
    model = MixtralForCausalLM(cfg).eval()
    _save(model, tmp_path, per_expert=True)
    _, reader = load_skeleton(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    for p in ("gate_up_proj", "down_proj"):
        name = f"model.layers.0.mlp.experts.{p}"
        assert torch.equal(reader.get(name), ref[name]) and torch.equal(reader.get(name), model.state_dict()[name])


@pytest.mark.parametrize("family", MOE)
def test_per_expert_checkpoint_is_read_one_layer_at_a_time(family, tmp_path):
    """Fetching layer i reads only layer i's stored tensors (the experts are stacked per layer), and
    the streamed forward from the per-expert files equals the full model's."""
    from structprune.engine.disk import DiskStoreFactory
    from structprune.models.checkpoint import CheckpointReader, load_skeleton

    model = FAMILIES[family]()
    _save(model, tmp_path, per_expert=True)
    skeleton, reader = load_skeleton(tmp_path, torch.float32)
    adapter = get_adapter(skeleton)
    store = DiskStoreFactory.from_model(skeleton, adapter, reader, torch.float32)(adapter.layers(), "cpu")
    read: list[str] = []
    real_get = CheckpointReader.get

    def spy(self, name, dtype=None, device="cpu"):
        if self.resolve(name) is not None:
            read.append(self.resolve(name))
        return real_get(self, name, dtype, device)

    CheckpointReader.get = spy
    try:
        layer = store.fetch(1)
        store.release(1)
    finally:
        CheckpointReader.get = real_get
        store.finish()
    assert read and all(n.startswith("model.layers.1.") for n in read), read
    assert sorted(read) == reader.names_with_prefix("model.layers.1.")  # every stored tensor, once
    assert all(p.is_meta for p in layer.parameters())
    from test_families import check_streamed_equals_full  # noqa: E402 - the shared contract check

    check_streamed_equals_full(FAMILIES[family], tmp_path / "again")


def test_incomplete_per_expert_checkpoint_is_refused_before_reading(tmp_path):
    """A checkpoint missing one expert's matrix cannot be stacked into the model's 3D experts: the
    error names the tensor at load time, not in the middle of a run."""
    import json

    from safetensors.torch import load_file, save_file

    from structprune.errors import StructPruneError
    from structprune.models.checkpoint import load_skeleton

    model = FAMILIES["mixtral"](layers=1)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StructPruneError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        load_skeleton(tmp_path)
    # A whole expert missing stacks without complaint, one short: refused by its shape.
    for w in ("w1", "w2"):
        del tensors[f"model.layers.0.block_sparse_moe.experts.2.{w}.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StructPruneError, match=r"experts\.(gate_up|down)_proj' the shape \[2, .*expects \[3, "):
        load_skeleton(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mixtral"


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("uniform", [True, False])
def test_prune_checkpoint_from_per_expert_layout_reloads_with_from_pretrained(family, uniform, tmp_path):
    """prune_checkpoint streams the Hub layout and writes the model's fused layout, which plain
    from_pretrained loads (stock config for uniform widths, the exported modeling code otherwise):
    same plans, logits and greedy generation as pruning the model in memory."""
    from test_families import assert_same_model
    from transformers import AutoModelForCausalLM

    from structprune import PruneConfig
    from structprune.api import prune_checkpoint

    dense = tmp_path / "dense"
    _save(FAMILIES[family](), dense, per_expert=True)
    # FLAP's threshold allocation gives the layers different widths; uniform widths a stock config.
    config = PruneConfig(method="wanda-sp" if uniform else "flap", sparsity=0.3, nsamples=4, seqlen=16,
                         mlp_multiple=1, uniform_widths=uniform)
    calib = calib_ids(4, 16)
    ref = AutoModelForCausalLM.from_pretrained(dense).eval()
    want = prune(ref, calib, config, device="cpu", progress=False)
    got = prune_checkpoint(dense, tmp_path / "pruned", calib, config, device="cpu", progress=False)
    assert [p.to_dict() for p in got.plans] == [p.to_dict() for p in want.plans]
    assert got.report["export"]["format"] == ("stock" if uniform else "custom")
    out = _save_names(tmp_path / "pruned")
    assert not any(".experts.0." in n for n in out) and any(n.endswith("experts.gate_up_proj") for n in out)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", trust_remote_code=not uniform).eval()
    if uniform:
        assert type(loaded) is type(ref)
    assert_same_model(ref, loaded, f"{family} pruned from per-expert files, reloaded")


def _save_names(folder) -> set[str]:
    import json

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as s:
        return set(s.keys())
