"""StructPrune: globally coordinated closed-form structured pruning, one layer on the device.

Read top to bottom, :func:`prune_structprune` runs five phases (docs/structprune.md derives each):

1. **Sensitivities** ``w_m`` of every module (attention, MLP of each layer) from a streamed
   backward pass of the LM loss (engine/sensitivity.py).
2. **Removal paths** (one streamed pass over the dense model): each module's greedy block-OBS
   path; its errors weighted by ``w_m`` form the module's menu. This pass runs before phase 1's
   backward sweep: its dense forward is the sweep's forward, whose boundaries it records.
3. **Allocation**: the budget dual ``lambda`` by bisection, so that the energy-based softmax
   allocation of the menus (temperature ``T``) meets the global budget (allocation/softmax.py).
4. **ADMM passes** ``k = 1..K`` (each one streamed pass, one layer resident). Every module ``m``
   has a target ``t_m`` from the dense trajectory (its own output on the pruned inputs, or the
   dense output plus the residual gap), a consensus variable ``u_m`` and a scaled dual ``y_m``
   (per token, stored like activations). W-step: the module's closed-form structured refit
   against ``u_m - y_m`` (its path re-solved against that target, cut at the point ``lambda``
   allocates); u-step ``u = (t + rho (z + y)) / (1 + rho)``; y-step ``y += z - u``; primal
   residual ``||z - u||`` (output space), dual residual ``rho ||A^T (u_k - u_{k-1})||`` in weight
   space (``u_0`` the first cut's output); the menus re-measured in the pass give the next
   ``lambda`` (phase 3 again); ``rho`` doubles after every iteration whose kept structures changed;
   the loop stops when they repeat (frozen supports), when both residuals meet their tolerances,
   or at ``K``. Then, if ``K > 1`` ran, the **fixed point** on the last supports: one pass refitting
   every module to its own target (ADMM's limit for fixed supports). ``K = 1`` is the one-shot
   pass (``y = 0``: every module refitted to its own target).
5. **Selection**: the iterate with the lowest objective is the result: the KL divergence of the
   pruned model's next-token distribution from the dense model's on the calibration windows
   (engine/head.py; logged with the pruned model's calibration NLL and the relative distortion of
   the final hidden states, the objective before issue 27, which can move opposite to held-out loss).

Every streamed pass is a per-layer step function run by :func:`~structprune.solvers.passes.run_pass`;
steps return and carry plain data only (tensors, activation stores, numbers, lists, dicts).
"""

from __future__ import annotations

import copy
import logging
import math
import time

import torch

from ..adapters import LayerPlan, module_costs, prunable_params, removable_cost
from ..allocation.softmax import Menu, allocate_prefixes, nearest_prefix_reached
from ..allocation.widths import uniform_widths
from ..engine import LayerInputs
from ..engine import distributed
from ..engine.activations import ActivationStore
from ..engine.capture import ModuleReplay, layer_kwargs, run_layer, to_device
from ..engine.clock import timed_call
from ..engine.head import calibration_loss
from ..engine.sensitivity import BoundaryRecorder, default_interval, module_sensitivities
from ..engine.stats import StatsAccumulator
from .inner import refit_mlp_inputs
from .values import refit_values
from .modules import attention_path, cut_attention, cut_mlp, heads_of_path, mlp_path
from .parts import kept_after, path_block, path_min_keep
from .passes import run_pass

log = logging.getLogger(__name__)

#: rho is multiplied by this after every ADMM iteration whose kept structures changed (admm_passes)
RHO_FACTOR = 2.0
#: the own-output refits' factor and solve on every device (refits against an external target stay
#: float64): solved as a correction of the kept weights, float32 rounding touches the correction only
#: (solvers/obs.py: refit, refit_dtype); obs-local keeps refit_dtype's float64 on the CPU
REFIT_DTYPE = torch.float32


def temperature_of(cfg) -> float:
    """``allocation`` picks the limit: uniform -> T=inf, threshold -> T=0, softmax -> cfg.temperature."""
    return {"uniform": math.inf, "threshold": 0.0}.get(cfg.allocation, cfg.temperature)


def _floor_and_blocks(adapter, layer, cfg, widths: dict | None):
    """Per MLP part: where its removal path stops (the allocated widths, or ``r_min``) and the
    channels a step removes (``path_steps`` steps, multiples of the part's granularity)."""
    mshape = adapter.mlp_shape(layer)
    mults = [mshape.part_multiple(i, cfg.mlp_multiple) for i in range(len(mshape.sizes))]
    blocks = [path_block(n, cfg.path_steps, m) for n, m in zip(mshape.sizes, mults)]
    if widths is not None:
        floor = list(widths["parts"]) if widths.get("parts") is not None else [widths["channels"]]
    else:
        floor = [path_min_keep(n, cfg.r_min, m) for n, m in zip(mshape.sizes, mults)]
    return floor, blocks


# -- phase 1 and 2: sensitivities and the dense removal paths -----------------------------------

