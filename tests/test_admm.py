"""StructPrune's ADMM (issue 11, item 1): the consensus/dual updates, residuals, stopping, the
one-shot limit, the log and the convergence plot; and the pass contract of every streamed solver
(issue 11, item 6): one loop, plain-data results and carries."""

import copy
import math

import pytest
import torch
from tiny import calib_ids, tiny_llama

from structprune import api
from structprune.engine import LayerInputs
from structprune.engine.activations import ActivationStore
from structprune.solvers.structprune import consensus_update


def _iterations(report):
    return [e for e in report["solver_log"] if "iteration" in e]


def test_consensus_update_matches_a_hand_computation():
    """u = (t + rho (z + y)) / (1 + rho), y += z - u, with w = rho y stored; the output-space sums of
    the primal residual and its tolerance (Boyd §3.3; the dual residual is in weight space)."""
    t = torch.tensor([[1.0, -2.0, 0.5]])
    z1 = torch.tensor([[0.0, -1.0, 1.5]])
    rho = 2.0
    u1, w1, s1 = consensus_update(t, z1, None, None, rho)  # first iteration: y0 = 0
    u1_hand = (t + rho * z1) / (1 + rho)
    y1_hand = z1 - u1_hand
    assert torch.allclose(u1, u1_hand) and torch.allclose(w1, rho * y1_hand)
    assert math.isclose(s1["r2"], float((z1 - u1_hand).pow(2).sum()), rel_tol=1e-6)
    assert math.isclose(s1["f2"], float((u1_hand - t).pow(2).sum()), rel_tol=1e-6)
    assert s1["n"] == 3 and math.isclose(s1["t2"], 5.25, rel_tol=1e-6)
    # Second iteration with a new penalty: the scaled dual is y = w / rho_new (no rescaling needed).
    z2 = torch.tensor([[0.5, -1.5, 1.0]])
    rho2 = 4.0
    u2, w2, s2 = consensus_update(t, z2, u1, w1, rho2)
    y_prev = w1 / rho2
    u2_hand = (t + rho2 * (z2 + y_prev)) / (1 + rho2)
    y2_hand = y_prev + z2 - u2_hand
    assert torch.allclose(u2, u2_hand) and torch.allclose(w2, rho2 * y2_hand)
    assert math.isclose(s2["u2"], float(u2_hand.pow(2).sum()), rel_tol=1e-6)
    # At a fixed point z = u the duals stop moving and both residuals vanish.
    fixed_z = t + w2  # z = u = t + rho y  solves  u = (t + rho z + w) / (1 + rho)
    u4, w4, s4 = consensus_update(t, fixed_z, fixed_z, w2, rho2)
    assert s4["r2"] < 1e-10 and torch.allclose(u4, fixed_z) and torch.allclose(w4, w2)


def test_one_iteration_is_the_one_shot_pass_whatever_rho():
    """K = 1: y0 = 0 and no previous consensus, so the W-step fits the module's own target and rho
    enters nothing but the logged primal residual: rho = 0 and rho = 5 give the same model. No dual
    residual (nothing ran that it could measure) and no fixed-point pass."""
    base = tiny_llama(layers=3)
    ids = calib_ids(6, 24)
    logits = []
    for rho in (0.0, 5.0):
        m = copy.deepcopy(base)
        r = api.prune(m, ids, device="cpu", progress=False, method="structprune", sparsity=0.4, seqlen=24,
                      iterations=1, rho=rho)
        with torch.no_grad():
            logits.append(m(ids).logits)
        (e,) = _iterations(r.report)
        assert e["rho"] == rho and math.isfinite(e["primal_residual"]) and e["dual_residual"] is None
        assert not any(x.get("fixed_point") for x in r.report["solver_log"])
    assert torch.equal(logits[0], logits[1])


