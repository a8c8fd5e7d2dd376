"""Coordination inside the attention (solvers/values.py): the kept heads' value rows refitted with
the output projection, the attention probabilities frozen. What it must do: reproduce the heads'
outputs from ``[P_h X, 1]`` through the family's own attention function (rope, GQA, biases, sliding
windows, soft-capping), never raise a layer's exact calibration error and report the error the
layer then has, give the same weights whatever the batching of KV groups, and change nothing when off."""

from __future__ import annotations

import pytest
import torch
from tiny import calib_ids, tiny_gemma2, tiny_llama, tiny_mistral, tiny_opt, tiny_phi3, tiny_qwen2

from structprune import PruneConfig, prune
from structprune.adapters import get_adapter
from structprune.engine import capture_first_layer_inputs, collect_stats, run_layer
from structprune.engine.activations import ActivationStore
from structprune.solvers import values
from structprune.solvers.modules import cut_attention

FAMILIES = {"llama-gqa-sdpa": tiny_llama, "qwen2-vbias": tiny_qwen2, "mistral": tiny_mistral,
            "gemma2-sliding-softcap": tiny_gemma2, "phi3-fused-qkv": tiny_phi3, "opt-mha": tiny_opt}


def _inputs(model, n=4, seqlen=12):
    adapter = get_adapter(model)
    return adapter, capture_first_layer_inputs(model, adapter, calib_ids(n, seqlen), torch.device("cpu"), batch_size=2)


def _attention_io(adapter, layer, inputs):
    """Per chunk: what enters o_proj (the heads' outputs) and what leaves it, by the model's own forward."""
    zs, ys = ActivationStore(), ActivationStore()
    o = adapter.attn_linears(layer)[1]
    hs = [o.register_forward_pre_hook(lambda m, a: zs.append(a[0].detach().clone())),
          o.register_forward_hook(lambda m, a, y: ys.append(y.detach().clone()))]
    try:
        run_layer(layer, inputs, "cpu")
    finally:
        for h in hs:
            h.remove()
    return zs, ys


def _value_matrix(adapter, layer):
    w, b = adapter.value_rows(layer)
    V = w.detach().double()
    return torch.cat([V, b.detach().double()[:, None]], 1) if b is not None else V


