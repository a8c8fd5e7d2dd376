"""No silent wrong results: options a method ignores, impossible values and unreachable targets are
refused up front; non-finite sensitivities and missed targets are errors, not reports."""

import math

import pytest
import torch
from tiny import FACTORIES, calib_ids

from structprune import api
from structprune.adapters import count_params, get_adapter
from structprune.adapters.base import LayerPlan
from structprune.config import PruneConfig
from structprune.errors import StructPruneError
from structprune.surgery import apply_layer_plan


def _prune(model, **kw):
    return api.prune(model, calib_ids(4, 16), device="cpu", progress=False, nsamples=4, seqlen=16, **kw)


# -- 1. options a method ignores ----------------------------------------------------------------

@pytest.mark.parametrize("method,allocation", [("structprune", "owl"), ("obs-local", "owl"), ("obs-local", "threshold"),
                                               ("global", "uniform"), ("wanda-sp", "softmax"), ("flap", "softmax")])
def test_allocation_a_method_does_not_run_is_refused(method, allocation):
    with pytest.raises(StructPruneError, match=rf"allocation.*{allocation}.*{method}.*supports"):
        PruneConfig(method=method, allocation=allocation)


@pytest.mark.parametrize("method,allocation,knob,value", [
    ("wanda-sp", "uniform", "temperature", 0.5), ("wanda-sp", "uniform", "rho", 0.5),
    ("magnitude-sp", "uniform", "iterations", 2), ("flap", "auto", "path_steps", 8),
    ("flap", "auto", "target", "dense"), ("wanda-sp", "uniform", "global_score", "taylor"),
    ("wanda-sp", "uniform", "owl_lambda", 0.2), ("wanda-sp", "threshold", "owl_m", 3.0),
    ("structprune", "auto", "owl_lambda", 0.2), ("structprune", "uniform", "temperature", 0.5),
    ("structprune", "threshold", "temperature", 2.0), ("structprune", "uniform", "r_min", 0.2),
    ("structprune", "auto", "global_score", "taylor"), ("global", "auto", "rho", 0.5),
    ("obs-local", "auto", "temperature", 0.1), ("flap", "auto", "damp", 0.1), ("wanda-sp", "uniform", "damp", 0.1),
])
def test_knob_a_method_ignores_is_refused(method, allocation, knob, value):
    with pytest.raises(StructPruneError, match=rf"{knob}.*{method}"):
        PruneConfig(method=method, allocation=allocation, **{knob: value})


@pytest.mark.parametrize("method,allocation,kw", [
    ("structprune", "auto", {"temperature": 0.5, "rho": 1.0, "iterations": 2, "path_steps": 8, "target": "dense",
                             "r_min": 0.1, "damp": 0.1, "sens_nsamples": 4}),
    ("structprune", "softmax", {"temperature": math.inf}), ("structprune", "uniform", {"rho": 0.5}),
    ("wanda-sp", "owl", {"owl_lambda": 0.1, "owl_m": 3.0}), ("flap", "owl", {"owl_lambda": 0.1}),
    ("global", "auto", {"global_score": "taylor", "damp": 0.1}), ("obs-local", "auto", {"damp": 0.1}),
])
def test_knobs_a_method_reads_are_accepted(method, allocation, kw):
    PruneConfig(method=method, allocation=allocation, **kw)


def test_every_method_accepts_its_defaults():
    from structprune.solvers import METHODS

    for method in METHODS:
        assert PruneConfig(method=method).method == method


def test_owl_on_structprune_is_refused_before_any_work():
    model = FACTORIES["llama-gqa"]()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(StructPruneError, match="owl"):
        _prune(model, method="structprune", allocation="owl", sparsity=0.3)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# -- 2. values --------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("seqlen", 1), ("seqlen", 0), ("sens_nsamples", -1), ("damp", 0.0), ("damp", -0.1), ("damp", math.nan),
    ("damp", math.inf), ("r_min", math.nan), ("owl_lambda", math.nan), ("owl_lambda", math.inf),
    ("owl_lambda", -0.1), ("owl_m", math.nan), ("owl_m", 0.0), ("owl_m", math.inf), ("temperature", math.nan),
    ("temperature", -math.inf), ("rho", math.inf), ("rho", math.nan), ("sparsity", math.nan),
    ("iterations", 1.5), ("nsamples", math.nan),
])
def test_bad_values_are_refused(field, value):
    with pytest.raises(StructPruneError, match=field):
        PruneConfig(method="structprune", **{field: value})


def test_sens_nsamples_zero_means_all():
    assert PruneConfig(sens_nsamples=0).sens_nsamples == 0


# -- 3. unreachable targets, missed targets ------------------------------------------------------

@pytest.mark.parametrize("family", list(FACTORIES))
@pytest.mark.parametrize("method,allocation", [("structprune", "auto"), ("structprune", "uniform"),
                                               ("wanda-sp", "uniform"), ("wanda-sp", "owl"), ("flap", "auto"),
                                               ("obs-local", "auto"), ("magnitude-sp", "threshold")])
def test_unreachable_target_is_refused_up_front(family, method, allocation, monkeypatch):
    model = FACTORIES[family]()
    monkeypatch.setitem(api.METHODS, method, lambda run: pytest.fail("a pass ran"))
    with pytest.raises(StructPruneError, match=r"largest reachable sparsity is 0\.\d+") as e:
        _prune(model, method=method, allocation=allocation, sparsity=0.97)
    assert "0.97" in str(e.value)