def test_stopping_tolerances_reached_at_the_first_iteration_give_the_one_shot_model():
    """Loose tolerances: the residuals meet them after iteration 1, ADMM stops there, and the model
    is the one-shot one (the limit in which ADMM reduces to the one-shot pass)."""
    base = tiny_llama(layers=3)
    ids = calib_ids(6, 24)
    out = {}
    for name, kw in (("one-shot", dict(iterations=1)), ("admm", dict(iterations=5, tol_rel=100.0))):
        m = copy.deepcopy(base)
        r = api.prune(m, ids, device="cpu", progress=False, method="structprune", sparsity=0.4, seqlen=24, **kw)
        with torch.no_grad():
            out[name] = (m(ids).logits, _iterations(r.report))
    assert len(out["admm"][1]) == 1 and out["admm"][1][0]["converged"]
    assert torch.equal(out["admm"][0], out["one-shot"][0])


def _fixed_point(report):
    return next((e for e in report["solver_log"] if e.get("fixed_point")), None)


def test_admm_settled_on_the_first_cut_ends_at_the_one_shot_model():
    """The derivation's fixed point (docs/structprune.md, section 3): for fixed supports and inputs,
    ADMM's end point is every module refitted to its own target, i.e. the one-shot pass on those
    supports. A large rho pulls iteration 2's targets onto the first cut's outputs, so the kept
    structures repeat, the supports freeze, and the fixed-point pass on them is the one-shot model
    bit for bit (select = last keeps it). A wrong dual sign, a consensus streamed to the wrong
    layer or a stale input would show here."""
    base = tiny_llama(layers=3)
    ids = calib_ids(6, 24)
    out = {}
    for name, kw in (("one-shot", dict(iterations=1)),
                     ("admm", dict(iterations=4, rho=1e4, tol_abs=0.0, tol_rel=0.0, select="last"))):
        m = copy.deepcopy(base)
        r = api.prune(m, ids, device="cpu", progress=False, method="structprune", sparsity=0.4, seqlen=24, **kw)
        with torch.no_grad():
            out[name] = (m(ids).logits, _iterations(r.report), r.report)
    it = out["admm"][1]
    assert [e["iteration"] for e in it] == [1, 2] and not any(e["converged"] for e in it)
    assert [e["kept_sets_changed"] for e in it] == [True, False] and [e["rho"] for e in it] == [1e4, 2e4]
    assert it[1]["kept"] == it[0]["kept"] == out["one-shot"][1][0]["kept"]
    fp = _fixed_point(out["admm"][2])
    assert fp["supports_of"] == 2 and fp["kept"] == it[0]["kept"]
    chosen = next(e["chosen_iteration"] for e in out["admm"][2]["solver_log"] if "chosen_iteration" in e)
    assert chosen == 3  # the fixed point, numbered after the iterations
    assert fp["objective"] == it[0]["objective"]
    assert torch.equal(out["admm"][0], out["one-shot"][0])
    # Iteration 2 itself (refitted to u - y, not to t) is another model: the equality is the fixed
    # point's, not a property of any ADMM iterate.
    assert it[1]["objective"] != it[0]["objective"]


def test_rho_doubles_while_the_kept_sets_change_then_the_supports_freeze():
    """A small rho lets iteration 2's targets move away from the first cut (u - y overshoots t by
    (1 - rho) / (1 + rho) of the first cut's miss), so the kept structures change; rho doubles after
    every such iteration and never falls (no residual balancing), and the loop ends at K or when the
    kept structures repeat, followed by the fixed-point pass on the last supports."""
    m = tiny_llama(layers=3)
    ids = calib_ids(6, 24)
    r = api.prune(m, ids, device="cpu", progress=False, method="structprune", sparsity=0.4, seqlen=24, iterations=4,
                  rho=0.05, tol_abs=0.0, tol_rel=0.0, select="last")
    it = _iterations(r.report)
    # here the structures move in every iteration (measured: the channel counts go 31/17/10 ->
    # 31/17/10 (other channels) -> 30/17/11 -> 30/18/10), so all four run
    assert [e["kept_sets_changed"] for e in it] == [True] * 4 and it[2]["kept"] != it[0]["kept"]
    assert [e["rho"] for e in it] == [0.05 * 2 ** j for j in range(4)]
    fp = _fixed_point(r.report)
    assert fp["supports_of"] == len(it) and fp["kept"] == it[-1]["kept"]
    assert [len(p.to_dict()["channels"]) for p in r.plans] == [k["mlp"] for k in fp["kept"]]


