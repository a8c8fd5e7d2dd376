"""Closed-form structured pruning of one module (method.md): block-OBS + least-squares refit.

A module adds ``W @ z`` to the residual stream (``W``: [d, n], ``z``: [n] inner
activations). With the Gram matrix ``H = sum z z^T`` and the cross term
``C = sum y z^T`` against a target ``y`` (``C = W H`` when the target is the module's
own output), everything is closed-form:

* best refit for a kept column set K:  ``W_K = C[:, K] H[K, K]^-1``
* error of removing a block S from the current optimum ``W* = C H^-1``:
  ``tr(W*_S ((H^-1)_SS)^-1 W*_S^T)``; after removing S, ``W*`` and ``H^-1`` are
  downdated, so a greedy sequence of removals tracks the exact error.

A constant row appended to ``z`` (``zsum``, ``count``) fits a bias, which absorbs the
mean of removed structures. All math in float64: the Grams are ill-conditioned.

Pure tensor functions: tensors in, tensors out; no model, no hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..adapters.base import AttentionShape
from ..surgery import head_rows as _head_cols  # columns of given heads


def augmented_gram(H: torch.Tensor, zsum: torch.Tensor, count: int) -> torch.Tensor:
    """``[[H, s], [s^T, count]]``: the Gram of ``z`` with a constant 1 appended."""
    n = H.shape[0]
    A = H.new_zeros(n + 1, n + 1, dtype=torch.float64)
    A[:n, :n] = H
    A[:n, n] = zsum
    A[n, :n] = zsum
    A[n, n] = count
    return A


def damp_(H: torch.Tensor, damp: float) -> float:
    """Add ``damp * mean(diag H)`` to the diagonal (SparseGPT's dampening), in place; returns the amount."""
    d = torch.diagonal(H)
    delta = float(damp * d.mean().clamp_min(1e-12))
    d += delta
    return delta


def _augmented_weights(W: torch.Tensor, bias: torch.Tensor | None, fit_bias: bool) -> torch.Tensor:
    Wd = W.detach().double()
    if fit_bias:
        b = bias.detach().double() if bias is not None else Wd.new_zeros(Wd.shape[0])
        Wd = torch.cat([Wd, b[:, None]], 1)
    return Wd


def _cross_term(C: torch.Tensor, W, bias, fit_bias: bool, delta: float, n: int) -> torch.Tensor:
    """``C`` against an external target, ridge-regularised toward the current weights ``W``
    (when given): dampening ``H + delta I`` then shrinks the refit toward ``W``, not toward 0,
    so an unpruned module with its own output as target is left exactly as it was."""
    C = C.double()
    if not fit_bias:
        C = C[:, :n]
    if W is not None:
        C = C + delta * _augmented_weights(W, bias, fit_bias).to(C.device)
    return C


def _inverse(H: torch.Tensor) -> torch.Tensor:
    # cholesky_solve against I: torch.cholesky_inverse is ~30x slower on CPU builds.
    L = torch.linalg.cholesky(H)
    return torch.cholesky_solve(torch.eye(H.shape[0], dtype=H.dtype, device=H.device), L)


@dataclass
class ModuleProblem:
    """One module's least-squares problem in statistic space, ready for greedy OBS.

    ``W`` is the current optimum for the kept columns (removed columns are 0),
    ``Hinv`` the inverse of the (augmented, damped) Gram restricted to kept columns
    (rows/columns of removed ones are 0). Column ``n`` is the bias when ``bias``.
    """

    W: torch.Tensor  # [d, n(+1)] float64
    Hinv: torch.Tensor  # [n(+1), n(+1)] float64
    n: int
    bias: bool
    base_error: float  # error of the unpruned optimum against the target (0 for own output)
    removed: list = field(default_factory=list)

    @classmethod
    def build(cls, H: torch.Tensor, zsum: torch.Tensor, count: int, W: torch.Tensor | None = None,
              C: torch.Tensor | None = None, bias: torch.Tensor | None = None, fit_bias: bool = True,
              damp: float = 0.01, yy: float | None = None, dtype=torch.float64) -> "ModuleProblem":
        """From statistics. Give ``W`` (own output target, with optional current ``bias``)
        or ``C = sum y [z;1]^T`` (external target; then ``yy = sum |y|^2`` gives ``base_error``,
        and ``W``/``bias``, if also given, are the ridge prior of the dampening).

        The inverse is always formed in float64; ``dtype=torch.float32`` then runs the greedy
        path (which only orders removals; refits are separate float64 solves) twice as fast."""
        n = H.shape[0]
        Hd = H.double()
        if fit_bias:
            Hd = augmented_gram(Hd, zsum.double(), count)
        delta = damp_(Hd, damp)
        Hinv = _inverse(Hd)
        if C is None:
            Wd = _augmented_weights(W, bias, fit_bias)
            base = 0.0
        else:
            C = _cross_term(C, W, bias, fit_bias, delta, n)
            Wd = C @ Hinv
            base = float(yy - (Wd * C).sum()) if yy is not None else 0.0
        return cls(W=Wd.to(dtype), Hinv=Hinv.to(dtype), n=n, bias=fit_bias, base_error=max(base, 0.0))

    def block_error(self, cols: torch.Tensor) -> float:
        """Error increase of removing columns ``cols`` now (jointly)."""
        E = self.Hinv[cols][:, cols]
        Ws = self.W[:, cols]
        return float(torch.trace(Ws @ torch.linalg.solve(E, Ws.T)))

    def remove(self, cols: torch.Tensor) -> float:
        """Remove ``cols`` with the optimal update of the rest; returns the error increase."""
        E = self.Hinv[cols][:, cols]
        Einv = torch.linalg.inv(E)
        Ws = self.W[:, cols]
        err = float(torch.trace(Ws @ Einv @ Ws.T))
        rows = self.Hinv[cols, :]  # [s, n]
        self.W.addmm_(Ws @ Einv, rows, alpha=-1)  # in place: no [n, n] temporaries
        self.Hinv.addmm_(rows.T, Einv @ rows, alpha=-1)
        # The downdate zeroes W[:, cols] and Hinv's rows/columns cols up to rounding; W is
        # cleaned (it is the refit), Hinv is only ever read at live columns.
        self.W[:, cols] = 0
        self.removed.append(cols)
        return max(err, 0.0)

    def single_errors(self, alive: torch.Tensor) -> torch.Tensor:
        """Errors of removing each single alive column (one-column OBS scores)."""
        d = torch.diagonal(self.Hinv)[alive].clamp_min(1e-30)
        return (self.W[:, alive] ** 2).sum(0) / d

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Refitted ``(W[:, :n], bias)`` for the kept columns (removed columns are 0)."""
        if self.bias:
            return self.W[:, :self.n], self.W[:, self.n]
        return self.W, None


@dataclass
class Path:
    """A greedy removal path: step ``s`` removes ``steps[s]`` at ``costs[s]`` parameters, adding
    ``errors[s]`` to the module's error. Options along the path are prefixes."""

    steps: list  # per step: removed channel indices (MLP) or an attention option (kv, per_group)
    costs: list[float]
    errors: list[float]
    kept: list  # kept structure set after each prefix (index 0 = nothing removed)
    base_error: float = 0.0


def channel_path(problem: ModuleProblem, min_keep: int, cost_per_channel: float, block: int | None = None) -> Path:
    """Greedy OBS removal of MLP channels down to ``min_keep``, ``block`` channels per step.

    One channel per step is exact greedy; removing the ``block`` lowest-scoring channels at
    once (default ``n // 64``: 64 steps per module) keeps the cost at O(n^3 / block) for wide
    MLPs. Each block's error is still exact (joint OBS); only the choice inside it is by
    single-channel scores.
    """
    n = problem.n
    block = block or max(1, n // 64)
    alive = torch.ones(n, dtype=torch.bool)
    steps, costs, errors = [], [], []
    kept_counts = [n]
    while int(alive.sum()) > min_keep:
        idx = alive.nonzero().squeeze(1)
        k = min(block, int(alive.sum()) - min_keep)
        scores = problem.single_errors(idx)
        cols = idx[scores.topk(k, largest=False).indices]
        err = problem.remove(cols)
        alive[cols] = False
        steps.append(cols.tolist())
        costs.append(k * cost_per_channel)
        errors.append(err)
        kept_counts.append(int(alive.sum()))
    return Path(steps, costs, errors, kept_counts, problem.base_error)


def attention_path(problem: ModuleProblem, shape: AttentionShape, target: tuple[int, int] = (1, 1)) -> Path:
    """Greedy OBS path over legal GQA states (same head count in every kept group).

    Each step either drops the weakest head of every kept group (one head per group,
    chosen jointly) or drops the weakest whole KV group, whichever costs less error
    per parameter removed; only moves that keep ``target = (kv_heads, per_group)``
    reachable are allowed, and the path ends there. For MHA (group size 1) this is
    plain greedy head removal.
    """
    G, dh = shape.group_size, shape.head_dim
    groups = {g: list(range(g * G, (g + 1) * G)) for g in range(shape.num_kv_heads)}
    state = (shape.num_kv_heads, G)
    steps, costs, errors = [], [], []
    kept = [{g: list(h) for g, h in groups.items()}]
    while state != target:
        kv, m = state
        candidates = []
        if m > target[1]:
            # Weakest head in each group by its one-head OBS error, removed jointly.
            drop = []
            for g, hs in groups.items():
                e = [problem.block_error(_head_cols([h], dh)) for h in hs]
                drop.append(hs[min(range(len(hs)), key=e.__getitem__)])
            cost = shape.cost(kv, m) - shape.cost(kv, m - 1)
            candidates.append((problem.block_error(_head_cols(drop, dh)) / cost, "heads", drop, cost))
        if kv > target[0]:
            for g, hs in groups.items():
                cost = shape.cost(kv, m) - shape.cost(kv - 1, m)
                candidates.append((problem.block_error(_head_cols(hs, dh)) / cost, "group", g, cost))
        _, kind, what, cost = min(candidates, key=lambda c: c[0])
        if kind == "heads":
            err = problem.remove(_head_cols(what, dh))
            for h in what:
                groups[h // G].remove(h)
            state = (kv, m - 1)
        else:
            err = problem.remove(_head_cols(groups[what], dh))
            del groups[what]
            state = (kv - 1, m)
        steps.append(state)
        costs.append(float(cost))
        errors.append(err)
        kept.append({g: list(h) for g, h in groups.items()})
    return Path(steps, costs, errors, kept, problem.base_error)


def refit(H: torch.Tensor, zsum: torch.Tensor, count: int, keep: torch.Tensor, *, W: torch.Tensor | None = None,
          C: torch.Tensor | None = None, bias: torch.Tensor | None = None, fit_bias: bool = True,
          damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares refit of the output projection on kept columns ``keep``.

    Returns ``(W_K [d, |K|], bias or None)`` minimising the error against the module's
    own dense output (``W``, ``bias``) or an external target given by ``C`` ([d, n+1]
    with the bias column when ``fit_bias``, else [d, n]); with both, ``W``/``bias`` are the
    ridge prior (dampening shrinks toward them)."""
    n = H.shape[0]
    Hd = H.double()
    if fit_bias:
        Hd = augmented_gram(Hd, zsum.double(), count)
    delta = damp_(Hd, damp)
    if C is None:
        C = _augmented_weights(W, bias, fit_bias) @ Hd  # own-output target: C = W H (damped: ridge toward W)
    else:
        C = _cross_term(C, W, bias, fit_bias, delta, n)
    K = torch.as_tensor(keep, dtype=torch.long)
    if fit_bias:
        K = torch.cat([K, torch.tensor([n])])
    HKK = Hd[K][:, K]
    WK = torch.linalg.solve(HKK, C[:, K].T).T  # C_K H_KK^-1 (H symmetric)
    if fit_bias:
        return WK[:, :-1], WK[:, -1]
    return WK, None


def obs_prune_mlp(W, H, zsum, count, n_keep: int, *, bias=None, fit_bias=True, damp=0.01, C=None, yy=None):
    """Greedy OBS down to ``n_keep`` channels; returns ``(kept, W_K, bias)`` refitted."""
    prob = ModuleProblem.build(H, zsum, count, W=W, C=C, bias=bias, fit_bias=fit_bias, damp=damp, yy=yy)
    path = channel_path(prob, n_keep, 1.0)
    removed = set(c for step in path.steps for c in step)
    kept = [c for c in range(prob.n) if c not in removed]
    Wn, b = prob.weights()
    return kept, Wn[:, kept], b


def obs_prune_attention(W, H, zsum, count, shape: AttentionShape, kv_heads: int, per_group: int, *, bias=None,
                        fit_bias=True, damp=0.01, C=None, yy=None):
    """Greedy OBS to the GQA state ``(kv_heads, per_group)``; returns
    ``(heads, kv_groups, W_K, bias)`` with ``W_K`` the refitted kept columns."""
    prob = ModuleProblem.build(H, zsum, count, W=W, C=C, bias=bias, fit_bias=fit_bias, damp=damp, yy=yy)
    path = attention_path(prob, shape, target=(kv_heads, per_group))
    final = path.kept[-1]
    groups = sorted(final)
    heads = sorted(h for g in groups for h in final[g])
    Wn, b = prob.weights()
    return heads, groups, Wn[:, _head_cols(heads, shape.head_dim)], b
