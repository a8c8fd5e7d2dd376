"""Uncertainty of perplexities measured on a few windows (docs/protocol.md, CPU protocol).

A perplexity on 40 windows is a sample: another 40 windows of the same text would give
another number. Windows are the unit of resampling (tokens inside a window are not
independent: one hard paragraph moves all of its tokens), so both intervals here are
**percentile bootstraps over windows**:

* :func:`ppl_interval`: resample the windows' mean NLLs with replacement ``n_boot`` times;
  the perplexity of a resample is ``exp(mean)``; the interval is the ``(1 - level) / 2`` and
  ``(1 + level) / 2`` quantiles of those perplexities. Every window scores the same number of
  tokens (``seqlen - 1``), so the mean of window means is the token mean the protocol's
  perplexity uses.
* :func:`paired_ratio`: two models scored on the *same* windows; the ratio of their
  perplexities is ``exp(mean(a - b))``, and the resample draws the same window indices for
  both, so the window-to-window difficulty that both models share cancels. This interval
  is much narrower than one built from two separate perplexity intervals, and is the one
  to use for "A is at most B": the claim holds when the upper end is at most the bound.

Deterministic: the resampling uses its own ``torch.Generator`` seeded with ``seed``
(default 0), so the same NLLs always give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

N_BOOT = 10_000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval ``[low, high]`` at ``level``."""

    value: float
    low: float
    high: float
    level: float
    nwindows: int
    n_boot: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high


def _as_tensor(nlls: Sequence[float], what: str) -> torch.Tensor:
    x = torch.as_tensor(list(nlls), dtype=torch.float64)
    if x.ndim != 1 or x.numel() == 0:
        raise ValueError(f"{what}: need a non-empty list of per-window mean NLLs, got {x.numel()} values")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what}: per-window NLLs must be finite (a model produced NaN/Inf logits)")
    return x