def test_first_iterations_dual_residual_is_its_dual_norm():
    """The dual residual lives in weight space, s = rho |A^T (u_k - u_(k-1))| with A^T v = sum v [a; 1]^T
    over the module's calibration tokens, and u_0 is the first cut's output (not t, which fixed
    s_1 / r_1 = rho^2 before). Then u_1 - z_1 = -w_1 / rho, so s_1 = |A^T w_1|, the dual tolerance's
    norm: with tol_abs = 0 and tol_rel = 1 the two logged numbers agree, and neither is the old
    rho^2-tied output-space value (rho r_1 in output space)."""
    m = tiny_llama(layers=3)
    ids = calib_ids(6, 24)
    r = api.prune(m, ids, device="cpu", progress=False, method="structprune", sparsity=0.4, seqlen=24, iterations=2,
                  rho=3.0, tol_abs=0.0, tol_rel=1.0)
    first = _iterations(r.report)[0]
    assert first["dual_residual"] > 0
    assert math.isclose(first["dual_residual"], first["eps_dual"], rel_tol=1e-5)
    assert not math.isclose(first["dual_residual"], 3.0 * first["primal_residual"], rel_tol=1e-2)


def test_select_last_keeps_the_last_iterate_and_best_the_lowest_objective():
    m0 = tiny_llama(layers=3)
    ids = calib_ids(6, 24)
    chosen = {}
    for sel in ("best", "last"):
        m = copy.deepcopy(m0)
        r = api.prune(m, ids, device="cpu", progress=False, method="structprune", sparsity=0.4, seqlen=24,
                      iterations=3, rho=1e3, tol_abs=0.0, tol_rel=0.0, select=sel)
        it = _iterations(r.report)
        chosen[sel] = (next(e["chosen_iteration"] for e in r.report["solver_log"] if "chosen_iteration" in e), it)
    assert chosen["last"][0] == 3
    assert chosen["best"][0] == min(chosen["best"][1], key=lambda e: e["objective"])["iteration"]


def test_admm_primal_residual_falls_as_rho_grows_and_the_log_shows_every_pass():
    """rho = 1 on a tiny model (tight tolerances so that all run): as rho doubles the primal residual
    falls (the consensus closes on the outputs) while the kept structures keep moving; each
    iteration logs residuals, tolerances, rho, lambda, objective and kept counts; the fixed point on
    the last supports follows, and the lowest objective over all passes is chosen."""
    m = tiny_llama(layers=3)
    ids = calib_ids(8, 32)
    r = api.prune(m, ids, device="cpu", progress=False, method="structprune", sparsity=0.4, seqlen=32, iterations=4,
                  rho=1.0, tol_abs=0.0, tol_rel=0.0)
    it = _iterations(r.report)
    assert [e["iteration"] for e in it] == [1, 2, 3, 4] and [e["rho"] for e in it] == [1.0, 2.0, 4.0, 8.0]
    for e in it:
        assert {"objective", "consensus_objective", "primal_residual", "dual_residual", "eps_primal", "eps_dual", "rho",
                "lambda", "kept", "converged", "kept_sets_changed"} <= set(e)
        assert len(e["kept"]) == 3 and not e["converged"]
    # docs/structprune.md quotes this run: primal 33.0 -> 11.5 -> 2.86 -> 0.74; objective 0.0917 at
    # iteration 1, 0.0899 at iteration 2, 0.0897 at the fixed point on iteration 4's supports
    primal = [e["primal_residual"] for e in it]
    assert all(b < 0.5 * a for a, b in zip(primal, primal[1:]))
    fp = _fixed_point(r.report)
    obj = [e["objective"] for e in it] + [fp["objective"]]
    assert min(obj[1:]) < 0.98 * obj[0] and max(obj) < 1.02 * obj[0]
    chosen = next(e["chosen_iteration"] for e in r.report["solver_log"] if "chosen_iteration" in e)
    assert chosen == 1 + obj.index(min(obj)) and chosen > 1


