"""Baselines under one protocol: every method and allocation lands on the budget with legal,
consistent widths; FLAP's bias compensation and the global method's gradients are checked
against independent references."""

import copy

import pytest
import torch
from tiny import FACTORIES, VOCAB, _init, calib_ids, final_state_distortion
from transformers import LlamaConfig, LlamaForCausalLM

from structprune import api
from structprune.adapters import get_adapter
from structprune.adapters.base import AttentionShape, MLPShape
from structprune.allocation import owl_retention, owl_widths, threshold_counts, threshold_widths
from structprune.allocation.threshold import full_cost
from structprune.allocation.widths import layer_cost
from structprune.errors import StructPruneError
from structprune.solvers.global_ref import gradient_scores
from structprune.surgery import head_rows, mask_layer_plan, set_output_projection

RUNS = [("magnitude-sp", "uniform"), ("wanda-sp", "uniform"), ("wanda-sp", "owl"), ("wanda-sp", "threshold"),
        ("magnitude-sp", "threshold"), ("flap", "auto"), ("flap", "uniform"), ("flap", "owl"),
        ("obs-local", "auto"), ("global", "auto")]


def medium_llama(seed: int = 0) -> LlamaForCausalLM:
    """4 layers, hidden 256, 8 heads / 2 KV heads, intermediate 688: fine enough to land exactly."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return _init(LlamaForCausalLM(cfg))


def _prune(model, method, allocation, sparsity, ids, **kw):
    return api.prune(model, ids, device="cpu", progress=False, method=method, allocation=allocation,
                     sparsity=sparsity, seqlen=ids.shape[1], **kw)


def _check_shapes(model, result):
    """The report's widths are the modules' real shapes, and the plans agree with them."""
    adapter = get_adapter(model)
    for layer, rep, plan in zip(adapter.layers(), result.report["layers"], result.plans):
        (q, k, v), o = adapter.attn_linears(layer)
        ins, out = adapter.mlp_linears(layer)
        dh = adapter.attention_shape(layer).head_dim
        assert q.out_features == o.in_features == rep["heads"] * dh == len(plan.heads) * dh
        assert k.out_features == v.out_features == rep["kv_heads"] * dh == len(plan.kv_heads) * dh
        assert all(lin.out_features == rep["mlp"] for lin in ins) and out.in_features == rep["mlp"] == len(plan.channels)


@pytest.mark.parametrize("family", sorted(FACTORIES))
@pytest.mark.parametrize("method,allocation", RUNS)
def test_method_runs_on_tiny_models(family, method, allocation):
    model = FACTORIES[family]()
    ids = calib_ids(4, 16)
    result = _prune(model, method, allocation, 0.4, ids)
    # Tiny layers are coarse (a head is 1/6 of the attention): a few percent is all they allow.
    assert abs(result.report["sparsity_achieved"] - 0.4) < 0.03, result.report["sparsity_achieved"]
    _check_shapes(model, result)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("method,allocation", [r for r in RUNS if r[0] != "obs-local"])
@pytest.mark.parametrize("sparsity", [0.2, 0.5])
def test_budget_lands_exactly_on_medium_model(method, allocation, sparsity):
    model = medium_llama()
    result = _prune(model, method, allocation, sparsity, calib_ids(2, 32))
    # Bias compensation adds a bias of `hidden` entries per module: 2e-3 of this model's budget at most.
    assert abs(result.report["sparsity_achieved"] - sparsity) < 2.5e-3, result.report["sparsity_achieved"]
    _check_shapes(model, result)


@pytest.mark.parametrize("method,allocation", [("wanda-sp", "owl"), ("wanda-sp", "threshold"), ("flap", "auto"),
                                               ("global", "auto")])
def test_non_uniform_allocations_are_non_uniform(method, allocation):
    model = medium_llama()
    result = _prune(model, method, allocation, 0.3, calib_ids(2, 32))
    layers = result.report["layers"]
    assert len({(l["heads"], l["kv_heads"], l["mlp"]) for l in layers}) > 1, layers
    if method != "flap":  # FLAP standardises per layer: on random, alike layers its budgets stay near equal
        costs = [layer_cost(a, m, _widths(l)) for l, (a, m) in zip(layers, _shapes(model))]
        assert max(costs) - min(costs) > 0.05 * max(costs), costs
    assert abs(result.report["sparsity_achieved"] - 0.3) < 2.5e-3


def _shapes(model):
    dense = medium_llama()
    a = get_adapter(dense)
    return [(a.attention_shape(l), a.mlp_shape(l)) for l in a.layers()]


def _widths(rep):
    from structprune.allocation import LayerWidths
    return LayerWidths(rep["kv_heads"], rep["heads"] // rep["kv_heads"], rep["mlp"])


def test_unsupported_combinations_are_user_errors():
    ids = calib_ids(2, 16)
    with pytest.raises(StructPruneError, match="allocation"):
        _prune(FACTORIES["llama-gqa"](), "wanda-sp", "softmax", 0.3, ids)
    with pytest.raises(StructPruneError, match="threshold"):
        _prune(FACTORIES["llama-gqa"](), "global", "uniform", 0.3, ids)
    with pytest.raises(StructPruneError, match="uniform_widths"):
        _prune(FACTORIES["llama-gqa"](), "flap", "threshold", 0.3, ids, uniform_widths=True)
    with pytest.raises(StructPruneError, match="global_score"):
        _prune(FACTORIES["llama-gqa"](), "global", "auto", 0.3, ids, global_score="hessian")


# -- allocation units -------------------------------------------------------------------------

SHAPES = [(AttentionShape(8, 2, 32, 256, False), MLPShape(688, 256, True, False))] * 6


def test_owl_retention_follows_owl():
    r = owl_retention([0.01, 0.03, 0.02, 0.05], sparsity=0.4, lam=0.08)
    assert abs(r.mean() - 0.6) < 1e-12 and abs((r.max() - r.min()) - 0.16) < 1e-12
    assert r.argmax() == 3 and r.argmin() == 0  # more outliers, more kept
    assert torch.equal(owl_retention([0.02] * 3, 0.4), torch.full((3,), 0.6, dtype=torch.float64))


@pytest.mark.parametrize("sparsity", [0.05, 0.3, 0.7])
@pytest.mark.parametrize("multiple", [1, 8])
def test_owl_widths_meet_budget(sparsity, multiple):
    ws = owl_widths(SHAPES, [0.01, 0.02, 0.05, 0.01, 0.03, 0.04], sparsity, 0.08, multiple)
    full = sum(full_cost(a, m) for a, m in SHAPES)
    kept = sum(layer_cost(a, m, w) for (a, m), w in zip(SHAPES, ws))
    assert abs(1 - kept / full - sparsity) < multiple * 3 * 256 / full
    assert all(w.channels % multiple == 0 and w.channels >= 1 and w.kv_heads >= 1 for w in ws)
    assert ws[2].channels + 32 * ws[2].heads > ws[0].channels + 32 * ws[0].heads  # outlier-rich layer keeps more


def test_threshold_keeps_the_best_keys_per_parameter():
    g = torch.Generator().manual_seed(0)
    keys = [{"attn": torch.rand(8, generator=g), "mlp": torch.rand(688, generator=g)} for _ in SHAPES]
    keys[1]["mlp"] += 10  # layer 1's channels beat everything else
    counts = threshold_counts(SHAPES, keys, 0.5)
    assert counts[1][1] == 688
    ws = threshold_widths(SHAPES, keys, 0.5)
    full = sum(full_cost(a, m) for a, m in SHAPES)
    kept = sum(layer_cost(a, m, w) for (a, m), w in zip(SHAPES, ws))
    assert abs(1 - kept / full - 0.5) < 3 * 256 / full
    # Every layer keeps at least one structure of each module.
    extreme = [{"attn": torch.zeros(8), "mlp": torch.zeros(688)} for _ in SHAPES]
    extreme[0] = {"attn": torch.ones(8), "mlp": torch.ones(688)}
    assert all(w.kv_heads >= 1 and w.per_group >= 1 and w.channels >= 1 for w in threshold_widths(SHAPES, extreme, 0.8))


# -- FLAP: pruned == dense with removed structures masked and their mean added as a bias ----------

@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
def test_flap_equals_masked_plus_bias_compensation(family):
    model = FACTORIES[family]()
    reference = copy.deepcopy(model)
    ids = calib_ids(4, 16)
    result = _prune(model, "flap", "auto", 0.4, ids)
    adapter = get_adapter(reference)
    for layer, plan in zip(adapter.layers(), result.plans):
        # Means of the activations entering the output projections, from a full (unstreamed)
        # forward of the reference whose earlier layers are already masked and compensated.
        means, hooks = {}, []
        (_, o), (_, out) = adapter.attn_linears(layer), adapter.mlp_linears(layer)
        for name, lin in (("attn", o), ("mlp", out)):
            hooks.append(lin.register_forward_pre_hook(
                lambda m, a, name=name: means.__setitem__(name, a[0].reshape(-1, a[0].shape[-1]).mean(0))))
        with torch.no_grad():
            reference(ids)
        for h in hooks:
            h.remove()
        dh = adapter.attention_shape(layer).head_dim
        comps = {}
        for name, lin, keep in (("attn", o, head_rows(plan.heads, dh)), ("mlp", out, torch.tensor(plan.channels))):
            removed = torch.ones(lin.in_features, dtype=torch.bool)
            removed[keep] = False
            comps[name] = lin.weight[:, removed].detach() @ means[name][removed]
        mask_layer_plan(adapter, layer, plan)
        for name, lin in (("attn", o), ("mlp", out)):
            set_output_projection(lin, lin.weight, comps[name] if lin.bias is None else lin.bias + comps[name])
    test_ids = calib_ids(3, 16, seed=7)
    with torch.no_grad():
        for x in (ids, test_ids):
            a, b = model(x).logits, reference(x).logits
            diff = (a - b).abs()
            assert diff.max() < 1e-4, f"max {diff.max():.3g} mean {diff.mean():.3g}"
    # The compensation matters: without the biases the masked model differs.
    assert any(get_adapter(model).attn_linears(l)[1].bias is not None for l in get_adapter(model).layers())


# -- global: scores come from back-propagation ---------------------------------------------------

def _loss(model, ids):
    # In the model's dtype (double here): transformers' own loss upcasts only to float32.
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()


def test_global_scores_are_mask_gradients():
    """Each score is |dL/d alpha| for the structure's output scaled by alpha (central differences)."""
    model = FACTORIES["llama-gqa"]().double()
    adapter = get_adapter(model)
    ids = calib_ids(1, 16)
    scores = gradient_scores(model, adapter, ids, "cpu", "taylor")
    layer = adapter.layers()[1]
    dh = adapter.attention_shape(layer).head_dim
    eps = 1e-2  # RMSNorm computes in float32 even in a double model: larger steps beat its noise
    for name, lin, cols in (("mlp", adapter.mlp_linears(layer)[1], torch.tensor([5])),
                            ("attn", adapter.attn_linears(layer)[1], head_rows([2], dh))):
        w0 = lin.weight.detach().clone()
        vals = []
        for s in (1 + eps, 1 - eps):
            with torch.no_grad():
                lin.weight[:, cols] = w0[:, cols] * s
            vals.append(_loss(model, ids))
        with torch.no_grad():
            lin.weight.copy_(w0)
        fd = abs(vals[0] - vals[1]) / (2 * eps)
        got = scores[1][name][5 if name == "mlp" else 2].item()
        assert abs(got - fd) < 1e-2 * fd, (name, got, fd)