def sensitivities_and_paths(run, T: float) -> tuple[list[dict], list[dict], ActivationStore | None]:
    """``(sensitivities per layer, menus as dicts, the dense model's final hidden states)`` (the
    last from the same streamed pass: the objective's reference, so the ADMM passes need not run
    the dense model again; None for uniform widths, which skip this phase), from the reuse cache
    when the same dense model, windows and knobs were profiled before."""
    cfg, adapter = run.config, run.adapter
    layers = adapter.layers()
    if math.isinf(T):  # uniform widths need no menus or sensitivities (only the logs' menus carry weights)
        return [{"attn": 1.0, "mlp": 1.0} for _ in layers], [], None
    # The profile depends on the dense model, the calibration windows (order included: the
    # sensitivities use the first sens_nsamples), the compute device and these knobs: keyed by
    # content hashes (provenance.py), so permuted windows or another model never collide.
    key = ("structprune-profile", run.fingerprint["sha256"], run.calib_sha256, run.device.type, cfg.sens_nsamples,
           cfg.r_min, cfg.damp, cfg.refit_bias, cfg.mlp_multiple, cfg.path_steps, cfg.batch_size)
    if run.cache is not None and key in run.cache:
        return copy.deepcopy(run.cache[key])
    # The sensitivities depend on fewer knobs than the paths (not damp, refit_bias, r_min, path
    # steps): a sweep of those reuses the streamed backward, the most expensive phase.
    sens_key = ("structprune-sensitivities", *key[1:5], cfg.batch_size)  # sens_nsamples counts chunks
    sens = copy.deepcopy(run.cache[sens_key]) if run.cache is not None and sens_key in run.cache else None
    recorder = sub = None
    if sens is None:
        inputs = run.stream().first_inputs()  # this rank's chunks (all of them in one process)
        chunks = distributed.chunk_count(int(run.calib.shape[0]), cfg.batch_size)
        nsens = min(cfg.sens_nsamples or chunks, chunks)  # the first nsens chunks of the whole run
        mine = sum(1 for c in distributed.my_chunks(chunks) if c < nsens)
        sub = LayerInputs(inputs.hidden[:mine], inputs.kwargs[:mine])
        # The profile's dense forward (every window) is the sensitivity sweep's forward (its first
        # windows) computed once: its boundaries are recorded for the backward sweep.
        recorder = BoundaryRecorder(len(layers), default_interval(len(layers), sub), mine)
    try:
        results, _ = run_pass(run, "structprune profile", profile_step(run, recorder))
        if sens is None:
            ncal = sum(h.shape[0] for h in sub.hidden)
            windows = distributed.window_indices(int(run.calib.shape[0]), cfg.batch_size)[:ncal]
            # a resumed profile pass (started late or read back) recorded nothing usable; whether the
            # sweep ran its own forward shows in the report's timings ("sensitivity fwd"), not in its results
            recorded = recorder if recorder.complete else None

            def measure() -> dict:
                details: dict = {}
                sens = module_sensitivities(
                    run.model, adapter, sub, run.calib[windows], run.device, progress=run.progress,
                    store_factory=run.home, timings=run.timings, checkpoint_every=recorder.every,
                    windows=(windows, min(nsens * cfg.batch_size, int(run.calib.shape[0]))), details=details,
                    recorded=recorded)
                # how the streamed backward kept its boundaries, journaled with them: a resumed run reports it too
                return {"sensitivities": sens, "log": {"sensitivity_checkpoint_every": details["checkpoint_every"],
                                                       "sensitivity_recomputed_layers": details["recomputed_layers"]}}
            done = run.phase("sensitivities", measure)
            sens = done["sensitivities"]
            run.log.append(done["log"])
            if run.cache is not None:
                run.cache[sens_key] = copy.deepcopy(sens)
    finally:
        if recorder is not None:
            recorder.close()
    # the profile's menus carry the paths' own errors; weighted here by each module's sensitivity
    menus = [Menu.from_path(m["layer"], m["module"], m["full_cost"], m["step_costs"], m["step_errors"],
                            sens[m["layer"]][m["module"]]).to_dict() | {"path": m["path"]}
             for r in results for m in r["menus"]]
    final = results[-1]["final"]
    if run.cache is not None:
        run.cache[key] = copy.deepcopy((sens, menus, final))
    return sens, menus, final


