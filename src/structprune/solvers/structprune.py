"""StructPrune: globally coordinated closed-form structured pruning, one layer on the device.

The algorithm (docs/structprune.md derives it and lists every hyper-parameter):

0. **Sensitivities** ``w_m`` of every module (attention, MLP of each layer) from a streamed
   backward pass of the LM loss (engine/sensitivity.py).
1. **Profile** (streamed): each module's greedy block-OBS removal path on the dense model
   (solvers/obs.py); the path's errors weighted by ``w_m`` form the module's menu.
2. **Iterate** ``k = 1..K`` (streamed, one layer resident):
   a. *budget dual*: ``lambda`` by bisection so the energy-based allocation of the menus
      meets the global budget (allocation/softmax.py, temperature ``T``);
   b. *module updates*: every module sees the pruned model's own inputs and is refitted in
      closed form to the **consensus target** ``t = (1 - a) anchor + a u``, where
      ``u = y_dense + (h_dense - h_pruned)`` puts the residual stream back on the dense
      trajectory, the anchor is the module's own output on its pruned inputs (``target="own"``)
      or its dense output (``"dense"``), and ``a = rho / (1 + rho)``; its path is recomputed
      against that target, the allocated point of the path is cut and the output projection
      refitted (least squares with a bias, dampening shrinking toward the current weights);
   c. *consensus / residuals*: the pruned and dense trajectories' distance at each layer
      (primal residual), the change of the allocation (dual residual) and the global
      objective (relative distortion of the final hidden states) are logged; the
      refreshed menus (errors on the pruned trajectory) feed the next ``lambda``.
   The iterate with the lowest objective on the calibration windows is kept.
"""

from __future__ import annotations

import copy
import logging
import math
import time

import torch

from ..adapters.base import LayerPlan
from ..allocation.softmax import Menu, allocate_prefixes
from ..allocation.widths import uniform_widths
from ..engine import LayerInputs
from ..engine.activations import ActivationStore
from ..engine.capture import layer_kwargs, run_layer, to_device
from ..engine.sensitivity import module_sensitivities
from ..surgery import apply_layer_plan, head_rows, set_output_projection
from .obs import ModuleProblem, attention_path, channel_path, refit
from .parts import kept_after, part_block, part_min_keep, parts_path, refit_parts, set_part_outputs
from .parts import problems as part_problems

log = logging.getLogger(__name__)


def temperature_of(cfg) -> float:
    """``allocation`` picks the limit: uniform -> T=inf, threshold -> T=0, softmax -> cfg.temperature."""
    return {"uniform": math.inf, "threshold": 0.0}.get(cfg.allocation, cfg.temperature)


# -- statistics against a target ---------------------------------------------------------------

class _TargetStats:
    """Accumulates ``H = sum z z^T``, ``sum z``, ``C = sum t [z; 1]^T`` and ``sum |t|^2``."""

    def __init__(self):
        self.H = self.zsum = self.C = None
        self.count, self.yy = 0, 0.0

    def add(self, z: torch.Tensor, t: torch.Tensor) -> None:
        z = z.reshape(-1, z.shape[-1]).float()
        t = t.reshape(-1, t.shape[-1]).float()
        if self.H is None:
            n, d = z.shape[1], t.shape[1]
            self.H = z.new_zeros(n, n)
            self.zsum = z.new_zeros(n)
            self.C = z.new_zeros(d, n + 1)
        self.H.addmm_(z.T, z)
        self.zsum += z.sum(0)
        self.C[:, :-1].addmm_(t.T, z)
        self.C[:, -1] += t.sum(0)
        self.count += z.shape[0]
        self.yy += float((t * t).sum())

    def check(self, where: str) -> None:
        from ..errors import CalibrationError

        if not (torch.isfinite(self.H).all() and torch.isfinite(self.C).all()):
            raise CalibrationError(f"NaN or Inf in calibration statistics of {where}")