def test_convergence_plot_is_written_and_named(tmp_path):
    from structprune.plots import write_run_plots

    m = tiny_llama(layers=3)
    r = api.prune(m, calib_ids(6, 24), device="cpu", progress=False, method="structprune", sparsity=0.4, seqlen=24,
                  iterations=3, tol_abs=0.0, tol_rel=0.0)
    plots = write_run_plots(r.report, tmp_path)
    assert plots.get("convergence") == "convergence.png" and (tmp_path / "convergence.png").stat().st_size > 0


def test_admm_on_disk_equals_in_memory(tmp_path):
    """The consensus and dual variables are activation stores: with a zero activation budget they
    live on disk, and the result is the same model bit for bit."""
    base = tiny_llama(layers=3)
    ids = calib_ids(6, 24)
    logits = []
    for budget in (None, 0):
        m = copy.deepcopy(base)
        api.prune(m, ids, device="cpu", progress=False, method="structprune", sparsity=0.4, seqlen=24, iterations=3,
                  tol_abs=0.0, tol_rel=0.0, activation_budget=budget, offload_dir=str(tmp_path))
        with torch.no_grad():
            logits.append(m(ids).logits)
    assert torch.equal(logits[0], logits[1])


def test_in_memory_prune_bounds_its_activations_by_default(monkeypatch, tmp_path):
    """With no budget given, prune() keeps at most a quarter of the available memory of
    activations in RAM and spills the rest (ADMM's consensus and duals at 32x2048 outgrow a 135M
    model 35 times): here 4 KiB are "available", so 1 KiB stays resident; same model as unbounded."""
    from structprune import memory

    monkeypatch.delenv("STRUCTPRUNE_ACTIVATION_BUDGET", raising=False)
    base = tiny_llama(layers=3)
    ids = calib_ids(6, 24)
    kw = dict(device="cpu", progress=False, method="structprune", sparsity=0.4, seqlen=24, iterations=2,
              tol_abs=0.0, tol_rel=0.0, offload_dir=str(tmp_path))
    unbounded = copy.deepcopy(base)
    api.prune(unbounded, ids, activation_budget="inf", **kw)
    monkeypatch.setattr(memory, "available_memory", lambda: 4096)
    bounded = copy.deepcopy(base)
    mem = api.prune(bounded, ids, **kw).report["memory"]
    assert mem["activation_budget"] == 1024
    assert mem["activations_peak_ram_bytes"] <= 1024 < mem["activations_spilled_bytes"]
    with torch.no_grad():
        assert torch.equal(bounded(ids).logits, unbounded(ids).logits)


# -- the pass contract (solvers/passes.py) ----------------------------------------------------------

def _plain(x, where):
    if isinstance(x, (torch.Tensor, LayerInputs, ActivationStore, str, int, float, bool)) or x is None:
        return
    if isinstance(x, (list, tuple)):
        for v in x:
            _plain(v, where)
        return
    if isinstance(x, dict):
        for k, v in x.items():
            assert isinstance(k, (str, int)), (where, k)
            _plain(v, where)
        return
    raise AssertionError(f"{where}: {type(x).__name__} in a pass result or carry")


@pytest.mark.parametrize("method,kw", [("structprune", {}), ("structprune", {"iterations": 2}),
                                       ("structprune", {"allocation": "uniform"}), ("obs-local", {}),
                                       ("wanda-sp", {}), ("wanda-sp", {"allocation": "owl"}), ("flap", {}),
                                       ("magnitude-sp", {}), ("global", {})])