def profile_step(run, recorder: BoundaryRecorder | None = None):
    """Pass step of phase 2: the dense layer's statistics, each module's removal path against its
    own output, as menus of the paths' unweighted errors (dicts, each with its path's structures:
    ``"path"``, for the attention the kept ``[heads, kv_heads]`` after every prefix, for the MLP the
    channels each step removes); the last layer's result also keeps the dense model's final hidden
    states (``final``). ``recorder``: gets each layer's outputs (the sensitivity sweep's boundaries)."""
    cfg, adapter = run.config, run.adapter
    last = len(adapter.layers()) - 1

    def step(ctx, carry):
        stats, ctx.outputs = ctx.collect(return_outputs=True)
        if recorder is not None:
            recorder.record(ctx.index, ctx.layer, ctx.outputs)
        path_a = attention_path(adapter, ctx.layer, stats["attn"], cfg, dtype=torch.float32)
        floor, blocks = _floor_and_blocks(adapter, ctx.layer, cfg, None)
        path_m = mlp_path(adapter, ctx.layer, stats["mlp"], cfg, floor, blocks, dtype=torch.float32)
        ca, cm = module_costs(adapter, ctx.layer)
        i = ctx.index
        attn = Menu.from_path(i, "attn", ca, path_a.costs, path_a.errors).to_dict()
        mlp = Menu.from_path(i, "mlp", cm, path_m.costs, path_m.errors).to_dict()
        attn["path"] = [list(heads_of_path(path_a, k)) for k in range(len(path_a.steps) + 1)]
        mlp["path"] = [list(s) for s in path_m.steps]
        return {"menus": [attn, mlp], "final": ctx.outputs.hidden.clone() if i == last else None}, carry
    return step


def dense_path_plans(adapter, menus: list[dict], prefixes: list[int]) -> list[dict]:
    """Per layer the kept structures at the allocated ``prefixes`` of the dense profile's paths
    (``cut_paths="dense"``): what the cutting pass cuts at instead of re-solving each path."""
    plans = []
    for i, layer in enumerate(adapter.layers()):
        attn, mlp = menus[2 * i], menus[2 * i + 1]
        heads, groups = attn["path"][prefixes[2 * i]]
        removed = {c for step in mlp["path"][:prefixes[2 * i + 1]] for c in step}
        channels = [c for c in range(adapter.mlp_shape(layer).channels) if c not in removed]
        plans.append({"heads": list(heads), "kv_heads": list(groups), "channels": channels})
    return plans


# -- phase 4: ADMM ---------------------------------------------------------------------------------

RESIDUAL_KEYS = ("r2", "z2", "u2", "f2", "t2", "n")


