"""One module's closed form, shared by every solver that cuts and refits: problem, path, cut.

A module (a layer's attention, or its MLP made of one or more parts) is pruned from its
statistics (:class:`~structprune.engine.ModuleStats`): the Gram of its inner activations on
the pruned model's inputs, and, when the target is not the module's own output, the cross
term ``C`` against that target (StructPrune's consensus minus dual). From them:

* :func:`module_problem` builds the least-squares problem (solvers/obs.py) a removal path runs on;
* :func:`attention_path` / :func:`mlp_path` give the greedy block-OBS removal path (a multi-part
  MLP's joint path over its parts: solvers/parts.py);
* :func:`cut_attention` / :func:`cut_mlp` keep a set of structures and write the float64
  least-squares refit of the output projection(s) against the same target.

``obs-local``, ``global``'s refit pass and StructPrune all cut through these two functions, so
there is one refit and one cost rule (:func:`~structprune.adapters.module_costs`) in the code.
"""

from __future__ import annotations

import torch

from ..engine.clock import timed_call
from ..adapters.base import LayerPlan
from ..surgery import apply_layer_plan, head_rows, set_output_projection
from .obs import ModuleProblem, Path, channel_path, refit
from .obs import attention_path as _obs_attention_path
from .parts import parts_path, problems, refit_parts, set_part_outputs


def _detached(t):
    return None if t is None else t.detach()


def module_problem(stats, weight: torch.Tensor, bias: torch.Tensor | None, fit_bias: bool, damp: float,
                   dtype=torch.float64) -> ModuleProblem:
    """The least-squares problem of one module (or MLP part) from its statistics: against its own
    output (``stats.C`` None: ``weight``/``bias`` define the target) or against the external target
    ``stats.C`` (then ``weight``/``bias`` are the ridge prior the dampening shrinks toward)."""
    external = stats.C is not None
    return ModuleProblem.build(stats.gram, stats.zsum, stats.count, W=weight, C=stats.C, bias=bias,
                               fit_bias=fit_bias, damp=damp, yy=stats.yy if external else None, dtype=dtype)


@timed_call("path")
def attention_path(adapter, layer, stats, cfg, target: tuple[int, int] = (1, 1), dtype=torch.float64,
                   stop=None) -> Path:
    """The attention's greedy removal path down to the GQA state ``target = (kv_heads, per_group)``
    (or until ``stop(step cost)`` is True: :func:`~structprune.solvers.obs.channel_path`)."""
    o = adapter.attn_linears(layer)[1]
    prob = module_problem(stats, o.weight, o.bias, cfg.refit_bias, cfg.damp, dtype)
    return _obs_attention_path(prob, adapter.attention_shape(layer), target, stop)


@timed_call("path")
def mlp_path(adapter, layer, stats, cfg, floor: list[int], blocks: list[int], dtype=torch.float64,
             stop=None) -> Path:
    """The MLP's greedy removal path down to ``floor`` channels per part, ``blocks`` channels per
    step and part (or until ``stop(step cost)`` is True). One part:
    :func:`~structprune.solvers.obs.channel_path`; several (experts): the joint path over parts,
    each part against its own output."""
    mshape = adapter.mlp_shape(layer)
    parts = adapter.mlp_parts(layer)
    if len(parts) == 1:
        out = parts[0]
        prob = module_problem(stats, out.out_weight(), out.out_bias(), cfg.refit_bias and out.bias_ok, cfg.damp, dtype)
        return channel_path(prob, floor[0], mshape.cost_per_channel, blocks[0], stop)
    return parts_path(problems(parts, stats, cfg.refit_bias, cfg.damp, dtype=dtype), mshape, floor, blocks, stop)


@timed_call("refit")
def cut_attention(adapter, layer, stats, heads: list[int], kv_heads: list[int], cfg,
                  solve_dtype: torch.dtype | None = None) -> None:
    """Keep query ``heads`` in KV groups ``kv_heads`` (MLP untouched) and refit the output projection
    (least squares on ``stats``, against ``stats.C`` when given, else the module's own output, solved
    in ``solve_dtype``: default :func:`~structprune.solvers.obs.refit_dtype`)."""
    o = adapter.attn_linears(layer)[1]
    keep = head_rows(sorted(heads), adapter.attention_shape(layer).head_dim, stats.gram.device)
    W, b = refit(stats.gram, stats.zsum, stats.count, keep, C=stats.C, W=o.weight.detach(), bias=_detached(o.bias),
                 fit_bias=cfg.refit_bias, damp=cfg.damp, solve_dtype=solve_dtype)
    n = adapter.mlp_shape(layer).channels
    apply_layer_plan(adapter, layer, LayerPlan(sorted(heads), sorted(kv_heads), list(range(n))))
    set_output_projection(adapter.attn_linears(layer)[1], W, b)


@timed_call("refit")
def cut_mlp(adapter, layer, stats, channels: list[int], cfg, solve_dtype: torch.dtype | None = None) -> None:
    """Keep MLP ``channels`` (layer indices over every part; attention untouched) and refit each
    part's output projection on ``stats`` (against ``stats.C`` for a one-part MLP when given; else
    against its own output, solved in ``solve_dtype`` as in :func:`cut_attention`)."""
    parts = adapter.mlp_parts(layer)
    targets = None if stats.C is None else [stats.C]  # an external target: one-part MLPs only
    fits = refit_parts(parts, stats, sorted(channels), cfg.refit_bias, cfg.damp, targets=targets,
                       solve_dtype=solve_dtype)
    a = adapter.attention_shape(layer)
    apply_layer_plan(adapter, layer, LayerPlan(list(range(a.num_heads)), list(range(a.num_kv_heads)), sorted(channels)))
    set_part_outputs(adapter, layer, fits)


def heads_of_path(path: Path, steps: int) -> tuple[list[int], list[int]]:
    """``(query heads, KV groups)`` kept after the first ``steps`` steps of an attention ``path``."""
    kept = path.kept[steps]
    groups = sorted(kept)
    return sorted(h for g in groups for h in kept[g]), groups


__all__ = ["attention_path", "cut_attention", "cut_mlp", "heads_of_path", "mlp_path", "module_problem"]