def _capture_module_outputs(adapter, layer, inputs: LayerInputs, device):
    """Dense layer on dense inputs: per chunk, attention output, MLP output (CPU), layer output."""
    _, o = adapter.attn_linears(layer)
    down = adapter.mlp_output_module(layer)  # down_proj, or a whole MoE block
    attn_out, mlp_out = ActivationStore(), ActivationStore()  # RAM within the activation budget, disk beyond
    hs = [o.register_forward_hook(lambda m, a, y: attn_out.append(y.detach().cpu())),
          down.register_forward_hook(lambda m, a, y: mlp_out.append(y.detach().cpu()))]
    try:
        outputs = run_layer(layer, inputs, device)
    finally:
        for h in hs:
            h.remove()
    return attn_out, mlp_out, outputs


def _target_stats(adapter, layer, module: str, pruned: LayerInputs, dense: LayerInputs, y_attn, y_mlp,
                  alpha: float, own: bool, device) -> _TargetStats:
    """Run the (partly cut) layer on the pruned inputs and accumulate stats of ``module``
    against its consensus target ``(1 - a) * anchor + a * u``.

    ``u`` is the output that puts the residual stream back on the dense trajectory
    (dense module output plus the residual gap); the anchor is the dense module's output
    (``own=False``) or the module's own output on the pruned inputs (``own=True``)."""
    _, o = adapter.attn_linears(layer)
    st, cur = _TargetStats(), {}

    def target(y_dense, gap, y_own):
        anchor = y_own if own else y_dense
        return anchor + alpha * (y_dense + gap - anchor)

    def attn_post(m, a, y):
        y = y.detach()
        cur["attn_out"] = y
        if module == "attn":
            c = cur["c"]
            gap = dense.hidden[c].to(device) - pruned.hidden[c].to(device)
            st.add(a[0], target(y_attn[c].to(device), gap, y))

    def mlp_post(m, a, y):
        if module == "mlp":
            c = cur["c"]
            mid_d = dense.hidden[c].to(device) + y_attn[c].to(device)
            mid_p = pruned.hidden[c].to(device) + cur["attn_out"]
            st.add(a[0], target(y_mlp[c].to(device), mid_d - mid_p, y.detach()))

    hs = [o.register_forward_hook(attn_post)]
    if module == "mlp":  # a single-part MLP: its down projection's input is z
        hs.append(adapter.mlp_parts(layer)[0].out.register_forward_hook(mlp_post))
    try:
        with torch.no_grad():
            for c, (h, kw) in enumerate(zip(pruned.hidden, pruned.kwargs)):
                cur["c"] = c
                layer(h.to(device), **to_device(layer_kwargs(layer, kw), device))
    finally:
        for h in hs:
            h.remove()
    return st


# -- menus -------------------------------------------------------------------------------------

def _problem(st_or_stats, W=None, bias=None, cfg=None, target=True) -> ModuleProblem:
    if target:  # W, bias: the module's current weights, the prior the dampening shrinks toward
        return ModuleProblem.build(st_or_stats.H, st_or_stats.zsum, st_or_stats.count, C=st_or_stats.C, W=W,
                                   bias=bias, fit_bias=cfg.refit_bias, damp=cfg.damp, yy=st_or_stats.yy,
                                   dtype=torch.float32)
    s = st_or_stats
    return ModuleProblem.build(s.gram, s.zsum, s.count, W=W, bias=bias, fit_bias=cfg.refit_bias, damp=cfg.damp,
                               dtype=torch.float32)


def _paths(adapter, layer, prob_attn, prob_mlp, cfg):
    shape = adapter.attention_shape(layer)
    mshape = adapter.mlp_shape(layer)
    pa = attention_path(prob_attn, shape)
    pm = channel_path(prob_mlp, _min_keep(mshape.channels, cfg), mshape.cost_per_channel, _block(mshape.channels, cfg))
    return pa, pm


