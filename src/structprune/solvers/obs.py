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

import logging
from dataclasses import dataclass, field

import torch

from ..adapters.base import AttentionShape
from ..engine.clock import timed
from ..surgery import head_rows

log = logging.getLogger(__name__)

# Workspace of one module solve: at most two float64 [n+1, n+1] buffers (the Gram, damped and
# factored in place, and the inverse solved into an identity), one after the factor is dropped,
# plus the float32 copy the greedy path may run on; the refit holds one [|K|+1, |K|+1] buffer.
# Other temporaries are built in row chunks.
_CHUNKS = 16  # row chunks per n x n pass: each temporary is at most n^2 / 16 entries


def _chunks(n: int):
    step = max(1, -(-n // _CHUNKS))
    return ((i, min(i + step, n)) for i in range(0, n, step))


def _drop_(M: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """``M.index_select(dim, keep)`` for a contiguous ``M`` and ascending ``keep``, written over
    ``M``'s own storage (a contiguous view of its start is returned; nothing is allocated but
    one row chunk). Output row ``i`` lands at or before where input row ``i`` (``dim=1``) or
    ``keep[i] >= i`` (``dim=0``) starts, so writing chunks in order never overwrites a row that
    is still to be read."""
    assert M.is_contiguous()
    rows, cols = M.shape
    out_rows, out_cols = (keep.numel(), cols) if dim == 0 else (rows, keep.numel())
    flat = M.view(-1)
    for i, j in _chunks(out_rows):
        block = M.index_select(0, keep[i:j]) if dim == 0 else M[i:j].index_select(1, keep)
        flat[i * out_cols:j * out_cols].copy_(block.reshape(-1))
    return flat[:out_rows * out_cols].view(out_rows, out_cols)

def factor_dtype(device, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the Cholesky factor a removal path in ``dtype`` starts from: the path's own,
    on every device (``device`` is kept for the report's :func:`precision`).

    The path only orders removals (refits are separate solves): on a heavy-tailed Gram a float32
    factor takes the same channels as a float64 one with step errors within 1e-5
    (``tests/test_obs.py``), and on SmolLM2 (8x512, 30% and 50%) the plans and every saved weight
    are bit for bit those of the float64 factor (docs/experiments.md, session 15). A float64
    factor costs twice float32 on the CPU (at the 7B MLP shape factor + inverse 11.5 s against
    20.2 s, ``benchmarks/results/profile_solver_7b_mlp.md``) and 2 to 64 times on a GPU."""
    return dtype


def refit_dtype(device) -> torch.dtype:
    """The dtype of the own-output refit's factor and solve on ``device``: float64 on the CPU, float32
    on an accelerator. The refit solves for the *correction* ``W_R G_RK A^-1`` of the kept weights
    (:func:`refit`), so float32's rounding touches the correction only, with ``A`` damped to a
    condition number of at most ``100 n``; on a heavy-tailed Gram the float32 refit's error against
    its target is within 1e-6 of the float64 one's (``tests/test_obs.py``). Refits against an
    external target (ADMM, the in-layer refits) stay float64."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def precision(device, path_dtype: torch.dtype = torch.float32, refit: torch.dtype | None = None) -> dict:
    """Which precision each factorisation of a solve uses on ``device`` (for the report); ``refit``:
    the own-output refit's dtype where the solver sets one (default :func:`refit_dtype`)."""
    name = lambda t: str(t).replace("torch.", "")  # noqa: E731
    return {"statistics": "float64 sums of float32 products", "path_factor": name(factor_dtype(device, path_dtype)),
            "path_inverse_and_steps": name(path_dtype),
            "refit": f"{name(refit or refit_dtype(device))} against the module's own output (as a correction of "
                     "the kept weights), float64 against an external target"}


def augmented_gram(H: torch.Tensor, zsum: torch.Tensor, count: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``[[H, s], [s^T, count]]`` in ``dtype``: the Gram of ``z`` with a constant 1 appended.

    Written straight into one buffer (no copy of ``H`` first)."""
    n = H.shape[0]
    A = torch.empty(n + 1, n + 1, dtype=dtype, device=H.device)
    A[:n, :n] = H
    A[:n, n] = zsum
    A[n, :n] = zsum
    A[n, n] = count
    return A


def _gram(H: torch.Tensor, zsum: torch.Tensor, count: int, fit_bias: bool,
          dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A fresh Gram in ``dtype`` (augmented when ``fit_bias``), never an alias of ``H``."""
    if fit_bias:
        return augmented_gram(H, zsum, count, dtype)
    return torch.empty(H.shape, dtype=dtype, device=H.device).copy_(H)


def _damping(diag: torch.Tensor, damp: float) -> float:
    return float(damp * diag.double().mean().clamp_min(1e-12))


def damp_(H: torch.Tensor, damp: float) -> float:
    """Add ``damp * mean(diag H)`` to the diagonal (SparseGPT's dampening), in place; returns the amount."""
    d = torch.diagonal(H)
    delta = _damping(d, damp)
    d += delta
    return delta


def _gram_damping(H: torch.Tensor, count: int, fit_bias: bool, damp: float) -> float:
    """The amount :func:`damp_` adds to the (augmented) Gram, from ``H``'s diagonal alone."""
    d = torch.diagonal(H).double()
    if fit_bias:
        d = torch.cat([d, d.new_full((1,), float(count))])
    return _damping(d, damp)


def _cholesky_(A: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of symmetric positive definite ``A``, in ``A``'s own storage.

    Returns ``U = A.mT`` (upper, ``A = U^T U``; ``A`` itself now reads as ``L = U^T``): LAPACK
    works on column-major data and the row-major ``A`` seen transposed is column-major, so
    nothing is copied."""
    U = A.mT
    info = torch.empty((), dtype=torch.int32, device=A.device)
    torch.linalg.cholesky_ex(U, upper=True, out=(U, info))
    if int(info):
        raise torch.linalg.LinAlgError(f"Gram matrix is not positive definite (leading minor {int(info)}); "
                                       "raise the dampening")
    return U


def _cholesky_solve_(U: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``(U^T U)^-1 B`` written over ``B``: two triangular solves in place (``cholesky_solve``
    would clone both ``U`` and ``B``)."""
    torch.linalg.solve_triangular(U.mT, B, upper=False, out=B)
    torch.linalg.solve_triangular(U, B, upper=True, out=B)
    return B


def _damped_inverse(H: torch.Tensor, zsum: torch.Tensor, count: int, fit_bias: bool, damp: float,
                    dtype: torch.dtype = torch.float64, factor: torch.dtype | None = None) -> tuple[torch.Tensor, float]:
    """``(A^-1 in dtype, delta)`` for the (augmented) Gram ``A`` of ``H``, damped by ``delta``.

    ``A`` lives only here, so it is freed as soon as it is not needed. The factor is in ``factor``
    (default :func:`factor_dtype`: ``dtype``); a float32 inverse comes from it by LAPACK potri,
    a float64 one by two triangular solves into an identity (potri measured slower than the solves
    in float64 beside other jobs, experiments.md). Where the factor is float64 and the path float32
    (``factor=torch.float64``, kept for the accuracy tests) the factor is cast down and dropped
    before the inverse is formed."""
    factor = factor or factor_dtype(H.device, dtype)
    with timed("factor"):
        A = _gram(H, zsum, count, fit_bias, factor)
        delta = damp_(A, damp)
        try:
            U = _cholesky_(A)
        except torch.linalg.LinAlgError:
            if factor == torch.float64:
                raise
            # float32 rounding broke positive definiteness (the damped condition number is at most
            # about 100 n, so this is rare): this module's factor in float64 instead
            log.warning("float32 Cholesky factor failed (n = %d): factored in float64", H.shape[0])
            del A
            factor = torch.float64
            A = _gram(H, zsum, count, fit_bias, factor)
            delta = damp_(A, damp)
            U = _cholesky_(A)
        if dtype != factor:
            U = U.to(dtype)
            del A  # U was a view of it: the float64 factor goes now
    with timed("inverse"):
        if dtype == torch.float32:
            # LAPACK potri (the factor's triangular inverse times its transpose): a third of the two
            # solves' flops; at the 7B MLP shape 14.4 s against 29.7 s (2 idle threads) at the same
            # accuracy against float64 (5.0e-7 against 5.7e-7; benchmarks/results/profile_solver_7b_mlp.md)
            Hinv = torch.cholesky_inverse(U, upper=True)  # column-major and exactly symmetric:
            return (Hinv.mT if Hinv.mT.is_contiguous() else Hinv.contiguous()), delta  # its transpose is row-major
        return _cholesky_solve_(U, torch.eye(U.shape[0], dtype=dtype, device=U.device)), delta


def _augmented_weights(W: torch.Tensor, bias: torch.Tensor | None, fit_bias: bool, device=None) -> torch.Tensor:
    """``[W, bias]`` (or ``W``) as a fresh float64 tensor on ``device`` (default: ``W``'s)."""
    d, n = W.shape
    out = torch.empty(d, n + fit_bias, dtype=torch.float64, device=device if device is not None else W.device)
    out[:, :n] = W.detach()
    if fit_bias:
        if bias is None:
            out[:, n] = 0
        else:
            out[:, n] = bias.detach()
    return out


def _cross_term(C: torch.Tensor, W, bias, fit_bias: bool, delta: float, n: int, cols=None) -> torch.Tensor:
    """``C`` against an external target, ridge-regularised toward the current weights ``W``
    (when given): dampening ``H + delta I`` then shrinks the refit toward ``W``, not toward 0,
    so an unpruned module with its own output as target is left exactly as it was.

    A fresh float64 ``[d, n(+1)]`` tensor, or only its columns ``cols``."""
    C = C.detach()
    if not fit_bias:
        C = C[:, :n]
    out = C[:, cols].double() if cols is not None else C.to(torch.float64, copy=True)
    if W is not None:
        Wd = _augmented_weights(W, bias, fit_bias, device=out.device)
        out.add_(Wd[:, cols] if cols is not None else Wd, alpha=delta)
    return out


@dataclass
class ModuleProblem:
    """One module's least-squares problem in statistic space, ready for greedy OBS.

    ``W`` is the current optimum for the live (not yet removed) columns and ``Hinv`` the
    inverse of the (augmented, damped) Gram restricted to them. Both are stored *compact*:
    a removal drops its rows/columns, so later steps cost O(live^2) instead of O(n^2) (on a
    7B MLP this makes a 32-step path about 3x cheaper). ``live[p]`` is the original index
    of compact position ``p``; every method takes and returns original indices. Column
    ``n`` is the bias when ``bias``.
    """

    W: torch.Tensor  # [d, live] (live = n(+1) before any removal)
    Hinv: torch.Tensor  # [live, live]
    n: int
    bias: bool
    base_error: float  # error of the unpruned optimum against the target (0 for own output)
    removed: list = field(default_factory=list)
    live: torch.Tensor | None = None  # stored position -> original index (-1: removed)
    position: torch.Tensor | None = None  # original index -> stored position (-1: removed)

    def __post_init__(self):
        m, dev = self.Hinv.shape[0], self.Hinv.device
        if self.live is None:
            self.live = torch.arange(m, device=dev)
        if self.position is None:
            self.position = torch.arange(m, device=dev)

    def _at(self, cols: torch.Tensor) -> torch.Tensor:
        """Stored positions of original (live) indices ``cols``."""
        p = self.position[cols.to(self.position.device)]
        if bool((p < 0).any()):
            raise ValueError("column already removed")
        return p

    @classmethod
    def build(cls, H: torch.Tensor, zsum: torch.Tensor, count: int, W: torch.Tensor | None = None,
              C: torch.Tensor | None = None, bias: torch.Tensor | None = None, fit_bias: bool = True,
              damp: float = 0.01, yy: float | None = None, dtype=torch.float64,
              factor: torch.dtype | None = None) -> "ModuleProblem":
        """From statistics. Give ``W`` (own output target, with optional current ``bias``)
        or ``C = sum y [z;1]^T`` (external target; then ``yy = sum |y|^2`` gives ``base_error``,
        and ``W``/``bias``, if also given, are the ridge prior of the dampening).

        ``dtype=torch.float32`` factors the Gram, forms the inverse and runs the greedy path
        (which only orders removals; refits are separate solves) in float32, twice as fast as
        float64. ``factor``: the factor's dtype (default :func:`factor_dtype`: the path's)."""
        n = H.shape[0]
        Hinv, delta = _damped_inverse(H, zsum, count, fit_bias, damp, dtype, factor)
        if C is None:
            Wd = _augmented_weights(W, bias, fit_bias, device=Hinv.device)
            base = 0.0
        else:
            C = _cross_term(C.to(Hinv.device), W, bias, fit_bias, delta, n)
            Wd = torch.zeros_like(C)  # C @ Hinv in float64, a row chunk of Hinv at a time
            for i, j in _chunks(C.shape[1]):
                Wd.addmm_(C[:, i:j], Hinv[i:j].double())
            base = float(yy - torch.dot(Wd.reshape(-1), C.reshape(-1))) if yy is not None else 0.0
            del C
        return cls(W=Wd.to(dtype), Hinv=Hinv, n=n, bias=fit_bias, base_error=max(base, 0.0))

    def block_error(self, cols: torch.Tensor) -> float:
        """Error increase of removing columns ``cols`` now (jointly)."""
        p = self._at(cols)
        E = self.Hinv.index_select(0, p).index_select(1, p)
        Ws = self.W.index_select(1, p)
        # tr(Ws E^-1 Ws^T) without the [d, d] product
        return float((torch.linalg.solve(E, Ws.T) * Ws.T).sum())

    def remove(self, cols: torch.Tensor) -> float:
        """Remove ``cols`` with the optimal update of the rest; returns the error increase."""
        # index_select, not advanced indexing: column gathers by advanced indexing took most of
        # a path's time (more than the downdates' matrix products).
        p = self._at(cols)
        rows = self.Hinv.index_select(0, p)  # [s, stored]
        Einv = torch.linalg.inv(rows.index_select(1, p))
        Ws = self.W.index_select(1, p)
        WsEinv = Ws @ Einv
        err = float((WsEinv * Ws).sum())  # tr(Ws Einv Ws^T) without the [d, d] product
        self.W.addmm_(WsEinv, rows, alpha=-1)  # in place: no [n, n] temporaries
        self.Hinv.addmm_(rows.T, Einv @ rows, alpha=-1)
        del rows
        # The downdate zeroes the removed rows/columns up to rounding; they are never read again.
        # W's are cleaned (W is the refit). Once a quarter of the storage is dead, it is dropped
        # in place: later steps then cost O(live^2) (compacting every step costs more in gathers
        # than it saves).
        self.W.index_fill_(1, p, 0)
        self.position[self.live[p]] = -1
        self.live[p] = -1
        alive = self.live >= 0
        dead = self.live.numel() - int(alive.sum())
        if dead >= max(1, self.live.numel() // 4):
            keep = alive.nonzero().squeeze(1)
            self.Hinv = _drop_(_drop_(self.Hinv, keep, 0), keep, 1)
            self.W = _drop_(self.W, keep, 1)
            self.live = self.live[keep]
            self.position[self.live] = torch.arange(self.live.numel(), device=self.live.device)
        self.removed.append(cols)
        return max(err, 0.0)

    def single_errors(self, alive: torch.Tensor) -> torch.Tensor:
        """Errors of removing each single alive column (one-column OBS scores)."""
        p = self._at(alive)
        d = torch.diagonal(self.Hinv)[p].clamp_min(1e-30)
        norms = self.W.new_zeros(self.W.shape[1])
        for i, j in _chunks(self.W.shape[0]):  # squared column norms, no [d, n] temporary
            norms += self.W[i:j].square().sum(0)
        return norms[p] / d

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Refitted ``(W[:, :n], bias)`` for the kept columns (removed columns are 0)."""
        W = self.W.new_zeros(self.W.shape[0], self.n + self.bias)
        alive = self.live >= 0
        W[:, self.live[alive]] = self.W[:, alive]
        if self.bias:
            return W[:, :self.n], W[:, self.n]
        return W, None


@dataclass
class Path:
    """A greedy removal path: step ``s`` removes ``steps[s]`` at ``costs[s]`` parameters, adding
    ``errors[s]`` to the module's error. Options along the path are prefixes."""

    steps: list  # per step: removed channel indices (MLP) or an attention option (kv, per_group)
    costs: list[float]
    errors: list[float]
    kept: list  # kept structure set after each prefix (index 0 = nothing removed)
    base_error: float = 0.0


def channel_path(problem: ModuleProblem, min_keep: int, cost_per_channel: float, block: int | None = None,
                 stop=None) -> Path:
    """Greedy OBS removal of MLP channels down to ``min_keep``, ``block`` channels per step.

    ``stop(cost)``, when given, is called with each step's cost after the step and ends the path
    early when it returns True (a pass that needs the path only down to an allocated width).

    One channel per step is exact greedy; removing the ``block`` lowest-scoring channels at
    once (default ``n // 64``: 64 steps per module) keeps the cost at O(n^3 / block) for wide
    MLPs. Each block's error is still exact (joint OBS); only the choice inside it is by
    single-channel scores.
    """
    n = problem.n
    block = block or max(1, n // 64)
    alive = torch.ones(n, dtype=torch.bool, device=problem.Hinv.device)
    steps, costs, errors = [], [], []
    kept_counts = [n]
    while kept_counts[-1] > min_keep:
        idx = alive.nonzero().squeeze(1)
        k = min(block, kept_counts[-1] - min_keep)
        scores = problem.single_errors(idx)
        cols = idx[scores.topk(k, largest=False).indices]
        err = problem.remove(cols)
        alive[cols] = False
        steps.append(cols.tolist())
        costs.append(k * cost_per_channel)
        errors.append(err)
        kept_counts.append(kept_counts[-1] - k)
        if stop is not None and stop(costs[-1]):
            break
    return Path(steps, costs, errors, kept_counts, problem.base_error)


def attention_path(problem: ModuleProblem, shape: AttentionShape, target: tuple[int, int] = (1, 1),
                   stop=None) -> Path:
    """Greedy OBS path over legal GQA states (same head count in every kept group).

    Each step either drops the weakest head of every kept group (one head per group,
    chosen jointly) or drops the weakest whole KV group, whichever costs less error
    per parameter removed; only moves that keep ``target = (kv_heads, per_group)``
    reachable are allowed, and the path ends there. For MHA (group size 1) this is
    plain greedy head removal. ``stop``: as in :func:`channel_path`.
    """
    G, dh = shape.group_size, shape.head_dim
    dev = problem.Hinv.device
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
                e = [problem.block_error(head_rows([h], dh, dev)) for h in hs]
                drop.append(hs[min(range(len(hs)), key=e.__getitem__)])
            cost = shape.cost(kv, m) - shape.cost(kv, m - 1)
            candidates.append((problem.block_error(head_rows(drop, dh, dev)) / cost, "heads", drop, cost))
        if kv > target[0]:
            for g, hs in groups.items():
                cost = shape.cost(kv, m) - shape.cost(kv - 1, m)
                candidates.append((problem.block_error(head_rows(hs, dh, dev)) / cost, "group", g, cost))
        _, kind, what, cost = min(candidates, key=lambda c: c[0])
        if kind == "heads":
            err = problem.remove(head_rows(what, dh, dev))
            for h in what:
                groups[h // G].remove(h)
            state = (kv, m - 1)
        else:
            err = problem.remove(head_rows(groups[what], dh, dev))
            del groups[what]
            state = (kv - 1, m)
        steps.append(state)
        costs.append(float(cost))
        errors.append(err)
        kept.append({g: list(h) for g, h in groups.items()})
        if stop is not None and stop(costs[-1]):
            break
    return Path(steps, costs, errors, kept, problem.base_error)


def refit(H: torch.Tensor, zsum: torch.Tensor, count: int, keep: torch.Tensor, *, W: torch.Tensor | None = None,
          C: torch.Tensor | None = None, bias: torch.Tensor | None = None, fit_bias: bool = True,
          damp: float = 0.01, solve_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares refit of the output projection on kept columns ``keep``.

    Returns ``(W_K [d, |K|], bias or None)`` minimising the error against the module's
    own dense output (``W``, ``bias``) or an external target given by ``C`` ([d, n+1]
    with the bias column when ``fit_bias``, else [d, n]); with both, ``W``/``bias`` are the
    ridge prior (dampening shrinks toward them).

    Works on ``H[K, K]`` alone: one ``[|K|+1, |K|+1]`` buffer in the solve's dtype, factored in place.

    Against the module's own output the refit is written as a correction of the kept weights,
    ``W_K + W_R G_RK A^-1`` (``R`` the removed columns, ``G`` the augmented Gram, ``A = G_KK + delta I``):
    the same least-squares solution as ``C_K A^-1`` with ``C = W (G + delta I)``, since
    ``C_K = W_K A + W_R G_RK``, but its cross term costs ``|R|/n`` of the full one's products
    (a 30% cut: 30%), and only the correction carries the solve's rounding (nothing removed:
    ``W_K`` exactly). That is what lets the own-output refit factor and solve in ``solve_dtype``
    (default :func:`refit_dtype`: float64 on the CPU, float32 on an accelerator); against an external
    target the solve is float64."""
    n, dev = H.shape[0], H.device
    K = torch.as_tensor(keep, dtype=torch.long, device=dev)
    k = K.numel()
    Ka = torch.cat([K, K.new_full((1,), n)]) if fit_bias else K
    delta = _gram_damping(H, count, fit_bias, damp)
    if C is None:
        Wd = _augmented_weights(W, bias, fit_bias, device=dev)
        CK = _removed_cross_term(H, zsum, K, Wd, fit_bias)
        dtype = solve_dtype or refit_dtype(dev)
    else:
        Wd, CK = None, _cross_term(C.to(dev), W, bias, fit_bias, delta, n, cols=Ka)
        dtype = torch.float64
    A = torch.empty(k + fit_bias, k + fit_bias, dtype=dtype, device=dev)
    for i, j in _chunks(k):  # H[K, K] without a [|K|, n] intermediate
        A[i:j, :k] = H[K[i:j, None], K]
    if fit_bias:
        zK = zsum[K]
        A[:k, k] = zK
        A[k, :k] = zK
        A[k, k] = count
    torch.diagonal(A).add_(delta)
    WK = _cholesky_solve_(_cholesky_(A), CK.T.to(dtype)).T  # C_K H_KK^-1 (H symmetric), in CK's storage
    if Wd is not None:  # own output: the solve gave the correction of the kept weights
        WK = Wd[:, Ka] + WK.double()
    if fit_bias:
        return WK[:, :-1], WK[:, -1]
    return WK, None


def _removed_cross_term(H, zsum, K: torch.Tensor, Wd: torch.Tensor, fit_bias: bool) -> torch.Tensor:
    """``W_R G_RK``: the removed columns' weights times their rows of the (augmented) Gram at the
    kept columns (and the bias column), a fresh float64 ``[d, |K|(+1)]``, summed over chunks of the
    removed rows (no float64 copy of ``H``)."""
    n, k = H.shape[0], K.numel()
    kept = torch.zeros(n, dtype=torch.bool, device=H.device)
    kept[K] = True
    R = (~kept).nonzero().squeeze(1)
    D = Wd.new_zeros(Wd.shape[0], k + fit_bias)
    for i, j in _chunks(R.numel()):
        rows = R[i:j]
        D[:, :k].addmm_(Wd[:, rows], H.index_select(0, rows).index_select(1, K).double())
        if fit_bias:
            D[:, k].addmv_(Wd[:, rows], zsum[rows].double())
    return D


def obs_prune_mlp(W, H, zsum, count, n_keep: int, *, bias=None, fit_bias=True, damp=0.01, C=None, yy=None):
    """Greedy OBS down to ``n_keep`` channels; returns ``(kept, W_K, bias)`` refitted."""
    prob = ModuleProblem.build(H, zsum, count, W=W, C=C, bias=bias, fit_bias=fit_bias, damp=damp, yy=yy)
    path = channel_path(prob, n_keep, 1.0)
    removed = set(c for step in path.steps for c in step)
    kept = [c for c in range(prob.n) if c not in removed]
    Wn, b = prob.weights()
    del prob  # frees the n x n inverse before the copy-out
    return kept, Wn[:, torch.tensor(kept, dtype=torch.long, device=Wn.device)], b


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
    del prob  # frees the n x n inverse before the copy-out
    return heads, groups, Wn[:, head_rows(heads, shape.head_dim, Wn.device)], b
