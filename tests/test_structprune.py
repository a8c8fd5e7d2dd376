"""StructPrune: allocation limits, streamed sensitivities, budget, memory model, quality."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import FACTORIES, FAMILIES, calib_ids, final_state_distortion, tiny_llama, tiny_qwen2_moe

from structprune import api
from structprune.adapters import get_adapter
from structprune.allocation.softmax import ENERGY_FLOOR, EnergyScale, Menu, allocate_kept, allocate_prefixes
from structprune.engine import capture_first_layer_inputs, is_materialized
from structprune.engine.sensitivity import module_sensitivities


def _menus():
    g = torch.Generator().manual_seed(0)
    out = []
    for layer in range(4):
        for mod, n, c in (("attn", 4, 50.0), ("mlp", 100, 6.0)):  # MLP ~3/4 of the cost, as in real models
            errs = sorted((torch.rand(n, generator=g) * (layer + 1)).tolist())
            out.append(Menu(layer, mod, n * c, [c] * n, errs))
    return out


def test_allocation_meets_budget_at_every_temperature():
    menus = _menus()
    full = sum(m.full_cost for m in menus)
    for T in (0.0, 0.3, 1.0, 10.0, math.inf):
        kept, _ = allocate_kept(menus, 0.6 * full, T)
        # T = 0 is a step function of lambda: exact up to one step's cost.
        assert abs(sum(kept) - 0.6 * full) <= (50.0 if T == 0 else 1e-6 * full)
        prefixes, _ = allocate_prefixes(menus, 0.6 * full, T)
        got = sum(m.kept[k] for m, k in zip(menus, prefixes))
        assert abs(got - 0.6 * full) <= 6.0, (T, got)  # within one MLP step


def test_temperature_limits():
    menus = _menus()
    full = sum(m.full_cost for m in menus)
    kept, _ = allocate_kept(menus, 0.5 * full, math.inf)
    fracs = {round(k / m.full_cost, 6) for k, m in zip(kept, menus)}
    assert len(fracs) == 1  # T = inf: the same fraction everywhere (uniform)
    kept_hot, _ = allocate_kept(menus, 0.5 * full, 1e4)
    assert max(abs(a - b) / m.full_cost for a, b, m in zip(kept_hot, kept, menus)) < 0.05
    # T = 0: a hard threshold; every step above it kept, every one below removed.
    kept0, lam = allocate_kept(menus, 0.5 * full, 0.0)
    cold, _ = allocate_kept(menus, 0.5 * full, 1e-4)
    assert max(abs(a - b) for a, b in zip(kept0, cold)) < 1e-3 * full
    # Heterogeneous layers get heterogeneous widths at finite T (later layers' errors are larger here).
    kept1, _ = allocate_kept(menus, 0.5 * full, 1.0)
    mlp = [k / m.full_cost for k, m in zip(kept1, menus) if m.module == "mlp"]
    assert mlp[-1] > mlp[0]


def test_shared_standardisation_is_one_temperature_for_both_bisections():
    """With ``std``/``robust`` the MLP re-solve reads the energies on the scale of the first bisection:
    its kept costs are the first allocation's, shifted by one lambda (the attention rounding's rest),
    not re-standardised over the MLP menus alone (``std-split``: another effective temperature)."""
    menus = _menus()
    # Attention energies far above the MLP's: over all modules the sd is large, over MLP ones small.
    for m in menus:
        if m.module == "attn":
            m.step_errors[:] = [e * 1e6 for e in m.step_errors]
    full = sum(m.full_cost for m in menus)
    mlp = [m for m in menus if m.module == "mlp"]
    for kind in ("std", "robust"):
        scale = EnergyScale.of(menus, kind)
        prefixes, _ = allocate_prefixes(menus, 0.5 * full, 0.5, kind)
        rest = 0.5 * full - sum(m.kept[k] for m, k in zip(menus, prefixes) if m.module == "attn")
        expect, _ = allocate_kept(mlp, rest, 0.5, scale)
        got = [m.kept[k] for m, k in zip(menus, prefixes) if m.module == "mlp"]
        assert max(abs(a - b) for a, b in zip(got, expect)) <= 6.0 + 1e-9  # rounding: one MLP step
    # The split rule standardises the MLP menus alone (median and sd of those): here a much smaller
    # sd, so a colder effective temperature and a different allocation of the same rest.
    split, _ = allocate_kept(mlp, rest, 0.5)
    shared, _ = allocate_kept(mlp, rest, 0.5, EnergyScale.of(menus, "std"))
    assert max(abs(a - b) for a, b in zip(split, shared)) > 50.0
    with pytest.raises(ValueError, match="energy_scale"):
        allocate_prefixes(menus, 0.5 * full, 0.5, "mad")


def test_robust_scale_floors_tiny_errors_and_ignores_them_in_the_spread():
    """A dead channel's near-zero error must not stretch the scale: robust energies are floored at
    ENERGY_FLOOR times the median ratio, and the scale is the MAD's, unmoved by such outliers."""
    menus = _menus()
    base = EnergyScale.of(menus, "robust")
    std = EnergyScale.of(menus, "std")
    for m in menus[1::4]:  # a few MLP steps with errors of exactly 0 or 1e-25
        m.step_errors[0] = 0.0
        m.step_errors[1] = 1e-25
    hit = EnergyScale.of(menus, "robust")
    assert abs(hit.scale - base.scale) / base.scale < 0.05 and abs(hit.center - base.center) < 0.05
    assert EnergyScale.of(menus, "std").scale > 2 * std.scale  # the plain sd is dragged by log(1e-30)
    eps = hit.apply(menus[1])
    assert float(eps.min()) == pytest.approx((hit.floor - hit.center) / hit.scale)
    assert hit.floor == pytest.approx(hit.center + math.log(ENERGY_FLOOR), abs=1e-9)
    # Steps above the floor keep their order; the allocation still meets the budget.
    full = sum(m.full_cost for m in menus)
    prefixes, _ = allocate_prefixes(menus, 0.6 * full, 0.5, "robust")
    assert abs(sum(m.kept[k] for m, k in zip(menus, prefixes)) - 0.6 * full) <= 6.0