def _check(level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def _exp(x: float) -> float:
    return math.exp(x) if x < 709 else math.inf  # exp overflows float64 beyond ~709.78


def bootstrap_means(values: torch.Tensor, n_boot: int = N_BOOT, seed: int = 0) -> torch.Tensor:
    """``n_boot`` means of resamples (with replacement, same size) of the 1-D ``values``."""
    g = torch.Generator().manual_seed(seed)
    n = values.shape[0]
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    return values[idx].mean(dim=1)


def _quantiles(samples: torch.Tensor, level: float) -> tuple[float, float]:
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(samples, q).tolist()
    return lo, hi


def ppl_interval(window_nlls: Sequence[float], level: float = LEVEL, n_boot: int = N_BOOT,
                 seed: int = 0) -> Interval:
    """Perplexity ``exp(mean NLL)`` of the windows and its percentile bootstrap interval over
    windows (module docstring). One window gives a zero-width interval: there is nothing
    to resample, which says the figure has no measured uncertainty, not that it is exact."""
    _check(level, n_boot)
    x = _as_tensor(window_nlls, "ppl_interval")
    means = bootstrap_means(x, n_boot, seed)
    lo, hi = _quantiles(means, level)
    # exp is monotone: quantiles of exp(mean) are exp of the quantiles of the means.
    return Interval(_exp(float(x.mean())), _exp(lo), _exp(hi), level, x.numel(), n_boot, seed)


def paired_ratio(window_nlls_a: Sequence[float], window_nlls_b: Sequence[float], level: float = LEVEL,
                 n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """``ppl(a) / ppl(b)`` on the same windows and its paired percentile bootstrap interval:
    the same resampled window indices for both models (module docstring). ``a`` equal to
    ``b`` gives exactly 1 with a zero-width interval."""
    _check(level, n_boot)
    a = _as_tensor(window_nlls_a, "paired_ratio (a)")
    b = _as_tensor(window_nlls_b, "paired_ratio (b)")
    if a.numel() != b.numel():
        raise ValueError(f"paired_ratio needs the same windows for both models: {a.numel()} NLLs against "
                         f"{b.numel()}")
    d = a - b
    means = bootstrap_means(d, n_boot, seed)
    lo, hi = _quantiles(means, level)
    return Interval(_exp(float(d.mean())), _exp(lo), _exp(hi), level, d.numel(), n_boot, seed)


def at_most(ratio: Interval, bound: float) -> bool:
    """The protocol's rule for "A is at most ``bound`` times B": the upper end of the paired
    ratio's interval is at most ``bound``."""
    return ratio.high <= bound


def comparison(dense: dict, pruned: dict) -> dict:
    """``report.json``'s entry for one dataset from two ``PerplexityResult.to_dict()`` of the same
    windows: both perplexities with their intervals, the per-window NLLs, and the paired ratio
    ``pruned / dense`` with its interval (None where NLLs are missing or not finite)."""
    a, b = pruned.get("window_nlls"), dense.get("window_nlls")
    ratio = None
    if a and b and len(a) == len(b) and all(math.isfinite(x) for x in (*a, *b)):
        r = paired_ratio(a, b)
        ratio = {"value": r.value, "low": r.low, "high": r.high, "level": r.level}
    return {"dense": dense["ppl"], "pruned": pruned["ppl"], "nwindows": pruned["nwindows"], "seqlen": pruned["seqlen"],
            "dense_interval": dense.get("ppl_interval"), "pruned_interval": pruned.get("ppl_interval"),
            "ratio_pruned_to_dense": ratio, "window_nlls": {"dense": b, "pruned": a}}


def _chunked_means(values: torch.Tensor, n_boot: int, g: torch.Generator, chunk_elems: int = 1 << 22) -> torch.Tensor:
    """``n_boot`` resample means of ``values`` drawn ``chunk_elems`` indices at a time (a 10,042-document
    task times 10,000 resamples would otherwise hold 800 MB of indices)."""
    n = values.shape[0]
    rows = max(1, chunk_elems // n)
    out = []
    for start in range(0, n_boot, rows):
        idx = torch.randint(0, n, (min(rows, n_boot - start), n), generator=g)
        out.append(values[idx].mean(dim=1))
    return torch.cat(out)


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL, n_boot: int = N_BOOT,
                      seed: int = 0) -> Interval:
    """``mean(a) - mean(b)`` for two models scored on the *same* items (e.g. 0/1 correctness per
    zero-shot document) and its paired percentile bootstrap interval: the same resampled items for
    both, as :func:`paired_ratio` does for windows. ``a`` equal to ``b`` gives 0 with a zero-width
    interval."""
    _check(level, n_boot)
    x = _as_tensor(a, "paired_difference (a)")
    y = _as_tensor(b, "paired_difference (b)")
    if x.numel() != y.numel():
        raise ValueError(f"paired_difference needs the same items for both models: {x.numel()} against {y.numel()}")
    d = x - y
    lo, hi = _quantiles(_chunked_means(d, n_boot, torch.Generator().manual_seed(seed)), level)
    return Interval(float(d.mean()), lo, hi, level, d.numel(), n_boot, seed)


def stratified_mean_difference(pairs: Sequence[tuple[Sequence[float], Sequence[float]]], level: float = LEVEL,
                               n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """The mean over groups (zero-shot tasks) of ``mean(a) - mean(b)`` per group, with a paired
    percentile bootstrap interval that resamples items within each group (each group keeps its size
    and its weight 1/groups in the mean)."""
    _check(level, n_boot)
    if not pairs:
        raise ValueError("stratified_mean_difference needs at least one group")
    g = torch.Generator().manual_seed(seed)
    total, point = torch.zeros(n_boot, dtype=torch.float64), 0.0
    for i, (a, b) in enumerate(pairs):
        x, y = _as_tensor(a, f"group {i} (a)"), _as_tensor(b, f"group {i} (b)")
        if x.numel() != y.numel():
            raise ValueError(f"group {i}: the same items are needed for both models ({x.numel()} against {y.numel()})")
        d = x - y
        total += _chunked_means(d, n_boot, g)
        point += float(d.mean())
    lo, hi = _quantiles(total / len(pairs), level)
    return Interval(point / len(pairs), lo, hi, level, sum(len(a) for a, _ in pairs), n_boot, seed)