@pytest.mark.parametrize("wide", [True, False], ids=["wide", "head-dim-slices"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_mixed_inputs_reproduce_the_head_outputs(name, wide):
    """``Y_h W~_g^T`` (``Y_h = [P_h X, 1]`` from the probe) equals what enters o_proj, head by head;
    so does the probe's own ``z`` for the current rows. ``layers=2`` gives Gemma 2 a sliding layer
    (window 5 < 12 tokens) and soft-capping; Qwen2 has v biases, OPT plain multi-head attention."""
    model = FAMILIES[name](layers=2)
    adapter, inputs = _inputs(model)
    layer = adapter.layers()[0]
    zs, _ = _attention_io(adapter, layer, inputs)
    V = _value_matrix(adapter, layer)
    bias = V.shape[1] != adapter.value_rows(layer)[0].shape[1]
    assert bias == (name in ("qwen2-vbias", "opt-mha"))
    s = adapter.attention_shape(layer)
    n_rep, dh = s.num_heads // s.num_kv_heads, s.head_dim
    sweep = values._Sweep(adapter, layer, inputs, "cpu")
    sweep.wide = wide
    worst = []

    def check(c, call):
        Y = call.mixed_inputs(range(s.num_kv_heads), bias)  # [tokens, heads, d (+1)]
        z_true = zs[c].reshape(Y.shape[0], -1).double()
        z = torch.cat([Y[:, h].double() @ V[(h // n_rep) * dh:(h // n_rep + 1) * dh].T for h in range(s.num_heads)], 1)
        scale = float(z_true.abs().max())
        worst.append(float((z - z_true).abs().max()) / scale)
        worst.append(float((call.outputs(V, bias).double() - z_true).abs().max()) / scale)
    sweep.run(check)
    assert len(worst) == 2 * len(zs) and max(worst) < 2e-6, (name, max(worst))


def _cut_problem(factory, layers=2, seed=1):
    """Layer 0 of a tiny model with two thirds of its query heads kept (one per group dropped where
    groups have several) and o_proj refitted to the attention's dense output; the targets per chunk."""
    model = factory(layers=layers)
    adapter, inputs = _inputs(model, n=6, seqlen=16)
    layer = adapter.layers()[0]
    _, ys = _attention_io(adapter, layer, inputs)
    s = adapter.attention_shape(layer)
    g = torch.Generator().manual_seed(seed)
    n_rep = s.num_heads // s.num_kv_heads
    if n_rep > 1:
        heads = [grp * n_rep + h for grp in range(s.num_kv_heads)
                 for h in sorted(torch.randperm(n_rep, generator=g)[: n_rep - 1].tolist())]
        groups = list(range(s.num_kv_heads))
    else:
        groups = sorted(torch.randperm(s.num_kv_heads, generator=g)[: (2 * s.num_kv_heads) // 3].tolist())
        heads = groups
    stats = collect_stats(adapter, layer, inputs, "cpu", modules=("attn",))
    cut_attention(adapter, layer, stats["attn"], heads, groups, PruneConfig())
    return adapter, layer, inputs, ys


def _exact_error(adapter, layer, inputs, ys) -> float:
    _, out = _attention_io(adapter, layer, inputs)
    return sum(float((t.double() - y.double()).pow(2).sum()) for t, y in zip(ys, out))


@pytest.mark.parametrize("name", ["llama-gqa-sdpa", "qwen2-vbias", "gemma2-sliding-softcap", "phi3-fused-qkv",
                                  "opt-mha"])
def test_refit_lowers_the_exact_error_and_reports_it(name):
    adapter, layer, inputs, ys = _cut_problem(FAMILIES[name])
    before = _exact_error(adapter, layer, inputs, ys)
    r = values.refit_values(adapter, layer, inputs, lambda c: ys[c], "cpu", iterations=4, fit_bias=True, damp=0.01)
    after = _exact_error(adapter, layer, inputs, ys)
    assert r["error_before"] == pytest.approx(before, rel=1e-4)
    assert r["group_batches"] == 1 and r["passes"] == 4 + 2
    assert r["adopted"] and r["error_after"] < 0.97 * r["error_before"], r
    assert after == pytest.approx(r["error_after"], rel=1e-4)  # the layer now has the reported error
    print(name, r["error_before"], r["error_after"])


def test_refit_that_would_not_help_leaves_the_layer_unchanged(monkeypatch):
    """``gamma`` pinning ``q`` to the forward outputs: the value rows cannot move, o_proj is refitted to
    the same least squares, so nothing beats the plain refit and the tensors stay bit for bit."""
    adapter, layer, inputs, ys = _cut_problem(tiny_llama)
    monkeypatch.setattr(values, "GAMMA", 1e12)
    snap = {k: v.clone() for k, v in layer.self_attn.state_dict().items()}
    r = values.refit_values(adapter, layer, inputs, lambda c: ys[c], "cpu", iterations=2, fit_bias=True, damp=0.01)
    # The value rows stay where they were; o_proj's final refit dampens with its kept Gram's diagonal
    # (cut_attention's with the dense one's), a difference of a fraction of a percent on 96 tokens.
    assert r["error_refit"] == pytest.approx(r["error_before"], rel=1e-2)
    assert r["error_after"] <= r["error_before"]
    v = layer.self_attn.v_proj.weight.detach()  # q equals z up to float32 rounding: the rows move by that
    assert torch.allclose(v, snap["v_proj.weight"], rtol=0, atol=1e-4 * float(v.abs().max()))
    if not r["adopted"]:
        assert all(torch.equal(snap[k], v) for k, v in layer.self_attn.state_dict().items())


@pytest.mark.parametrize("name", ["llama-gqa-sdpa", "qwen2-vbias"])
def test_one_group_per_batch_gives_the_same_weights(name):
    """A byte budget that holds one KV group: one capture per group and iteration, the Grams' factors
    kept in an activation store between iterations; the weights are those of all groups at once."""
    got = {}
    for batch_bytes in (None, 1):
        adapter, layer, inputs, ys = _cut_problem(FAMILIES[name])
        r = values.refit_values(adapter, layer, inputs, lambda c: ys[c], "cpu", iterations=3, fit_bias=True,
                                damp=0.01, batch_bytes=batch_bytes)
        assert r["adopted"]
        got[batch_bytes] = (r, {k: v.clone() for k, v in layer.self_attn.state_dict().items()})
    (r_all, w_all), (r_one, w_one) = got[None], got[1]
    kv = adapter.attention_shape(layer).num_kv_heads
    assert r_all["group_batches"] == 1 and r_one["group_batches"] == kv > 1
    assert r_one["passes"] == kv + (3 - 1) + 2  # the Grams: one capture per group; then one pass per iteration
    assert r_one["error_after"] == r_all["error_after"]
    for k in w_all:
        assert torch.equal(w_all[k], w_one[k]), k


def _iteration_entry(result):
    return [e for e in result.report["solver_log"] if "iteration" in e][-1]


def test_value_iterations_in_structprune_lower_every_layers_error_and_are_logged():
    ids = calib_ids(8, 32)
    cfg = dict(sparsity=0.5, nsamples=8, seqlen=32)
    base = prune(tiny_llama(layers=3), ids, PruneConfig(**cfg), device="cpu", progress=False)
    got = prune(tiny_llama(layers=3), ids, PruneConfig(**cfg, value_iterations=3), device="cpu", progress=False)
    entry = _iteration_entry(got)
    logs = entry["values"]
    assert len(logs) == 3 and all(x["error_after"] <= x["error_before"] for x in logs)
    assert all(x["adopted"] == (x["error_refit"] < x["error_before"]) for x in logs)
    assert any(x["adopted"] for x in logs)
    assert all(x["group_batches"] == 1 and x["seconds"] > 0 and x["workspace_bytes"] > 0 for x in logs)
    assert got.plans[0] == base.plans[0]  # layer 0's inputs are the same: so is its cut
    print("objective", _iteration_entry(base)["objective"], "->", entry["objective"],
          [(round(x["error_before"], 3), round(x["error_after"], 3)) for x in logs])
    assert "values" not in _iteration_entry(base)


def test_off_never_runs_the_refit(monkeypatch):
    """value_iterations = 0 (the default) does not touch the refit: every result is today's."""
    import structprune.solvers.structprune as sp

    def boom(*a, **k):
        raise AssertionError("refit_values ran with value_iterations = 0")
    monkeypatch.setattr(sp, "refit_values", boom)
    prune(tiny_llama(layers=2), calib_ids(4, 16), PruneConfig(sparsity=0.4, nsamples=4, seqlen=16), device="cpu",
          progress=False)


def test_an_attention_that_bypasses_the_interface_is_skipped_with_a_note(monkeypatch):
    """A family whose attention does not call transformers' attention function: the layer is left as it
    was and its log entry says why."""
    adapter, layer, inputs, ys = _cut_problem(tiny_llama)
    monkeypatch.setattr(values, "_register", lambda: None)  # the probe is then never called:
    monkeypatch.setattr(values, "PROBE", "sdpa")  # the sweep runs the real attention, which reaches o_proj
    snap = {k: v.clone() for k, v in layer.self_attn.state_dict().items()}
    r = values.refit_values(adapter, layer, inputs, lambda c: ys[c], "cpu", iterations=2, fit_bias=True, damp=0.01)
    assert not r["adopted"] and "attention function" in r["skipped"]
    assert all(torch.equal(snap[k], v) for k, v in layer.self_attn.state_dict().items())


def test_value_iterations_must_be_a_non_negative_integer():
    from structprune.errors import StructPruneError

    with pytest.raises(StructPruneError, match="value_iterations must be >= 0"):
        PruneConfig(value_iterations=-1)
    with pytest.raises(StructPruneError, match="value_iterations must be an integer"):
        PruneConfig(value_iterations=1.5)
    with pytest.raises(StructPruneError, match="value_iterations=2 is ignored"):
        PruneConfig(method="obs-local", value_iterations=2)
    assert PruneConfig.from_dict({k: v for k, v in PruneConfig().to_dict().items()
                                  if k != "value_iterations"}).value_iterations == 0  # stored before the knob


def test_the_cli_flag_reaches_the_config_and_a_bad_value_is_one_line(tmp_path, capsys, monkeypatch,
                                                                     make_tiny_llama, byte_tokenizer):
    import structprune.api as api
    from structprune.cli import main

    path = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(path)
    byte_tokenizer.save_pretrained(path)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"The quick brown fox {i} jumps over the lazy dog." for i in range(400)))
    seen = {}

    def stop(*a, **k):
        from structprune.errors import StructPruneError

        seen["config"] = k.get("config") or next(x for x in a if isinstance(x, PruneConfig))
        raise StructPruneError("stopped by the test")
    monkeypatch.setattr(api, "prune", stop)
    monkeypatch.setattr(api, "prune_checkpoint", stop)
    args = ["prune", str(path), "--sparsity", "0.4", "--calib", str(calib), "--nsamples", "2", "--seqlen", "64",
            "--eval", "", "--output", str(tmp_path / "out"), "-q"]
    assert main(args + ["--value-iterations", "3"]) == 2
    assert seen["config"].value_iterations == 3 and seen["config"].method == "structprune"
    capsys.readouterr()
    seen.clear()
    assert main(args + ["--value-iterations", "-2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "structprune: error: value_iterations must be >= 0 (0: off), got -2" and not seen


def test_the_memory_plan_counts_the_value_refit_when_it_is_on():
    from structprune.engine.budget import layer_sizes, value_batches, value_refit_bytes

    adapter = get_adapter(tiny_llama(layers=2))
    widths = [{"heads": 6, "kv_heads": 2, "mlp": 37}] * 2
    off = layer_sizes(adapter, widths, 4, "structprune")["solver_workspace_bytes"]
    on = layer_sizes(adapter, widths, 4, "structprune", values=True, chunk_tokens=2048)["solver_workspace_bytes"]
    assert on == max(off, value_refit_bytes(2, 3, 8, 48, 2048)) and on > off
    # a 7B MHA layer (32 groups, d = 4096, 2048-token chunks): its Grams alone are 4.3 GB, so batches
    assert len(value_batches(32, 1, 4096, 2048)) > 1
    assert value_refit_bytes(32, 1, 128, 4096, 2048) < 2 * 2**30


def test_input_damp_is_the_value_rows_ridge_toward_their_current_values():
    """``row_damp`` is the value rows' own ridge (``damp`` still dampens o_proj): the stronger it is, the
    less the rows move from where the cut left them, and ``None`` is ``damp`` bit for bit."""
    moved, errors = [], []
    for row_damp in (0.01, 1.0, 100.0):
        adapter, layer, inputs, ys = _cut_problem(tiny_llama)
        v0 = layer.self_attn.v_proj.weight.detach().clone()
        r = values.refit_values(adapter, layer, inputs, lambda c: ys[c], "cpu", iterations=3, fit_bias=True,
                                damp=0.01, row_damp=row_damp)
        moved.append(float((layer.self_attn.v_proj.weight.detach() - v0).norm() / v0.norm()))
        errors.append(r["error_after"])
    assert moved[0] > moved[1] > moved[2] and moved[2] < 0.05 * moved[0], moved
    assert errors[0] < errors[2]  # on its own calibration tokens the weaker ridge fits better
    got = []
    for row_damp in (None, 0.01):
        adapter, layer, inputs, ys = _cut_problem(tiny_llama)
        values.refit_values(adapter, layer, inputs, lambda c: ys[c], "cpu", iterations=2, fit_bias=True,
                            damp=0.01, row_damp=row_damp)
        got.append({k: v.clone() for k, v in layer.self_attn.state_dict().items()})
    assert all(torch.equal(got[0][k], got[1][k]) for k in got[0])


def test_input_damp_is_refused_where_nothing_reads_it_and_changes_the_pruned_model():
    from structprune.config import effective_fields
    from structprune.errors import StructPruneError

    with pytest.raises(StructPruneError, match="input_damp=0.1 is read only by the input-row refits"):
        PruneConfig(input_damp=0.1)
    with pytest.raises(StructPruneError, match="input_damp must be finite and > 0"):
        PruneConfig(value_iterations=1, input_damp=0.0)
    with pytest.raises(StructPruneError, match="input_damp=0.1 is ignored"):
        PruneConfig(method="obs-local", input_damp=0.1)
    # A stored config from before the knob reads as the default; an unread value drops out.
    old = {k: v for k, v in PruneConfig(value_iterations=2).to_dict().items() if k != "input_damp"}
    assert effective_fields(old) == PruneConfig(value_iterations=2).effective_dict()
    assert "input_damp" not in PruneConfig().effective_dict()
    ids = calib_ids(8, 32)
    base = dict(sparsity=0.5, nsamples=8, seqlen=32, value_iterations=2, inner_iterations=2)
    runs = {d: prune(tiny_llama(layers=2), ids, PruneConfig(**base, input_damp=d), device="cpu", progress=False)
            for d in (None, 0.01, 10.0)}
    sd = {d: r.model.state_dict() for d, r in runs.items()}
    assert all(torch.equal(sd[None][k], sd[0.01][k]) for k in sd[None])  # None is damp (0.01)
    assert any(not torch.equal(sd[None][k], sd[10.0][k]) for k in sd[None] if k in sd[10.0]
               and sd[None][k].shape == sd[10.0][k].shape)
