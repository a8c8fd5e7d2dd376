"""``global``: the O(N)-memory reference StructPrune must match.

The whole model is put on the compute device and the LM loss is back-propagated
over every calibration window. Removing a structure is exactly zeroing its columns
of the output projection (o_proj / down_proj / fc2), so the first-order change of the
loss when structure ``s`` goes is ``-sum_{j in s} sum_i g_ij W_ij`` over those columns
(the gradient w.r.t. a mask on the structure's output). Per window this is
accumulated as

* ``fisher`` (default): ``(sum g*W)^2`` summed over windows (the empirical Fisher of the
  mask, Kwon et al. 2022: the second-order loss increase at a trained optimum);
* ``taylor``: ``|sum g*W|`` summed over windows (LLM-Pruner's first-order term, with the
  absolute value taken per window so opposite-signed windows do not cancel).

Fisher is the default by measurement on held-out C4 calibration text (docs/methods.md):
per parameter, first-order scores undervalue heads and the ranking strips most layers
to one head.

Only the output projections' weights require gradients (nothing else is needed for
these scores); every ``requires_grad`` flag is restored afterwards and no ``.grad`` is
left behind. One global ranking of all heads and channels by score per parameter
(the ``threshold`` allocation with GQA-legal widths) sets the widths; then a streamed
pass cuts each layer to its best structures and refits each output projection by least
squares on the pruned model's inputs (solvers/obs.py's ``refit``), attention first.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
from tqdm.auto import tqdm

from ..adapters.base import LayerPlan
from ..allocation import LayerWidths, cost_normalised, threshold_widths
from ..config import GLOBAL_SCORES as SCORES
from ..engine import distributed
from ..errors import StructPruneError
from ..scoring import per_head
from .local import layer_shapes, refit_layer
from .passes import run_pass
from .select import select_plan

log = logging.getLogger(__name__)


@contextlib.contextmanager
def grads_only_for(model: torch.nn.Module, params: list[torch.nn.Parameter]):
    """Inside the block only ``params`` require grad; flags restored and ``.grad`` cleared after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, f in flags:
            p.grad = None
            p.requires_grad_(f)


def gradient_scores(model, adapter, calib: torch.Tensor, device, kind: str = "fisher",
                    progress: bool = False) -> list[dict[str, torch.Tensor]]:
    """Per layer ``{"attn": [H], "mlp": [n]}`` mask-gradient scores from full back-propagation.

    The model is moved whole to ``device`` (this is the O(N) memory) and back afterwards.
    """
    if kind not in SCORES:
        raise StructPruneError(f"unknown global score {kind!r}: use taylor or fisher")
    return all_gradient_scores(model, adapter, calib, device, progress)[kind]