def test_global_scores_depend_on_the_loss_and_leave_no_grads():
    model = FACTORIES["llama-gqa"]()
    adapter = get_adapter(model)
    frozen = adapter.layers()[0].self_attn.q_proj.weight
    frozen.requires_grad_(False)  # a mixed state that must come back as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    a = gradient_scores(model, adapter, calib_ids(2, 16, seed=1), "cpu", "taylor")
    b = gradient_scores(model, adapter, calib_ids(2, 16, seed=2), "cpu", "taylor")
    f = gradient_scores(model, adapter, calib_ids(2, 16, seed=1), "cpu", "fisher")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for sa, sb, sf in zip(a, b, f):
        for m in ("attn", "mlp"):
            assert (sa[m] > 0).all() and (sf[m] > 0).all()
            assert not torch.allclose(sa[m], sb[m])  # other text, other loss, other scores


def test_obs_local_distorts_less_than_wanda_sp():
    """obs-local refits what it removes: its final hidden states stay closer to the dense model's."""
    dense = FACTORIES["llama-gqa"]()
    ids = calib_ids(6, 16)
    ref = final_state_distortion(dense, ids)
    errs = {}
    for method in ("wanda-sp", "obs-local"):
        model = copy.deepcopy(dense)
        _prune(model, method, "auto", 0.3, ids)
        errs[method] = final_state_distortion(model, ids, ref)
    assert errs["obs-local"] < errs["wanda-sp"], errs


def test_benchmark_method_specs(load_benchmark):
    bench = load_benchmark("baselines")
    assert bench.parse_spec("wanda-sp:owl") == ("wanda-sp", "owl", {})
    assert bench.parse_spec("structprune+temperature=inf+iterations=2") == (
        "structprune", "auto", {"temperature": float("inf"), "iterations": 2})
    with pytest.raises(StructPruneError):
        bench.parse_spec("global+global_score")