def _min_keep(n: int, cfg) -> int:
    k = max(1, math.ceil(cfg.r_min * n))
    return k if cfg.mlp_multiple <= 1 else max(cfg.mlp_multiple, -(-k // cfg.mlp_multiple) * cfg.mlp_multiple)


def _block(n: int, cfg) -> int:
    """Channels removed per path step: ``n // cfg.path_steps``, rounded to a multiple of
    ``mlp_multiple`` so that every point of the path is a multiple of it when ``n`` is.
    Finer steps give finer widths and a more exact greedy (docs/structprune.md: how chosen)."""
    block = max(1, n // cfg.path_steps)
    m = cfg.mlp_multiple
    if m > 1 and n % m == 0:
        block = max(m, block // m * m)
    return block


def _parts_path(adapter, layer, stats, cfg, widths=None):
    """The joint removal path of a multi-part MLP (experts) against each part's own output, down
    to ``widths`` per part (uniform allocation) or to every part's ``r_min`` minimum."""
    mshape = adapter.mlp_shape(layer)
    probs = part_problems(adapter.mlp_parts(layer), stats, cfg.refit_bias, cfg.damp, dtype=torch.float32)
    mults = [mshape.part_multiple(i, cfg.mlp_multiple) for i in range(len(mshape.sizes))]
    floor = list(widths) if widths is not None else [part_min_keep(n, cfg.r_min, m) for n, m in zip(mshape.sizes, mults)]
    blocks = [part_block(n, cfg.path_steps, m) for n, m in zip(mshape.sizes, mults)]
    return parts_path(probs, mshape, floor, blocks)


def _cut_mlp_parts(adapter, layer, path, k, stats, cfg):
    """Cut a multi-part MLP to the first ``k`` steps of ``path``, each part refitted to its own output."""
    channels = kept_after(path, k, adapter.mlp_shape(layer).channels)
    fits = refit_parts(adapter.mlp_parts(layer), stats, channels, cfg.refit_bias, cfg.damp)
    a = adapter.attention_shape(layer)
    apply_layer_plan(adapter, layer, LayerPlan(list(range(a.num_heads)), list(range(a.num_kv_heads)), channels))
    set_part_outputs(adapter, layer, fits)
    return channels


def _menu(layer_idx, module, full_cost, path, weight) -> Menu:
    return Menu(layer_idx, module, float(full_cost), [float(c) for c in path.costs],
                [weight * e for e in path.errors])


def _full_costs(adapter, layer):
    a, m = adapter.attention_shape(layer), adapter.mlp_shape(layer)
    return a.cost(a.num_kv_heads, a.group_size), m.cost(m.channels)


def profile_menus(run, sens) -> list[Menu]:
    """Dense-model removal paths of every module, weighted by sensitivity."""
    cfg, adapter = run.config, run.adapter
    menus = []
    for ctx in run.stream(desc="structprune profile"):
        stats = ctx.collect()
        _, o = adapter.attn_linears(ctx.layer)
        pa = _problem(stats["attn"], o.weight, o.bias, cfg, target=False)
        if adapter.mlp_shape(ctx.layer).parts:  # experts: a joint path over the parts
            path_a = attention_path(pa, adapter.attention_shape(ctx.layer))
            path_m = _parts_path(adapter, ctx.layer, stats["mlp"], cfg)
        else:
            down = adapter.mlp_parts(ctx.layer)[0]
            pm = _problem(stats["mlp"], down.out_weight(), down.out_bias(), cfg, target=False)
            path_a, path_m = _paths(adapter, ctx.layer, pa, pm, cfg)
        ca, cm = _full_costs(adapter, ctx.layer)
        menus += [_menu(ctx.index, "attn", ca, path_a, sens[ctx.index]["attn"]),
                  _menu(ctx.index, "mlp", cm, path_m, sens[ctx.index]["mlp"])]
    return menus


# -- one pruning pass ----------------------------------------------------------------------------

def _cut_attention(adapter, layer, path, k, st, cfg):
    shape = adapter.attention_shape(layer)
    kept = path.kept[k]
    groups = sorted(kept)
    heads = sorted(h for g in groups for h in kept[g])
    o = adapter.attn_linears(layer)[1]
    W, b = refit(st.H, st.zsum, st.count, head_rows(heads, shape.head_dim, st.H.device), C=st.C, W=o.weight,
                 bias=o.bias, fit_bias=cfg.refit_bias, damp=cfg.damp)
    n = adapter.mlp_shape(layer).channels
    apply_layer_plan(adapter, layer, LayerPlan(heads, groups, list(range(n))))
    set_output_projection(adapter.attn_linears(layer)[1], W, b)
    return heads, groups


def _cut_mlp(adapter, layer, path, k, st, cfg):
    removed = {c for step in path.steps[:k] for c in step}
    n = adapter.mlp_shape(layer).channels
    channels = [c for c in range(n) if c not in removed]
    down = adapter.mlp_parts(layer)[0]
    W, b = refit(st.H, st.zsum, st.count, torch.tensor(channels, device=st.H.device), C=st.C, W=down.out_weight(),
                 bias=down.out_bias(), fit_bias=cfg.refit_bias and down.bias_ok, damp=cfg.damp)
    a = adapter.attention_shape(layer)
    apply_layer_plan(adapter, layer, LayerPlan(list(range(a.num_heads)), list(range(a.num_kv_heads)), channels))
    adapter.mlp_parts(layer)[0].set_output(W, b)
    return channels


def prune_pass(run, kept_target: list[float] | None, sens, alpha: float, desc: str, widths=None):
    """Cut every module to (about) its allocated kept cost against consensus targets, or, with
    ``widths`` (uniform allocation, T = inf), to exactly those widths in every layer.

    Returns ``(plans, menus, objective, drift)``: fresh menus on the pruned trajectory,
    the relative final-state distortion, and the per-layer relative trajectory gap."""
    cfg, adapter, device = run.config, run.adapter, run.device
    dense = run._inputs or run.stream().first_inputs()
    own = cfg.target == "own"
    plans, menus, drift = [], [], []
    carry = 0.0
    objective = float("nan")
    for ctx in run.stream(desc=desc, cuts=True, final=cfg.iterations == 1):
        layer, i = ctx.layer, ctx.index
        y_attn, y_mlp, dense_next = _capture_module_outputs(adapter, layer, dense, device)
        ca, cm = _full_costs(adapter, layer)

        st = _target_stats(adapter, layer, "attn", ctx.inputs, dense, y_attn, y_mlp, alpha, own, device)
        st.check(f"layer {i} attn")
        o = adapter.attn_linears(layer)[1]
        w = widths[i] if widths is not None else None
        target = (1, 1) if w is None else (w.kv_heads, w.per_group)  # exact widths: the path ends there
        path_a = attention_path(_problem(st, o.weight, o.bias, cfg), adapter.attention_shape(layer), target)
        ma = _menu(i, "attn", ca, path_a, 1.0)
        if w is None:
            ka = ma.nearest_prefix(kept_target[2 * i])
            carry += kept_target[2 * i] - ma.kept[ka]
        else:
            ka = len(path_a.steps)
        heads, groups = _cut_attention(adapter, layer, path_a, ka, st, cfg)

        mshape = adapter.mlp_shape(layer)
        if mshape.parts:  # experts: each part against its own output on the pruned inputs (solvers/parts.py)
            st = ctx.collect(modules=("mlp",), gram=True)["mlp"]
            path_m = _parts_path(adapter, layer, st, cfg, None if w is None else w.parts)
        else:
            st = _target_stats(adapter, layer, "mlp", ctx.inputs, dense, y_attn, y_mlp, alpha, own, device)
            st.check(f"layer {i} mlp")
            down = adapter.mlp_parts(layer)[0]
            path_m = channel_path(_problem(st, down.out_weight(), down.out_bias(), cfg),
                                  _min_keep(mshape.channels, cfg) if w is None else w.channels,
                                  mshape.cost_per_channel, _block(mshape.channels, cfg))
        mm = _menu(i, "mlp", cm, path_m, 1.0)
        if w is None:
            km = mm.nearest_prefix(kept_target[2 * i + 1] + carry)
            carry += kept_target[2 * i + 1] - mm.kept[km]
        else:
            km = len(path_m.steps)
        cut = _cut_mlp_parts if mshape.parts else _cut_mlp
        channels = cut(adapter, layer, path_m, km, st, cfg)

        menus += [_menu(i, "attn", ca, path_a, sens[i]["attn"]), _menu(i, "mlp", cm, path_m, sens[i]["mlp"])]
        plans.append(LayerPlan(heads, groups, channels))
        ctx.outputs = run_layer(layer, ctx.inputs, device)
        num = sum(float((p - d).float().pow(2).sum()) for p, d in zip(ctx.outputs.hidden, dense_next.hidden))
        den = sum(float(d.float().pow(2).sum()) for d in dense_next.hidden)
        drift.append(num / max(den, 1e-30))
        y_attn.close()
        y_mlp.close()
        dense = dense_next
    objective = drift[-1]
    return plans, menus, objective, drift


# -- the method ---------------------------------------------------------------------------------

def prune_structprune(run) -> list[LayerPlan]:
    """StructPrune (see module docstring); returns the kept structures of every layer."""
    cfg, adapter = run.config, run.adapter
    T = temperature_of(cfg)
    layers = adapter.layers()
    inputs = run.stream().first_inputs()

    t0 = time.perf_counter()
    # The profile depends on the dense model, the calibration windows (order included: the
    # sensitivities use the first sens_nsamples), the compute device and these knobs: keyed by
    # content hashes (provenance.py), so permuted windows or another model never collide.
    key = ("structprune-profile", run.fingerprint["sha256"], run.calib_sha256, run.device.type, cfg.sens_nsamples,
           cfg.r_min, cfg.damp, cfg.refit_bias, cfg.mlp_multiple, cfg.path_steps, cfg.batch_size)
    if math.isinf(T):
        # Uniform widths need no menus or sensitivities (only the logs' menus carry weights).
        sens, menus = [{"attn": 1.0, "mlp": 1.0} for _ in layers], []
    elif run.cache is not None and key in run.cache:
        sens, menus = copy.deepcopy(run.cache[key])
    else:
        nsens = min(cfg.sens_nsamples or len(inputs.hidden), len(inputs.hidden))
        sub = LayerInputs(inputs.hidden[:nsens], inputs.kwargs[:nsens])
        ncal = sum(h.shape[0] for h in sub.hidden)
        sens = module_sensitivities(run.model, adapter, sub, run.calib[:ncal], run.device, progress=run.progress,
                                    store_factory=run.home)
        menus = profile_menus(run, sens)
        if run.cache is not None:
            run.cache[key] = copy.deepcopy((sens, menus))
    t_sens = time.perf_counter() - t0

    full = sum(c for l in layers for c in _full_costs(adapter, l))
    from ..api import prunable_params  # late: api imports the solvers

    budget = full - cfg.sparsity * prunable_params(adapter)
    dense_layers = run.home.snapshot(layers) if cfg.iterations > 1 else None
    alpha = cfg.rho / (1.0 + cfg.rho)
    best, prev_kept = None, None
    for it in range(cfg.iterations):
        t1 = time.perf_counter()
        if it > 0:
            run.home.restore(layers, dense_layers)
        if math.isinf(T):  # uniform: the same exact widths in every layer (as the local methods)
            kept, lam = None, float("inf")
            widths = uniform_widths([(adapter.attention_shape(l), adapter.mlp_shape(l)) for l in layers],
                                    cfg.sparsity, cfg.mlp_multiple)
        else:
            prefixes, lam = allocate_prefixes(menus, budget, T)
            kept, widths = [m.kept[k] for m, k in zip(menus, prefixes)], None
        plans, menus, objective, drift = prune_pass(run, kept, sens, alpha, desc=f"structprune iter {it + 1}",
                                                    widths=widths)
        kept_now = [c for l in layers for c in _full_costs(adapter, l)]
        dual = (sum(abs(a - b) for a, b in zip(kept_now, prev_kept)) / full) if prev_kept else float("nan")
        entry = {"iteration": it + 1, "objective": objective, "lambda": lam, "temperature": T,
                 "primal_residual": sum(drift) / len(drift), "dual_residual": dual,
                 "kept": [{"layer": i, "heads": len(p.heads), "kv_heads": len(p.kv_heads), "mlp": len(p.channels)}
                          for i, p in enumerate(plans)],
                 "layer_drift": drift, "seconds": time.perf_counter() - t1}
        run.log.append(entry)
        log.info("iter %d: objective %.5f primal %.5f dual %.4f lambda %.3f (%.1fs)", it + 1, objective,
                 entry["primal_residual"], dual, lam, entry["seconds"])
        prev_kept = kept_now
        if best is None or objective < best[0]:
            best = (objective, plans, run.home.snapshot(layers) if cfg.iterations > 1 else None, it + 1)
    if best[2] is not None and best[3] != cfg.iterations:
        run.home.restore(layers, best[2])
    run.log.append({"chosen_iteration": best[3], "profile_seconds": t_sens,
                    "sensitivities": sens})
    return best[1]