def test_every_streamed_pass_runs_through_run_pass_with_plain_data(method, kw, monkeypatch):
    """Every layer of every pass goes through the one loop, and its step returns and carries plain
    data only (what a resumed run can save and load)."""
    import structprune.solvers.passes as passes

    real, seen = passes.run_pass, []

    def checked(run, desc, step, carry=None, **k):
        def wrapped(ctx, c):
            result, c = step(ctx, c)
            _plain(result, desc)
            _plain(c, desc)
            return result, c
        results, carry = real(run, desc, wrapped, carry, **k)
        seen.append((desc, len(results)))
        return results, carry

    for mod in ("structprune", "local", "flap", "profile", "global_ref"):
        monkeypatch.setattr(f"structprune.solvers.{mod}.run_pass", checked)
    m = tiny_llama(layers=3)
    r = api.prune(m, calib_ids(6, 24), device="cpu", progress=False, method=method, sparsity=0.3, seqlen=24, **kw)
    assert seen and all(n == 3 for _, n in seen)
    assert len(r.plans) == 3


def test_one_iterations_consensus_and_duals_at_a_time(tmp_path):
    """Each layer's previous u and w are released once its step has used them, so a third
    iteration does not hold two iterations' worth of them: with everything spilled to disk, the
    peak on disk of K = 3 exceeds K = 2's (one state) by about one layer's u and w, not by a
    whole state (before: twice the state at the start of iteration 3)."""
    base = tiny_llama(layers=4)
    ids = calib_ids(6, 24)
    peaks = {}
    for k in (2, 3):
        r = api.prune(copy.deepcopy(base), ids, device="cpu", progress=False, method="structprune", sparsity=0.4,
                      seqlen=24, iterations=k, tol_abs=0.0, tol_rel=0.0, activation_budget=0,
                      offload_dir=str(tmp_path))
        assert [e["iteration"] for e in r.report["solver_log"] if "iteration" in e] == list(range(1, k + 1))
        peaks[k] = r.report["memory"]["activations_spilled_bytes"]
    hidden = base.config.hidden_size
    one_store = ids.numel() * hidden * 4  # one module's u (or w) of one layer, float32
    state = 4 * 2 * 2 * one_store  # layers x modules x (u, w)
    # Iteration 2 holds the rest of iteration 1's state, its own so far and one layer's temporaries.
    assert peaks[3] - peaks[2] <= 2 * 2 * one_store + 2 * one_store < state


@pytest.mark.parametrize("target", ["own", "dense"])
def test_objective_from_the_profiles_final_states_equals_the_dense_trajectorys(target, monkeypatch):
    """With the ``own`` target the ADMM passes take the objective's reference (the dense model's
    final hidden states) from the profile pass instead of running every dense layer again: the
    same objectives bit for bit and the same model, one dense forward fewer per layer and pass. The
    ``dense`` target still follows the dense trajectory (its targets need it)."""
    from structprune.solvers import structprune as sp

    base = tiny_llama(layers=3)
    ids = calib_ids(6, 24)
    real_dense, real_profile = sp._dense_module_outputs, sp.sensitivities_and_paths
    runs = {}
    for reuse in (True, False):
        calls = []
        monkeypatch.setattr(sp, "_dense_module_outputs", lambda *a, **k: calls.append(1) or real_dense(*a, **k))
        if not reuse:  # the former way: no final states handed over, the passes follow the dense trajectory
            monkeypatch.setattr(sp, "sensitivities_and_paths", lambda run, T: (*real_profile(run, T)[:2], None))
        m = copy.deepcopy(base)
        r = api.prune(m, ids, device="cpu", progress=False, method="structprune", sparsity=0.4, seqlen=24,
                      iterations=2, tol_abs=0.0, tol_rel=0.0, target=target)
        with torch.no_grad():
            runs[reuse] = ([e["objective"] for e in _iterations(r.report)], m(ids).logits, len(calls))
        monkeypatch.setattr(sp, "sensitivities_and_paths", real_profile)
    assert runs[True][0] == runs[False][0] and all(math.isfinite(o) for o in runs[True][0])
    assert torch.equal(runs[True][1], runs[False][1])
    assert runs[False][2] == 3 * 3  # every layer of both iterations and of the fixed-point pass
    assert runs[True][2] == (0 if target == "own" else 3 * 3)