def all_gradient_scores(model, adapter, calib: torch.Tensor, device,
                        progress: bool = False, batch_size: int = 1) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Every score of :data:`SCORES` from one back-propagation over ``calib``: ``{kind: per-layer
    scores}``. Both kinds are functions of the same per-window mask gradients, so choosing the
    score on held-out text (benchmarks/baselines.py) costs one backward pass, not one per kind.
    ``batch_size``: the chunk size that assigns windows to the ranks of a distributed run."""
    home = next(model.parameters()).device
    layers = list(adapter.layers())
    # (o_proj, MLP parts): a part's output weight may be a view into a 3D experts parameter.
    outs = [(adapter.attn_linears(l)[1], adapter.mlp_parts(l)) for l in layers]
    dh = [adapter.attention_shape(l).head_dim for l in layers]
    acc = {kind: [{"attn": torch.zeros(o.in_features // h, dtype=torch.float64, device="cpu"),  # CPU accumulators
                   "mlp": torch.zeros(sum(p.size for p in parts), dtype=torch.float64, device="cpu")}
                  for (o, parts), h in zip(outs, dh)] for kind in SCORES}
    params = list({id(p): p for o, parts in outs for p in [o.weight, *(q.out_parameter() for q in parts)]}.values())
    # A distributed run's rank back-propagates its own windows; their per-window scores are gathered
    # and added in window order below, the same additions as one process makes.
    windows = distributed.window_indices(calib.shape[0], batch_size) if distributed.is_distributed() else None
    per_window = []
    model.to(device)  # in place: the parts' parameters stay the model's
    try:
        with grads_only_for(model, params), torch.enable_grad():
            for i in tqdm(windows or range(calib.shape[0]), desc="global backprop", disable=not progress):
                ids = calib[i:i + 1].to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise StructPruneError(f"non-finite loss on calibration window {i}: check the model weights; "
                                           "in float16 try bfloat16 or float32")
                loss.backward()
                with torch.no_grad():
                    if windows is None:
                        _accumulate(acc, outs, dh)
                    else:
                        one = _zeros_like(acc)
                        _accumulate(one, outs, dh)
                        per_window.append(_flat(one))
    finally:
        model.to(home)
    if windows is not None:
        rows = distributed.gather_rows(torch.stack(per_window), windows, calib.shape[0])
        total = _flat(acc)
        for row in rows:
            total += row
        _unflat(acc, total)
    return {kind: [{"attn": a["attn"].float(), "mlp": a["mlp"].float()} for a in acc[kind]] for kind in SCORES}


def _zeros_like(acc):
    return {kind: [{m: torch.zeros_like(t) for m, t in a.items()} for a in per] for kind, per in acc.items()}


def _flat(acc) -> torch.Tensor:
    """Every accumulator of ``acc`` in one vector (kinds, layers and modules in a fixed order)."""
    return torch.cat([a[m] for kind in SCORES for a in acc[kind] for m in ("attn", "mlp")])


def _unflat(acc, flat: torch.Tensor) -> None:
    offset = 0
    for kind in SCORES:
        for a in acc[kind]:
            for m in ("attn", "mlp"):
                a[m].copy_(flat[offset:offset + a[m].numel()])
                offset += a[m].numel()


def _accumulate(acc, outs, dh) -> None:
    """Add this window's per-structure mask gradients ``sum g*W`` (|.| for taylor, squared for
    fisher) to every kind's accumulators and drop the grads."""
    for i, ((o, parts), h) in enumerate(zip(outs, dh)):
        ga = per_head((o.weight.grad.float() * o.weight.float()).sum(0).double().cpu(), h)  # a head's mask: its columns
        gm = torch.cat([(p.out_view(p.out_parameter().grad).float() * p.out_weight().float()).sum(0).double().cpu()
                        for p in parts])  # [n] columns, every part
        acc["taylor"][i]["attn"] += ga.abs()
        acc["taylor"][i]["mlp"] += gm.abs()
        acc["fisher"][i]["attn"] += ga * ga
        acc["fisher"][i]["mlp"] += gm * gm
    for o, parts in outs:
        o.weight.grad = None
        for p in parts:
            p.out_parameter().grad = None


def prune_global(run) -> list[LayerPlan]:
    cfg = run.config
    if cfg.allocation != "threshold":
        raise StructPruneError(f"global ranks every structure jointly (allocation 'threshold'), not {cfg.allocation!r}")
    if cfg.uniform_widths:
        raise StructPruneError("global gives per-layer widths; drop uniform_widths")
    scores = _scores(run)[cfg.global_score]
    shapes = layer_shapes(run.adapter)
    keys = [cost_normalised(s, a, m) for s, (a, m) in zip(scores, shapes)]
    widths = threshold_widths(shapes, keys, cfg.sparsity, cfg.mlp_multiple)
    log.info("global widths: %s", " ".join(f"{w.heads}h/{w.kv_heads}kv/{w.channels}" for w in widths))
    run.log.append({"stage": "allocation", "allocation": f"global-{cfg.global_score}",
                    "widths": [w.to_dict() for w in widths]})
    results, _ = run_pass(run, "global refit", global_refit_step(run, scores, [w.to_dict() for w in widths]),
                          cuts=True)
    return [LayerPlan.from_dict(r) for r in results]


def _scores(run) -> dict[str, list[dict]]:
    """Every kind's gradient scores of the dense model, from the reuse cache (``prune(cache=)``)
    when the same dense model and windows were back-propagated before: a driver that tries each
    ``global_score`` on copies of one dense model pays for one backward pass."""
    key = ("global-scores", run.fingerprint["sha256"], run.calib_sha256, run.device.type)
    if run.cache is not None and key in run.cache:
        return copy.deepcopy(run.cache[key])
    scores = all_gradient_scores(run.model, run.adapter, run.calib, run.device, run.progress, run.config.batch_size)
    if run.cache is not None:
        run.cache[key] = copy.deepcopy(scores)
    return scores


def global_refit_step(run, scores: list[dict], widths: list[dict]):
    """Pass step of ``global``: the best structures by the global scores at the threshold widths,
    cut with a least-squares refit on the pruned model's inputs (solvers/modules.py)."""
    def step(ctx, carry):
        plan = select_plan(run.adapter.attention_shape(ctx.layer), scores[ctx.index],
                           LayerWidths.from_dict(widths[ctx.index]), run.adapter.mlp_shape(ctx.layer))
        refit_layer(run, ctx, plan)
        return plan.to_dict(), carry
    return step