def test_energy_scale_is_a_structprune_softmax_knob():
    from structprune import PruneConfig
    from structprune.errors import StructPruneError

    assert PruneConfig(energy_scale="robust").energy_scale == "robust"
    with pytest.raises(StructPruneError, match="unknown energy_scale"):
        PruneConfig(energy_scale="mad")
    with pytest.raises(StructPruneError, match="energy_scale='robust' is ignored"):
        PruneConfig(method="structprune", allocation="uniform", energy_scale="robust")


def test_streamed_sensitivities_equal_full_backward():
    model = tiny_llama(layers=3)
    adapter = get_adapter(model)
    ids = calib_ids(4, 16)
    inputs = capture_first_layer_inputs(model, adapter, ids, torch.device("cpu"), batch_size=2)
    # The plain mean over every token (no positions skipped, no trimming): what the reference computes.
    sens = module_sensitivities(model, adapter, inputs, ids, "cpu", progress=False, skip_positions=0, trim=0.0)
    # Reference: whole model, autograd, the same loss (each window's mean token NLL, summed over windows).
    sq = {(i, k): 0.0 for i in range(3) for k in ("attn", "mlp")}
    for start in (0, 2):
        hooks = []
        for i, layer in enumerate(adapter.layers()):
            for k, mod in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
                def fw(m, a, y, key=(i, k)):
                    y.register_hook(lambda g: sq.__setitem__(key, sq[key] + float(g.pow(2).sum())))
                hooks.append(mod.register_forward_hook(fw))
        chunk = ids[start:start + 2]
        logits = model(chunk).logits[:, :-1]
        (F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
         / (chunk.shape[1] - 1)).backward()
        for h in hooks:
            h.remove()
    model.zero_grad(set_to_none=True)
    for i in range(3):
        for k in ("attn", "mlp"):
            ref = sq[(i, k)] / (ids.numel() * 48)
            assert abs(sens[i][k] - ref) / ref < 1e-4, (i, k, sens[i][k], ref)


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_structprune_budget_and_log(family):
    model = FACTORIES[family](layers=3)
    ids = calib_ids(6, 24)
    r = api.prune(model, ids, device="cpu", progress=False, method="structprune", sparsity=0.4, seqlen=24,
                  iterations=2)
    assert r.config.allocation == "softmax"
    assert abs(r.report["sparsity_achieved"] - 0.4) < 0.03  # tiny models: one MLP channel is ~1%
    iters = [e for e in r.report["solver_log"] if "iteration" in e]
    assert [e["iteration"] for e in iters] == [1, 2]
    for e in iters:
        assert {"objective", "primal_residual", "dual_residual", "lambda", "kept"} <= set(e)
        assert len(e["kept"]) == 3
    # Report widths are the real module shapes.
    adapter = get_adapter(model)
    assert r.report["layers"] == [adapter.layer_widths(l) for l in adapter.layers()]