@pytest.mark.parametrize("family", list(FACTORIES))
def test_unreachable_target_is_refused_before_the_checkpoint_is_read(family, tmp_path, monkeypatch):
    FACTORIES[family]().save_pretrained(tmp_path / "dense")
    monkeypatch.setitem(api.METHODS, "structprune", lambda run: pytest.fail("a pass ran"))
    with pytest.raises(StructPruneError, match="largest reachable sparsity"):
        api.prune_checkpoint(tmp_path / "dense", tmp_path / "out", calib_ids(4, 16), device="cpu", progress=False,
                             method="structprune", sparsity=0.97, nsamples=4, seqlen=16)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", list(FACTORIES))
def test_reachable_limit_follows_r_min_and_mlp_multiple(family):
    model = FACTORIES[family]()
    adapter = get_adapter(model)
    lo = api.max_sparsity(adapter, PruneConfig(method="structprune", r_min=0.0))
    hi = api.max_sparsity(adapter, PruneConfig(method="structprune", r_min=0.5))
    assert 0 < hi < lo < 1
    assert api.max_sparsity(adapter, PruneConfig(method="wanda-sp", mlp_multiple=8)) < \
        api.max_sparsity(adapter, PruneConfig(method="wanda-sp"))


@pytest.mark.parametrize("family", list(FACTORIES))
def test_target_just_below_the_limit_is_delivered(family):
    model = FACTORIES[family]()
    limit = api.max_sparsity(get_adapter(model), PruneConfig(method="wanda-sp"))
    result = _prune(model, method="wanda-sp", allocation="uniform", sparsity=limit - 0.01)
    assert result.report["sparsity_achieved"] > limit - 0.1


def test_missed_target_is_an_error(monkeypatch):
    monkeypatch.setitem(api.METHODS, "wanda-sp", lambda run: [])  # a solver that cuts nothing
    with pytest.raises(StructPruneError, match=r"target 0\.4.*achieved 0\.0"):
        _prune(FACTORIES["llama-gqa"](), method="wanda-sp", allocation="uniform", sparsity=0.4)


# -- 4. non-finite sensitivities -----------------------------------------------------------------

@pytest.mark.parametrize("family", list(FACTORIES))
def test_nan_in_lm_head_is_an_error_not_a_success(family):
    model = FACTORIES[family]()
    with torch.no_grad():
        model.get_output_embeddings().weight[0, 0] = float("nan")
    with pytest.raises(StructPruneError, match=r"sensitivity of layer \d+ (attn|mlp).*not finite"):
        _prune(model, method="structprune", sparsity=0.4)


# -- 5. all_layers_pruned ----------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FACTORIES))
def test_all_layers_pruned_is_computed(family, monkeypatch):
    model = FACTORIES[family]()
    assert _prune(model, method="wanda-sp", allocation="uniform", sparsity=0.4).report["all_layers_pruned"] is True

    def first_layer_only(run):  # cuts the target's worth of MLP channels from layer 0 alone
        a = run.adapter
        layer = a.layers()[0]
        shape, m = a.attention_shape(layer), a.mlp_shape(layer)
        drop = round(run.config.sparsity * api.prunable_params(a) / m.cost_per_channel)
        plan = LayerPlan(list(range(shape.num_heads)), list(range(shape.num_kv_heads)), list(range(m.channels - drop)))
        apply_layer_plan(a, layer, plan)
        return [plan]

    monkeypatch.setitem(api.METHODS, "wanda-sp", first_layer_only)
    model = FACTORIES[family]()
    per_layer = [count_params(get_adapter(model).prunable_linears(l)) for l in get_adapter(model).layers()]
    report = _prune(model, method="wanda-sp", allocation="uniform", sparsity=0.05).report
    assert report["all_layers_pruned"] is False
    assert [count_params(get_adapter(model).prunable_linears(l)) for l in get_adapter(model).layers()][1:] == \
        per_layer[1:]


def test_a_config_stored_under_other_defaults_still_loads():
    """A stored config lists every knob; those its method ignores were the defaults of their day
    (temperature 1.0 before it became 1/32) and must not make it unreadable."""
    from structprune.config import effective_fields

    old = PruneConfig(method="wanda-sp").to_dict() | {"temperature": 1.0, "rho": 3.0}
    assert PruneConfig.from_dict(old) == PruneConfig(method="wanda-sp")
    kept = PruneConfig(method="structprune", temperature=0.5).to_dict()
    assert PruneConfig.from_dict(kept).temperature == 0.5  # a knob the method reads is kept as stored
    with pytest.raises(StructPruneError, match="temperature=1.0 is ignored"):
        PruneConfig(method="wanda-sp", temperature=1.0)  # a user's own config is still checked

    # Effective fields: "auto" resolved, unread knobs dropped, ADMM's knobs only with iterations > 1.
    auto = PruneConfig(method="structprune").to_dict() | {"allocation": "auto"}
    assert effective_fields(auto) == PruneConfig(method="structprune").effective_dict()
    assert effective_fields(auto)["allocation"] == "softmax"
    one_shot = effective_fields(PruneConfig(method="structprune", rho=3.0).to_dict())
    assert "rho" not in one_shot and "temperature" in one_shot
    assert effective_fields(PruneConfig(method="structprune", rho=3.0, iterations=2).to_dict())["rho"] == 3.0
    assert "temperature" not in PruneConfig(method="obs-local").effective_dict()