def consensus_update(t: torch.Tensor, z: torch.Tensor, u_prev: torch.Tensor | None, w_prev: torch.Tensor | None,
                     rho: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The u- and y-steps of scaled ADMM on one chunk of one module's outputs.

    ``t``: the module's target from the dense trajectory; ``z``: its output after the W-step;
    ``u_prev``/``w_prev``: the previous consensus and the previous *unscaled* dual ``w = rho * y``
    (None at the first iteration: ``w_0 = 0``). Storing ``w`` rather than ``y`` means a change of
    ``rho`` needs no rescaling of the stored duals (Boyd §3.4.1 rescales ``y``).

        u = argmin |u - t|^2 + rho |z + y - u|^2 = (t + rho z + w) / (1 + rho)
        w = w + rho (z - u)

    Returns ``(u, w, sums)`` with the output-space squared norms the primal residual and its
    tolerance need: ``r2 = |z - u|^2``, ``z2``, ``u2``, ``f2 = |u - t|^2``, ``t2 = |t|^2`` and ``n``
    (entries). The dual residual lives in weight space (:func:`admm_step` forms it from ``u`` and the
    module's inputs)."""
    t, z = t.float(), z.float()
    u = t + rho * z
    if w_prev is not None:
        u = u + w_prev.float()
    u = u / (1.0 + rho)
    w = rho * (z - u) if w_prev is None else w_prev.float() + rho * (z - u)
    sums = {"r2": float((z - u).pow(2).sum()), "z2": float(z.pow(2).sum()), "u2": float(u.pow(2).sum()),
            "f2": float((u - t).pow(2).sum()), "t2": float(t.pow(2).sum()), "n": z.numel()}
    return u, w, sums


def _add(acc: dict, sums: dict) -> None:
    for k, v in sums.items():
        acc[k] = acc.get(k, 0) + v


def _add_parts(acc: dict, sums: dict) -> None:
    """Keep one chunk's sums (lists per key, for :func:`_total`)."""
    for k in RESIDUAL_KEYS:
        acc.setdefault(k, []).append(sums[k])


def _total(parts: dict) -> dict:
    """A layer's residual sums over every chunk of every rank: ``math.fsum`` of the per-chunk values
    (correctly rounded, so the split of the chunks over ranks cannot change a bit)."""
    return {k: (distributed.fsum_parts(parts[k]) if k != "n" else sum(map(sum, distributed.gather_objects(parts[k]))))
            for k in RESIDUAL_KEYS if k in parts}


class _StopForward(Exception):
    """Raised by the hook of ``_hooked_forward``'s ``stop_after`` module: the rest of the layer's
    forward is not needed."""


@timed_call("forward")
def _hooked_forward(layer, inputs: LayerInputs, device, hooks, stop_after=None) -> None:
    """Run ``layer`` over every chunk of ``inputs`` with forward ``hooks`` ``[(module, fn(c, args, out))]``,
    ``c`` the chunk index; outputs are dropped (the hooks keep what they need). With ``stop_after``
    (one of the hooked modules) each chunk's forward ends once that module has run: the attention's
    statistics need nothing after ``o_proj``, and the MLP is two thirds of a layer's work."""
    cur = {"c": 0}

    def call(fn, mod, a, y):
        fn(cur["c"], a, y)
        if mod is stop_after:
            raise _StopForward

    handles = [m.register_forward_hook(lambda mod, a, y, fn=fn: call(fn, mod, a, y)) for m, fn in hooks]
    try:
        with torch.no_grad():
            for c, (h, kw) in enumerate(zip(inputs.hidden, inputs.kwargs)):
                cur["c"] = c
                try:
                    layer(h.to(device, inputs.hidden.source_dtype or h.dtype),
                          **to_device(layer_kwargs(layer, kw), device))
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()


def _dense_module_outputs(adapter, layer, dense: LayerInputs, device):
    """The (still dense) layer on the dense trajectory: per chunk the attention output, the MLP output
    (activation stores: RAM within the activation budget, disk beyond) and the layer's outputs."""
    _, o = adapter.attn_linears(layer)
    attn_out, mlp_out = ActivationStore(), ActivationStore()
    hs = [o.register_forward_hook(lambda m, a, y: attn_out.append(y.detach().cpu())),
          adapter.mlp_output_module(layer).register_forward_hook(lambda m, a, y: mlp_out.append(y.detach().cpu()))]
    try:
        outputs = run_layer(layer, dense, device)
    finally:
        for h in hs:
            h.remove()
    return attn_out, mlp_out, outputs


def admm_step(run, sens: list[dict], kept: list[float] | None, widths: list[dict] | None, state: list | None,
              rho: float, keep_state: bool, final_dense: ActivationStore | None = None,
              frozen: list[dict] | None = None, weight_residuals: bool = False):
    """Pass step of one ADMM iteration (phase 4).

    ``kept``: per module the kept cost ``lambda`` allocated (None with ``widths``: exact uniform
    widths per layer); ``state``: per layer the previous iteration's ``{"attn"|"mlp": {"u", "w"}}``
    activation stores (None at the first iteration); ``keep_state``: store this iteration's
    ``u``/``w`` for the next one; ``final_dense``: the dense model's final hidden states from the
    profile pass; ``frozen``: per layer the kept structures to cut at (no removal paths, no
    menus: the fixed-point pass on frozen supports); ``weight_residuals``: form the dual residual
    and its tolerance in weight space (``sum (u - u_prev) [a; 1]^T`` and ``sum w [a; 1]^T`` per
    module, ``a`` its output projection's input), which costs two products of the size of the
    cross term per module and chunk, so only an ADMM run (``iterations > 1``) pays it. The carry is ``{"dense": LayerInputs of the dense trajectory, "owned": whether
    this pass made it, "rounding": the running kept-cost rounding}``.

    The dense trajectory is run only where something needs it: the ``dense`` target's
    ``y_dense + gap``, and the objective when ``final_dense`` is not given. With the ``own`` target
    and ``final_dense`` the pass skips the dense layer's forward (one of four per layer), the carry's
    ``dense`` is None, and only the last layer's drift and calibration loss (the objective) are measured.

    Per layer: the dense layer's module outputs on the dense trajectory; the attention's W-step
    (statistics against ``u - y`` on the pruned inputs, path, cut, refit); one forward doing the
    attention's u/y-steps and the MLP's statistics; the MLP's W-step; the final forward doing the
    MLP's u/y-steps (it replays the cut attention's outputs from the forward before: same weights,
    same inputs). A multi-part MLP (experts) is refitted to each part's own output
    (solvers/parts.py) and has no consensus variables (its parts see other tokens than the
    dense model's)."""
    cfg, adapter, device = run.config, run.adapter, run.device
    trajectory = cfg.target == "dense"
    follow_dense = trajectory or final_dense is None
    last = len(adapter.layers()) - 1

    def step(ctx, carry):
        layer, i, pruned = ctx.layer, ctx.index, ctx.inputs
        dense = carry["dense"]
        prev = state[i] if state is not None else None
        w = widths[i] if widths is not None else None
        if follow_dense:
            y_attn, y_mlp, dense_next = _dense_module_outputs(adapter, layer, dense, device)
        else:
            y_attn = y_mlp = dense_next = None
        ca, cm = module_costs(adapter, layer)
        _, o = adapter.attn_linears(layer)
        parts = adapter.mlp_parts(layer)
        admm_mlp = len(parts) == 1
        res: dict = {}
        dual = StatsAccumulator(gram=False) if weight_residuals else None
        new = {"attn": {"u": ActivationStore(), "w": ActivationStore()}} if keep_state else None
        if keep_state and admm_mlp:
            new["mlp"] = {"u": ActivationStore(), "w": ActivationStore()}
        t_attn = ActivationStore()  # the attention's target per chunk, for its u-step after the cut

        def w_step_target(module, c, t):
            """``u - y = u - w / rho`` of the previous iteration, ``t`` at the first."""
            if prev is None or module not in prev:
                return t
            return prev[module]["u"][c].to(device).float() - prev[module]["w"][c].to(device).float() / rho

        def own(module) -> bool:
            """Whether ``module``'s W-step target is its own output on the inputs it sees (``own``
            target, no dual yet): then it is solved against its weights, as obs-local's modules are
            (no cross term accumulated; the refit as a correction of the kept weights), the same
            problem as the cross term ``C = sum y [z; 1]^T`` with ``y = W z + b`` without ``y``'s rounding."""
            return not trajectory and (prev is None or module not in prev)

        def u_step(module, c, t, z, a):
            u_prev = None if prev is None else prev[module]["u"][c].to(device)
            w_prev = None if prev is None else prev[module]["w"][c].to(device)
            u, wn, sums = consensus_update(t, z.detach(), u_prev, w_prev, rho)
            _add_parts(res, sums)
            if dual is not None:  # weight space: A^T of the consensus' change (u_0: the first cut) and of rho y
                ref = z.detach().float() if u_prev is None else u_prev.float()
                dual.add_z(f"{module}.du", a, u.shape[-1], target=u - ref)
                dual.add_z(f"{module}.w", a, u.shape[-1], target=wn)
            if new is not None:
                new[module]["u"].append(u)
                new[module]["w"].append(wn)

        # Attention W-step: statistics of o_proj's input against u - y on the pruned inputs.
        acc = StatsAccumulator(gram=True)

        def attn_stats(c, a, y):
            if trajectory:
                t = y_attn[c].to(device).float() + dense.hidden[c].to(device).float() - pruned.hidden[c].to(device).float()
            else:
                t = y.detach().float()  # own: the module's current weights on the inputs it really sees
            t_attn.append(t)
            acc.add_z("attn", a[0], t.shape[-1], target=None if own("attn") else w_step_target("attn", c, t))
        _hooked_forward(layer, pruned, device, [(o, attn_stats)], stop_after=o)
        st = acc.finish()["attn"]
        st.check_finite(f"layer {i} attn")
        target = (1, 1) if w is None else (w["kv_heads"], w["per_group"])  # exact widths: the path ends there
        # The last pass needs each path only down to its cut (its menus feed no later allocation):
        # stopped there, the cut is the same and a 30% cut skips most of a path's work.
        rounding = carry["rounding"]
        if frozen is not None:  # the supports are fixed: no path, the refit alone
            path_a, heads, groups = None, frozen[i]["heads"], frozen[i]["kv_heads"]
        else:
            stop = nearest_prefix_reached(ca, kept[2 * i]) if w is None and not keep_state else None
            path_a = attention_path(adapter, layer, st, cfg, target=target, dtype=torch.float32, stop=stop)
            ma = Menu.from_path(i, "attn", ca, path_a.costs, path_a.errors)
            if w is None:
                ka = ma.nearest_prefix(kept[2 * i])
                rounding += kept[2 * i] - ma.kept[ka]
            else:
                ka = len(path_a.steps)
            heads, groups = heads_of_path(path_a, ka)
        cut_attention(adapter, layer, st, heads, groups, cfg, solve_dtype=REFIT_DTYPE)
        del st, acc
        values_log = None
        if cfg.value_iterations > 0:  # coordination inside the attention: the kept value rows with o_proj
            values_log = refit_values(adapter, layer, pruned,
                                      lambda c: w_step_target("attn", c, t_attn[c].to(device)), device,
                                      cfg.value_iterations, cfg.refit_bias, cfg.damp, row_damp=cfg.input_damp)

        # Attention u/y-steps and the MLP's statistics, in one forward of the cut attention.
        o = adapter.attn_linears(layer)[1]
        z_attn_now = {}
        t_mlp = ActivationStore()

        def attn_update(c, a, y):
            z_attn_now["z"] = y.detach()
            u_step("attn", c, t_attn[c].to(device), y, a[0])

        floor, blocks = _floor_and_blocks(adapter, layer, cfg, w)
        # The attention is final from here on: the outputs' forward below replays what this one computes.
        attention = ModuleReplay(adapter.attention_module(layer))
        inner = admm_mlp and cfg.inner_iterations > 0
        inner_log = None
        # The MLP's inputs and W-step targets per chunk, for the refit of its input projections.
        x_mlp, t_fit = (ActivationStore(), ActivationStore()) if inner else (None, None)
        if admm_mlp:
            acc = StatsAccumulator(gram=True)

            def mlp_stats(c, a, y):
                if trajectory:
                    mid_d = dense.hidden[c].to(device).float() + y_attn[c].to(device).float()
                    mid_p = pruned.hidden[c].to(device).float() + z_attn_now["z"].float()
                    t = y_mlp[c].to(device).float() + mid_d - mid_p
                else:
                    t = y.detach().float()
                t_mlp.append(t)
                wt = w_step_target("mlp", c, t)
                acc.add_z("mlp", a[0], t.shape[-1], target=None if own("mlp") else wt)
                if inner:
                    t_fit.append(wt.cpu())

            hooks = [(o, attn_update), (parts[0].out, mlp_stats)]
            if inner:  # the MLP's input: what its first input projection reads
                hooks.insert(1, (adapter.mlp_linears(layer)[0][0], lambda c, a, y: x_mlp.append(a[0].detach().cpu())))
            with attention.recording():
                _hooked_forward(layer, pruned, device, hooks)
            st = acc.finish().pop("mlp")  # the accumulator keeps no reference: `del st` frees the Gram
            st.check_finite(f"layer {i} mlp")
        else:  # experts: each part against its own output (statistics per part, routing-weighted)
            seen = []

            def attn_update_counted(m, a, y):
                attn_update(len(seen), a, y)
                seen.append(1)
            h = o.register_forward_hook(attn_update_counted)
            try:
                with attention.recording():
                    st = ctx.collect(modules=("mlp",), gram=True)["mlp"]
            finally:
                h.remove()
        t_attn.close()
        if frozen is not None:
            path_m, channels = None, frozen[i]["channels"]
        else:
            stop = nearest_prefix_reached(cm, kept[2 * i + 1] + rounding) if w is None and not keep_state else None
            path_m = mlp_path(adapter, layer, st, cfg, floor, blocks, dtype=torch.float32, stop=stop)
            mm = Menu.from_path(i, "mlp", cm, path_m.costs, path_m.errors)
            if w is None:
                km = mm.nearest_prefix(kept[2 * i + 1] + rounding)
                rounding += kept[2 * i + 1] - mm.kept[km]
            else:
                km = len(path_m.steps)
            channels = kept_after(path_m, km, adapter.mlp_shape(layer).channels)
        cut_mlp(adapter, layer, st, channels, cfg, solve_dtype=REFIT_DTYPE)
        del st
        if inner:  # coordination inside the MLP: its kept input rows refitted with the output projection
            inner_log = refit_mlp_inputs(adapter, layer, x_mlp, t_fit, device, cfg.inner_iterations,
                                         cfg.refit_bias, cfg.damp, row_damp=cfg.input_damp)
            x_mlp.close()
            t_fit.close()

        # The layer's outputs on the pruned trajectory, with the MLP's u/y-steps.
        hs = []
        if admm_mlp:
            count = []

            def mlp_update(m, a, y):
                c = len(count)
                count.append(1)
                u_step("mlp", c, t_mlp[c].to(device), y, a[0])
            hs.append(adapter.mlp_output_module(layer).register_forward_hook(mlp_update))
        try:
            with attention.replaying():
                ctx.outputs = run_layer(layer, pruned, device)
        finally:
            for h in hs:
                h.remove()
            attention.close()
        t_mlp.close()
        if prev is not None:  # the previous u/w of this layer are used up: one iteration's state at a time
            for v in prev.values():
                v["u"].close()
                v["w"].close()
        reference = dense_next.hidden if follow_dense else (final_dense if i == last else None)
        drift = loss = None
        if reference is not None:  # per-chunk sums added exactly (the same on any split over ranks)
            num = distributed.fsum_parts([float((p - d).float().pow(2).sum())
                                          for p, d in zip(ctx.outputs.hidden, reference)])
            den = distributed.fsum_parts([float(d.float().pow(2).sum()) for d in reference])
            drift = num / max(den, 1e-30)
        if i == last and reference is not None:  # the objective: what the logits do on the calibration windows
            windows = distributed.window_indices(int(run.calib.shape[0]), cfg.batch_size)  # this rank's, in order
            loss = calibration_loss(adapter, ctx.outputs.hidden, reference, run.calib[windows], device,
                                    resident=getattr(run.home, "resident", None))
        if follow_dense:
            y_attn.close()
            y_mlp.close()
        if carry["owned"] and dense is not None:
            dense.close()  # this pass's own copy of the dense trajectory; the first layer's inputs are shared
        residuals = _total(res)
        if dual is not None:  # reduced over ranks by finish(); per module: s2 = rho^2 |A^T du|^2, w2 = |A^T w|^2
            sums = dual.finish()
            residuals.update(
                s2=rho * rho * math.fsum(float(v.C.pow(2).sum()) for k, v in sorted(sums.items()) if k.endswith(".du")),
                w2=math.fsum(float(v.C.pow(2).sum()) for k, v in sorted(sums.items()) if k.endswith(".w")),
                p=sum(v.C.numel() for k, v in sums.items() if k.endswith(".w")))
        menus = None if frozen is not None else [
            Menu.from_path(i, "attn", ca, path_a.costs, path_a.errors, sens[i]["attn"]).to_dict(),
            Menu.from_path(i, "mlp", cm, path_m.costs, path_m.errors, sens[i]["mlp"]).to_dict()]
        result = {"plan": {"heads": heads, "kv_heads": groups, "channels": channels}, "menus": menus,
                  "drift": drift, "loss": loss, "residuals": residuals, "state": new, "inner": inner_log,
                  "values": values_log}
        return result, {"dense": dense_next, "owned": True, "rounding": rounding}
    return step


def admm_passes(run, sens: list[dict], menus: list[dict], budget: float, T: float,
                final_dense: ActivationStore | None = None) -> list[dict]:
    """Phases 3 and 4: up to ``cfg.iterations`` ADMM iterations, each an allocation (``lambda``) and a
    streamed pass, then, where ADMM ran (more than one iteration), its fixed point on the last
    iterate's kept structures: one more pass refitting every module to its own target on those
    supports (docs/structprune.md, section 3). Returns the iterates ``[{"iteration", "objective",
    "plans", "snapshot"}]`` (the fixed point last, numbered after the iterations; a snapshot of the
    layers only where it may be selected later), logging one entry per pass.
    ``final_dense``: the dense final hidden states (the objective's reference; see :func:`admm_step`).

    The schedule: ``rho`` starts at ``cfg.rho`` and doubles after every iteration whose kept
    structures differ from the previous iteration's (the first iteration's count as new); the
    iterations stop when the kept structures repeat (the supports are frozen), when both
    residuals meet their tolerances, or after ``cfg.iterations``."""
    cfg, adapter = run.config, run.adapter
    layers = adapter.layers()
    K = cfg.iterations
    dense_layers = run.home.snapshot(layers) if K > 1 else None
    first = run.stream().first_inputs()
    rho, state, iterates, best, plans_prev = cfg.rho, None, [], math.inf, None
    shapes = [(adapter.attention_shape(l), adapter.mlp_shape(l)) for l in layers]

    def keep(k: int, objective: float, plans: list[dict]) -> None:
        """Record an iterate; only the best so far may be restored later (one snapshot at a time);
        with select = last the layers in place are the result and nothing is snapshotted."""
        nonlocal best
        better = objective < best and cfg.select == "best"
        best = min(best, objective)
        if better:
            for it in iterates:
                it["snapshot"] = None
        iterates.append({"iteration": k, "objective": objective, "plans": plans,
                         "snapshot": run.home.snapshot(layers) if K > 1 and better else None})

    def measured(results, t0) -> dict:
        """What every pass logs: the objective and its companions, kept counts, drift, seconds."""
        loss = results[-1]["loss"]
        drift = [r["drift"] for r in results]
        entry = {"objective": loss["kl"],  # the selector: KL of the pruned next-token distribution from the dense one
                 "distortion": drift[-1], "calibration_nll": loss["nll"], "calibration_dense_nll": loss["dense_nll"],
                 "kept": [{"layer": i, "heads": len(r["plan"]["heads"]), "kv_heads": len(r["plan"]["kv_heads"]),
                           "mlp": len(r["plan"]["channels"])} for i, r in enumerate(results)],
                 "layer_drift": drift}
        if cfg.inner_iterations > 0:  # the MLP's input-projection refit, per layer (None: not a one-part MLP)
            entry["inner"] = [r.get("inner") for r in results]
        if cfg.value_iterations > 0:  # the attention's value-row refit, per layer ({"skipped": why} where it cannot run)
            entry["values"] = [r.get("values") for r in results]
        entry["seconds"] = time.perf_counter() - t0
        return entry

    k = 0
    for k in range(1, K + 1):
        t0 = time.perf_counter()
        if k > 1:
            run.home.restore(layers, dense_layers)  # every W-step solves from the dense weights
        # Phase 3: the budget dual lambda on the current menus (dense paths at k = 1, then the
        # paths re-solved against u - y on the pruned trajectory in the previous pass).
        if math.isinf(T):  # uniform: the same exact widths in every layer (as the local methods)
            kept, lam = None, math.inf
            widths = [w.to_dict() for w in uniform_widths(shapes, cfg.sparsity, cfg.mlp_multiple)]
        else:
            prefixes, lam = allocate_prefixes([Menu.from_dict(m) for m in menus], budget, T, cfg.energy_scale)
            kept, widths = [Menu.from_dict(m).kept[p] for m, p in zip(menus, prefixes)], None
        # cut_paths="dense" (one-shot only): cut at the dense paths' allocated prefixes, refit on the pruned inputs
        frozen = dense_path_plans(adapter, menus, prefixes) if cfg.cut_paths == "dense" and kept is not None else None
        step = admm_step(run, sens, kept, widths, state, rho, keep_state=k < K, final_dense=final_dense,
                         frozen=frozen, weight_residuals=K > 1)
        results, _ = run_pass(run, f"structprune iter {k}", step, {"dense": first, "owned": False, "rounding": 0.0},
                              cuts=True, final=K == 1)
        if state is not None:  # each step closed its layer's; a resumed pass skipped the layers done before
            _close(state)
        state = [r["state"] for r in results] if k < K else None
        menus = None if frozen is not None else [m for r in results for m in r["menus"]]
        tot: dict = {}
        for r in results:
            _add(tot, {key: r["residuals"].get(key, 0) for key in RESIDUAL_KEYS + ("s2", "w2", "p")})
        root_n = math.sqrt(max(tot["n"], 1))
        primal = math.sqrt(tot["r2"])
        eps_pri = root_n * cfg.tol_abs + cfg.tol_rel * math.sqrt(max(tot["z2"], tot["u2"]))
        # The dual residual rho A^T (u_k - u_{k-1}) and its tolerance in weight space (Boyd §3.3:
        # A maps a module's weights to its outputs on the calibration tokens); an ADMM run forms them.
        dual = math.sqrt(tot["s2"]) if K > 1 else None
        eps_dual = math.sqrt(max(tot["p"], 1)) * cfg.tol_abs + cfg.tol_rel * math.sqrt(tot["w2"]) if K > 1 else None
        plans = [r["plan"] for r in results]
        settled = plans == plans_prev
        converged = dual is not None and primal <= eps_pri and dual <= eps_dual
        entry = {"iteration": k, **measured(results, t0),
                 "consensus_objective": tot["f2"] / max(tot["t2"], 1e-30),
                 "primal_residual": primal, "dual_residual": dual, "eps_primal": eps_pri, "eps_dual": eps_dual,
                 "rho": rho, "lambda": lam, "temperature": T, "converged": converged,
                 "kept_sets_changed": not settled}
        run.log.append(entry)
        log.info("iter %d: objective %.5f primal %.4g (eps %.3g) dual %s rho %.3g lambda %.3f%s (%.1fs)",
                 k, entry["objective"], primal, eps_pri, "-" if dual is None else f"{dual:.4g} (eps {eps_dual:.3g})",
                 rho, lam, "" if not settled else ", kept structures repeat", entry["seconds"])
        keep(k, entry["objective"], plans)
        if converged or settled or k == K:
            break
        # rho grows while the kept structures still change: a stronger pull of each module's target
        # towards what its pruned output already is, so the supports settle (residual balancing,
        # used before, halved rho in every measured run: the wrong way for a support constraint).
        rho *= RHO_FACTOR
        plans_prev = plans
    if state is not None:  # stopped early: the next iteration's variables are not needed
        _close(state)
    if k > 1:  # ADMM's fixed point on the supports it ended with: each module refitted to its own target
        t0 = time.perf_counter()
        run.home.restore(layers, dense_layers)
        step = admm_step(run, sens, None, None, None, rho, keep_state=False, final_dense=final_dense,
                         frozen=iterates[-1]["plans"])
        results, _ = run_pass(run, "structprune fixed point", step, {"dense": first, "owned": False, "rounding": 0.0},
                              cuts=True, final=False)
        entry = {"fixed_point": True, "supports_of": k, **measured(results, t0), "rho": rho}
        run.log.append(entry)
        log.info("fixed point on iteration %d's supports: objective %.5f (%.1fs)", k, entry["objective"],
                 entry["seconds"])
        keep(k + 1, entry["objective"], [r["plan"] for r in results])
    return iterates


def _close(state: list) -> None:
    """Release one iteration's consensus and dual stores."""
    for s in state:
        for v in (s or {}).values():
            v["u"].close()
            v["w"].close()


# -- phase 5: selection -------------------------------------------------------------------------

def select_iterate(run, iterates: list[dict]) -> dict:
    """The iterate with the lowest objective (``select = best``; its layers are restored if a later
    pass replaced them), or the last one (``select = last``: ADMM's own end point, as measured)."""
    if run.config.select == "last":
        return iterates[-1]
    best = min(iterates, key=lambda it: it["objective"])
    if best is not iterates[-1]:
        run.home.restore(run.adapter.layers(), best["snapshot"])
    return best


# -- the method ---------------------------------------------------------------------------------

def prune_structprune(run):
    """StructPrune (see the module docstring); returns the kept structures of every layer."""
    cfg, adapter = run.config, run.adapter
    T = temperature_of(cfg)
    t0 = time.perf_counter()
    sens, menus, final_dense = sensitivities_and_paths(run, T)  # phases 1 and 2
    if final_dense is not None and cfg.target == "dense":  # its passes follow the dense trajectory anyway
        final_dense.close()
        final_dense = None
    t_profile = time.perf_counter() - t0
    budget = removable_cost(adapter) - cfg.sparsity * prunable_params(adapter)
    iterates = admm_passes(run, sens, menus, budget, T, final_dense)  # phases 3 and 4
    if final_dense is not None:
        final_dense.close()
    best = select_iterate(run, iterates)  # phase 5
    run.log.append({"chosen_iteration": best["iteration"], "iterations_run": len(iterates),
                    "profile_seconds": t_profile, "sensitivities": sens})
    return [LayerPlan.from_dict(p) for p in best["plans"]]


__all__ = ["admm_passes", "admm_step", "consensus_update", "dense_path_plans", "profile_step", "prune_structprune",
           "select_iterate", "sensitivities_and_paths", "temperature_of"]