def test_structprune_sparsity_lands_on_target_on_a_medium_model():
    model = _medium()
    ids = calib_ids(4, 32)
    for s in (0.2, 0.5):
        m = copy.deepcopy(model)
        r = api.prune(m, ids, device="cpu", progress=False, method="structprune", sparsity=s, seqlen=32,
                      iterations=1)
        assert abs(r.report["sparsity_achieved"] - s) < 0.01, r.report["sparsity_achieved"]


def _medium():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_structprune_beats_wanda_sp_on_final_state_distortion():
    base = tiny_llama(layers=3)
    ids = calib_ids(8, 32)
    ref = final_state_distortion(base, ids)
    dist = {}
    for method in ("wanda-sp", "structprune"):
        m = copy.deepcopy(base)
        api.prune(m, ids, device="cpu", progress=False, method=method, sparsity=0.4, seqlen=32)
        dist[method] = final_state_distortion(m, ids, ref)
    assert dist["structprune"] < 0.5 * dist["wanda-sp"], dist


def test_structprune_keeps_one_layer_resident():
    model = tiny_llama(layers=3)
    adapter = get_adapter(model)
    seen = []
    hooks = [l.register_forward_pre_hook(lambda m, a, k: seen.append(sum(is_materialized(x) for x in adapter.layers())),
                                         with_kwargs=True) for l in adapter.layers()]
    api.prune(model, calib_ids(4, 16), device="cpu", progress=False, method="structprune", sparsity=0.3,
              seqlen=16, iterations=1, swap_layers=True)
    for h in hooks:
        h.remove()
    assert seen and max(seen) == 1


def test_profile_cache_gives_identical_results():
    base = tiny_llama(layers=3)
    ids = calib_ids(4, 16)
    cache = {}
    outs = []
    for _ in range(2):
        m = copy.deepcopy(base)
        api.prune(m, ids, device="cpu", progress=False, method="structprune", sparsity=0.4, seqlen=16,
                  iterations=1, cache=cache)
        with torch.no_grad():
            outs.append(m(ids).logits)
    assert sorted(k[0] for k in cache) == ["structprune-profile", "structprune-sensitivities"]
    assert torch.equal(outs[0], outs[1])


def test_trajectory_target_moves_the_final_states_toward_the_dense_trajectory():
    """The trajectory target (``target="dense"``: the dense output plus the residual gap) trades
    each module's own reconstruction for the residual stream's: on the calibration windows the
    final states end closer to dense than with every module refitted to its own output."""
    base = tiny_llama(layers=3)
    ids = calib_ids(8, 32)
    ref = final_state_distortion(base, ids)
    dist = {}
    for target in ("own", "dense"):
        m = copy.deepcopy(base)
        api.prune(m, ids, device="cpu", progress=False, method="structprune", sparsity=0.4, seqlen=32, target=target)
        dist[target] = final_state_distortion(m, ids, ref)
    assert dist["dense"] < 0.9 * dist["own"], dist


def test_unknown_target_and_negative_rho_are_refused():
    from structprune import PruneConfig
    from structprune.errors import StructPruneError

    with pytest.raises(StructPruneError, match="target"):
        PruneConfig(method="structprune", target="teacher")
    with pytest.raises(StructPruneError, match="rho"):
        PruneConfig(method="structprune", rho=-1.0)


def test_uniform_allocation_cuts_exactly_the_uniform_widths():
    """T = inf (``--uniform-widths``) gives the local methods' exact widths in every layer, so the
    model exports with a stock config."""
    base = tiny_llama(layers=3)
    ids = calib_ids(4, 32)
    widths = {}
    for method in ("structprune", "obs-local"):
        m = copy.deepcopy(base)
        r = api.prune(m, ids, device="cpu", progress=False, method=method, sparsity=0.4, seqlen=32,
                      uniform_widths=True)
        widths[method] = r.report["layers"]
    assert widths["structprune"] == widths["obs-local"]
    assert all(w == widths["structprune"][0] for w in widths["structprune"])


