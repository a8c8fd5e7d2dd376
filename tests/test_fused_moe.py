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
