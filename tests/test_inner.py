"""Coordination inside the MLP (solvers/inner.py): the kept rows of the input projections refitted
with the output projection through auxiliary variables. What it must do: lower the exact
calibration error of every layer it changes and never raise it, report exactly the error the
layer now has, reduce to today's refit when the penalties pin the auxiliaries, and work for gated
(SwiGLU, GeGLU, a fused gate_up) and plain (fc1/fc2) MLPs."""

from __future__ import annotations

import pytest
import torch
from tiny import calib_ids, tiny_gemma2, tiny_llama, tiny_opt, tiny_phi3

from structprune import PruneConfig, prune
from structprune.adapters import get_adapter
from structprune.engine import capture_first_layer_inputs, run_layer
from structprune.engine.activations import ActivationStore
from structprune.solvers import inner
from structprune.solvers.modules import cut_mlp
from structprune.engine.stats import collect_stats


def _layer_problem(model, keep_frac=0.5):
    """Layer 0 of ``model`` cut to half its MLP channels with today's refit (toward its own dense
    output), and the MLP's inputs and targets per chunk."""
    adapter = get_adapter(model)
    layer = adapter.layers()[0]
    ids = calib_ids(6, 24)
    inputs = capture_first_layer_inputs(model, adapter, ids, torch.device("cpu"), batch_size=2)
    xs, ts = ActivationStore(), ActivationStore()
    first = adapter.mlp_linears(layer)[0][0]
    h = [first.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach().clone())),
         adapter.mlp_output_module(layer).register_forward_hook(lambda m, a, y: ts.append(y.detach().clone()))]
    try:
        run_layer(layer, inputs, "cpu")
    finally:
        for x in h:
            x.remove()
    stats = collect_stats(adapter, layer, inputs, "cpu", modules=("mlp",))
    n = adapter.mlp_shape(layer).channels
    keep = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(1))[: int(n * keep_frac)].tolist())
    cfg = PruneConfig()
    cut_mlp(adapter, layer, stats["mlp"], keep, cfg)
    return adapter, layer, xs, ts


def _exact_error(adapter, layer, xs, ts) -> float:
    """Sum of squares of target minus the layer's MLP output, by the model's own MLP module."""
    mlp = getattr(layer, "mlp", None) or (lambda x: layer.fc2(layer.activation_fn(layer.fc1(x))))  # OPT: no module
    with torch.no_grad():
        return sum(float((t - mlp(x)).double().pow(2).sum()) for x, t in zip(xs, ts))


@pytest.mark.parametrize("factory", [tiny_llama, tiny_opt, tiny_gemma2, tiny_phi3],
                         ids=["llama-swiglu", "opt-relu", "gemma2-geglu", "phi3-fused"])
def test_refit_lowers_the_exact_error_and_reports_it(factory):
    model = factory(layers=2)
    adapter, layer, xs, ts = _layer_problem(model)
    before = _exact_error(adapter, layer, xs, ts)
    r = inner.refit_mlp_inputs(adapter, layer, xs, ts, "cpu", iterations=4, fit_bias=True, damp=0.01)
    after = _exact_error(adapter, layer, xs, ts)
    assert r["error_before"] == pytest.approx(before, rel=1e-4)
    assert r["gated"] == (factory is not tiny_opt)
    assert r["adopted"] and r["error_after"] < 0.97 * r["error_before"], r
    assert after == pytest.approx(r["error_after"], rel=1e-4)  # the layer now has the reported error


def test_refit_that_would_not_help_leaves_the_layer_unchanged(monkeypatch):
    """Penalties pinning the auxiliaries to the forward values: the rows cannot move, the output
    projection is refitted to the same least squares, so nothing beats the plain refit and the
    layer's tensors stay bit for bit what they were."""
    model = tiny_llama(layers=2)
    adapter, layer, xs, ts = _layer_problem(model)
    monkeypatch.setattr(inner, "BETA", 1e12)
    monkeypatch.setattr(inner, "GAMMA", 1e12)
    snap = {k: v.clone() for k, v in layer.mlp.state_dict().items()}
    r = inner.refit_mlp_inputs(adapter, layer, xs, ts, "cpu", iterations=2, fit_bias=True, damp=0.01)
    assert r["error_after"] == pytest.approx(r["error_before"], rel=1e-3)
    if not r["adopted"]:
        assert all(torch.equal(snap[k], v) for k, v in layer.mlp.state_dict().items())


def test_inner_iterations_in_structprune_lower_every_layers_error_and_are_logged():
    ids = calib_ids(8, 32)
    base = prune(tiny_llama(layers=3), ids, PruneConfig(sparsity=0.5, nsamples=8, seqlen=32), device="cpu",
                 progress=False)
    got = prune(tiny_llama(layers=3), ids, PruneConfig(sparsity=0.5, nsamples=8, seqlen=32, inner_iterations=3),
                device="cpu", progress=False)
    entry = [e for e in got.report["solver_log"] if "iteration" in e][-1]
    logs = entry["inner"]
    assert len(logs) == 3 and all(x["error_after"] <= x["error_before"] for x in logs)
    assert any(x["adopted"] for x in logs)
    # Same kept structures in layer 0 (its inputs are the same); the calibration objective improves.
    assert got.plans[0] == base.plans[0]
    base_obj = [e for e in base.report["solver_log"] if "iteration" in e][-1]["objective"]
    assert entry["objective"] < base_obj
    assert "inner" not in [e for e in base.report["solver_log"] if "iteration" in e][-1]


def test_inner_iterations_must_be_a_non_negative_integer():
    from structprune.errors import StructPruneError

    with pytest.raises(StructPruneError, match="inner_iterations must be >= 0"):
        PruneConfig(inner_iterations=-1)
    with pytest.raises(StructPruneError, match="inner_iterations=2 is ignored"):
        PruneConfig(method="obs-local", inner_iterations=2)


def test_the_memory_plan_counts_the_refit_when_it_is_on():
    from structprune.engine.budget import inner_refit_bytes, layer_sizes

    model = tiny_llama(layers=2)
    adapter = get_adapter(model)
    widths = [{"heads": 4, "mlp": 37}] * 2
    off = layer_sizes(adapter, widths, 4, "structprune")["solver_workspace_bytes"]
    on = layer_sizes(adapter, widths, 4, "structprune", inner=True)["solver_workspace_bytes"]
    d = adapter.attention_shape(adapter.layers()[0]).hidden_size
    assert on == max(off, inner_refit_bytes(37, d)) and on > off


def test_input_damp_is_the_input_rows_ridge_toward_their_current_values():
    """``row_damp``: the stronger, the less the kept gate/up rows move from the cut's (``None``: ``damp``)."""
    moved = []
    for row_damp in (None, 0.01, 1.0, 100.0):
        adapter, layer, xs, ts = _layer_problem(tiny_llama(layers=2))
        w0 = [w.detach().clone() for w in adapter.mlp_parts(layer)[0].in_weights()]
        inner.refit_mlp_inputs(adapter, layer, xs, ts, "cpu", iterations=3, fit_bias=True, damp=0.01,
                               row_damp=row_damp)
        w1 = adapter.mlp_parts(layer)[0].in_weights()
        moved.append(sum(float((a.detach() - b).norm() / b.norm()) for a, b in zip(w1, w0)))
    assert moved[0] == moved[1]  # None is damp
    assert moved[1] > moved[2] > moved[3] and moved[3] < 0.05 * moved[1], moved