def test_truncated_menu_has_the_full_menus_nearest_prefix():
    """The last pass stops each removal path at its cut (allocation/softmax.py
    nearest_prefix_reached): on random menus and targets, including exact hits and ties, the
    truncated menu's nearest prefix is the full menu's."""
    from structprune.allocation.softmax import nearest_prefix_reached

    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        costs = [float(c) for c in torch.randint(1, 5, (12,), generator=g)] if trial % 2 else \
            [float(c) for c in torch.rand(12, generator=g) + 0.01]
        menu = Menu(0, "mlp", 100.0, costs, [1.0] * 12)
        kept = menu.kept
        targets = [float(torch.rand(1, generator=g)) * 110 - 5] + kept[3:5] + [(kept[4] + kept[5]) / 2]
        for target in targets:
            stop, n = nearest_prefix_reached(100.0, target), len(costs)
            for s, c in enumerate(costs):
                if stop(c):
                    n = s + 1
                    break
            short = Menu(0, "mlp", 100.0, costs[:n], [1.0] * n)
            assert short.nearest_prefix(target) == menu.nearest_prefix(target), (costs, target)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2_moe], ids=["llama", "qwen2-moe"])
def test_last_pass_stops_its_paths_at_the_cut_and_cuts_the_same(factory, monkeypatch):
    """The one-shot pass runs each removal path only down to its cut: the plans and every weight are
    bit for bit those of the pass that runs every path to its floor, with fewer steps."""
    from structprune.solvers import structprune as sp

    base = factory(layers=3)
    ids = calib_ids(4, 24)
    steps, out = {}, {}
    real = sp.mlp_path
    for mode in ("stopped", "full"):
        if mode == "full":
            monkeypatch.setattr(sp, "nearest_prefix_reached", lambda full, target: None)
        steps[mode] = []

        def counting(*a, **k):
            path = real(*a, **k)
            steps[mode].append(len(path.steps))
            return path
        monkeypatch.setattr(sp, "mlp_path", counting)
        m = copy.deepcopy(base)
        r = api.prune(m, ids, device="cpu", progress=False, method="structprune", sparsity=0.3, seqlen=24)
        out[mode] = ([p.to_dict() for p in r.plans], m.state_dict())
    assert out["stopped"][0] == out["full"][0]
    assert all(torch.equal(v, out["full"][1][k]) for k, v in out["stopped"][1].items())
    n = len(get_adapter(base).layers())  # the profile's paths (first n) run to the floor in both
    assert steps["stopped"][:n] == steps["full"][:n]
    assert sum(steps["stopped"][n:]) < sum(steps["full"][n:]), steps


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2_moe], ids=["llama", "qwen2-moe"])
def test_dense_cut_paths_cut_the_profiles_paths_without_solving_them_again(factory, monkeypatch):
    """``cut_paths="dense"``: the cutting pass cuts every module at the allocated prefix of the dense
    profile's path (no path is solved in the pass) and refits on the pruned inputs. The first layer's
    attention sees the same inputs in both modes, so its heads and weights are bit for bit the default's
    (its MLP's statistics already follow the cut attention in the pass)."""
    from structprune.solvers import structprune as sp

    base = factory(layers=3)
    ids = calib_ids(4, 24)
    n = len(get_adapter(base).layers())
    calls, out, menus = {}, {}, {}
    real_mlp, real_attn, real_plans = sp.mlp_path, sp.attention_path, sp.dense_path_plans
    for mode in ("pruned", "dense"):
        calls[mode] = 0

        def counting(real, *a, **k):
            calls[mode] += 1
            return real(*a, **k)
        monkeypatch.setattr(sp, "mlp_path", lambda *a, **k: counting(real_mlp, *a, **k))
        monkeypatch.setattr(sp, "attention_path", lambda *a, **k: counting(real_attn, *a, **k))
        monkeypatch.setattr(sp, "dense_path_plans", lambda ad, m, p: menus.setdefault("plans", real_plans(ad, m, p)))
        m = copy.deepcopy(base)
        r = api.prune(m, ids, device="cpu", progress=False, method="structprune", sparsity=0.4, seqlen=24,
                      cut_paths=mode)
        out[mode] = ([p.to_dict() for p in r.plans], m.state_dict())
        assert abs(r.report["sparsity_achieved"] - 0.4) < 0.05
    assert calls == {"pruned": 4 * n, "dense": 2 * n}  # the profile's two paths per layer, then the pass's
    assert [{k: sorted(v) for k, v in p.items()} for p in menus["plans"]] == out["dense"][0]
    attn0 = lambda plans: {k: plans[0][k] for k in ("heads", "kv_heads")}  # noqa: E731
    assert attn0(out["dense"][0]) == attn0(out["pruned"][0])
    layer0 = [k for k in out["dense"][1] if ".layers.0." in k and "attn" in k]
    assert layer0 and all(torch.equal(out["dense"][1][k], out["pruned"][1][k]) for k in layer0)


