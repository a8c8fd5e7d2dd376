"""Closed-form solves of an MLP made of several parts (experts, a shared expert).

Parts add their outputs, and each part's statistics are over its own (routing-weighted)
activations, so each part is its own least-squares problem (solvers/obs.py); errors add
across parts. A greedy removal path over a layer's parts removes, at each step, the block
with the least error per parameter: ``block`` channels from *every* tied expert at once
(they keep one width: adapters/moe.py), or from one free part. Path steps are lists of
layer channel indices, so they are used exactly like a dense MLP's
(:func:`~structprune.solvers.obs.channel_path`).

Refits of an expert fit its own output on the pruned model's inputs (no bias: an expert
has nowhere to hold one). The dense model routes its tokens differently from the pruned
one, so there is no per-expert dense target; the trajectory correction of StructPrune's
consensus target is left to the layer's attention (docs/families.md).
"""

from __future__ import annotations

import math

import torch

from ..adapters.base import MLPShape
from ..adapters.parts import split_channels
from .obs import ModuleProblem, Path, refit


def path_min_keep(n: int, r_min: float, multiple: int) -> int:
    """Fewest channels a module (or part) of ``n`` keeps on a removal path: ``r_min`` of it, rounded up to ``multiple``."""
    k = max(1, math.ceil(r_min * n))
    return min(n, k if multiple <= 1 else max(multiple, -(-k // multiple) * multiple))


def path_block(n: int, path_steps: int, multiple: int) -> int:
    """Channels a removal-path step removes from a module (or part): ``n // path_steps``, a multiple of
    ``multiple`` when ``n`` is, so that every point of the path is a multiple of it. Finer steps give
    finer widths and a more exact greedy (docs/structprune.md: how ``path_steps`` was chosen)."""
    block = max(1, n // path_steps)
    if multiple > 1 and n % multiple == 0:
        block = max(multiple, block // multiple * multiple)
    return block


def problems(parts, stats, fit_bias: bool, damp: float, dtype=torch.float64) -> list[ModuleProblem]:
    """Own-output problems of every part from its statistics (``stats.parts``)."""
    return [ModuleProblem.build(st.gram, st.zsum, st.count, W=p.out_weight().detach(),
                                bias=None if p.out_bias() is None else p.out_bias().detach(),
                                fit_bias=fit_bias and p.bias_ok, damp=damp, dtype=dtype)
            for p, st in zip(parts, stats.parts)]


def parts_path(probs: list[ModuleProblem], mlp: MLPShape, min_keep: list[int], blocks: list[int], stop=None) -> Path:
    """Greedy joint removal path over the parts down to ``min_keep`` channels per part.

    The first ``mlp.tied`` parts move together (each removes its own weakest ``block``
    channels, by one-channel OBS scores; the step's error is the sum of their exact joint
    block errors); other parts move alone. ``Path.kept`` holds the layer's total channels.
    ``stop``: as in :func:`~structprune.solvers.obs.channel_path`."""
    sizes = list(mlp.sizes)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    units = ([list(range(mlp.tied))] if mlp.tied > 1 else []) + \
        [[i] for i in range(len(sizes)) if not (mlp.tied > 1 and i < mlp.tied)]
    kept = list(sizes)
    alive = [torch.ones(n, dtype=torch.bool, device=p.Hinv.device) for n, p in zip(sizes, probs)]
    steps, costs, errors, totals = [], [], [], [sum(kept)]
    while True:
        best = None
        for unit in units:
            b = min(blocks[i] for i in unit)
            b = min([b] + [kept[i] - min_keep[i] for i in unit])
            if b <= 0:
                continue
            picks, err = [], 0.0
            for i in unit:
                idx = alive[i].nonzero().squeeze(1)
                cols = idx[probs[i].single_errors(idx).topk(b, largest=False).indices]
                picks.append((i, cols))
                err += probs[i].block_error(cols)
            cost = b * len(unit) * mlp.cost_per_channel
            if best is None or err / cost < best[0]:
                best = (err / cost, picks, cost)
        if best is None:
            break
        _, picks, cost = best
        err, step = 0.0, []
        for i, cols in picks:
            err += probs[i].remove(cols)
            alive[i][cols] = False
            kept[i] -= len(cols)
            step += (cols + offsets[i]).tolist()
        steps.append(step)
        costs.append(float(cost))
        errors.append(err)
        totals.append(sum(kept))
        if stop is not None and stop(costs[-1]):
            break
    return Path(steps, costs, errors, totals, sum(p.base_error for p in probs))


def kept_after(path: Path, k: int, total: int) -> list[int]:
    """Layer channels kept after the first ``k`` steps of ``path``."""
    removed = {c for step in path.steps[:k] for c in step}
    return [c for c in range(total) if c not in removed]


def refit_parts(parts, stats, channels: list[int], fit_bias: bool, damp: float, targets=None,
                solve_dtype: torch.dtype | None = None):
    """Least-squares refit of every part's output projection on its kept channels.

    ``targets``: per part an optional cross term ``C`` (default: the part's own output, solved in
    ``solve_dtype``: default :func:`~structprune.solvers.obs.refit_dtype`).
    Returns ``[(W_K, bias or None)]`` per part."""
    out = []
    keeps = split_channels(channels, [p.size for p in parts])
    for j, (p, st, keep) in enumerate(zip(parts, stats.parts or [stats], keeps)):
        C = None if targets is None else targets[j]
        W, b = refit(st.gram, st.zsum, st.count, keep.to(st.gram.device), C=C, W=p.out_weight().detach(),
                     bias=None if p.out_bias() is None else p.out_bias().detach(),
                     fit_bias=fit_bias and p.bias_ok, damp=damp, solve_dtype=solve_dtype)
        out.append((W, b))
    return out


def set_part_outputs(adapter, layer, fits) -> None:
    """Write refitted ``(W, bias)`` into every (already cut) part of ``layer``."""
    for part, (W, b) in zip(adapter.mlp_parts(layer), fits):
        part.set_output(W, b)


__all__ = ["kept_after", "path_block", "path_min_keep", "parts_path", "problems", "refit_parts",
           "set_part_outputs"]