def test_dense_cut_paths_are_the_one_shot_passes():
    from structprune import PruneConfig
    from structprune.errors import StructPruneError

    with pytest.raises(StructPruneError, match="one-shot"):
        PruneConfig(method="structprune", cut_paths="dense", iterations=2)
    with pytest.raises(StructPruneError, match="unknown cut_paths"):
        PruneConfig(method="structprune", cut_paths="fast")
    with pytest.raises(StructPruneError, match="ignored"):  # uniform widths have no profile paths
        PruneConfig(method="structprune", allocation="uniform", cut_paths="dense")
    with pytest.raises(StructPruneError, match="no profile"):  # nor has softmax's uniform limit
        PruneConfig(method="structprune", temperature=float("inf"), cut_paths="dense")


@pytest.mark.parametrize("family,every", [(f, 2) for f in sorted(FAMILIES)] + [("llama", 1)])
def test_profile_pass_records_the_sensitivity_sweeps_forward(family, every, monkeypatch):
    """The profiling pass's dense forward records the boundaries the sensitivities' backward sweep starts
    from (engine/sensitivity.py: BoundaryRecorder), so the sweep runs no forward of its own: the
    sensitivities, plans and every weight are bit for bit those of the sweep's own forward, with a
    checkpoint at every boundary and every second one, on a subset of the windows (sens_nsamples)."""
    from structprune.engine import sensitivity as sens_mod
    from structprune.solvers import structprune as sp

    base = FAMILIES[family](layers=3)
    ids = calib_ids(5, 16)
    monkeypatch.setattr(sp, "default_interval", lambda num, inputs: every)
    out = {}
    real = sens_mod.Float32Module.__call__
    for mode in ("recorded", "own"):
        if mode == "own":
            monkeypatch.setattr(sens_mod.BoundaryRecorder, "same_as_float32", staticmethod(lambda layer, outputs: False))
        forwards = []
        monkeypatch.setattr(sens_mod.Float32Module, "__call__",
                            lambda self, *a, **k: (forwards.append(torch.is_grad_enabled()), real(self, *a, **k))[1])
        m = copy.deepcopy(base)
        r = api.prune(m, ids, device="cpu", progress=False, method="structprune", sparsity=0.3, seqlen=16,
                      batch_size=2, sens_nsamples=2)
        entry = next(e for e in r.report["solver_log"] if "sensitivity_checkpoint_every" in e)
        assert entry["sensitivity_checkpoint_every"] == every
        no_grad = forwards.count(False)  # the forward sweep and the recomputed segments run without autograd
        sens = [{k: v for k, v in e.items() if "seconds" not in k} for e in r.report["solver_log"]]
        out[mode] = ([p.to_dict() for p in r.plans], m.state_dict(), no_grad, r.report["timings"], sens)
    assert out["recorded"][4] == out["own"][4]  # the sensitivities and menus in the log, exactly
    assert out["recorded"][0] == out["own"][0]
    assert all(torch.equal(v, out["own"][1][k]) for k, v in out["recorded"][1].items())
    # one no-grad forward per layer and sensitivity chunk fewer (sens_nsamples counts chunks: 2 of the 3)
    assert out["own"][2] - out["recorded"][2] == 3 * 2, (out["own"][2], out["recorded"][2])
    assert "sensitivity fwd" in out["own"][3] and "sensitivity fwd" not in out["recorded"][3]


def test_structprunes_own_output_refits_are_float32_and_obs_locals_stay_float64_on_the_cpu(monkeypatch):
    """StructPrune refits every module against its own output in float32 on every device (REFIT_DTYPE;
    solved as a correction of the kept weights, tests/test_obs.py bounds the difference); obs-local keeps
    refit_dtype's float64 on the CPU; the report says which."""
    from structprune.solvers import modules, parts

    seen = []

    def spy(real):
        return lambda *a, **k: (seen.append((k.get("C") is None, k.get("solve_dtype"))), real(*a, **k))[1]
    monkeypatch.setattr(modules, "refit", spy(modules.refit))
    monkeypatch.setattr(parts, "refit", spy(parts.refit))
    ids = calib_ids(4, 16)
    r = api.prune(tiny_llama(layers=2), ids, device="cpu", progress=False, method="structprune", sparsity=0.3, seqlen=16)
    assert seen and set(seen) == {(True, torch.float32)}
    assert r.report["precision"]["refit"].startswith("float32")
    seen.clear()
    r = api.prune(tiny_llama(layers=2), ids, device="cpu", progress=False, method="obs-local", sparsity=0.3, seqlen=16)
    assert seen and set(seen) == {(True, None)}
    assert r.report["precision"]["refit"].startswith("float64")
