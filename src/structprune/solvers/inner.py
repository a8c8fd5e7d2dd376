"""Coordination inside one layer's MLP: auxiliary variables couple the kept rows of the input
projections with the output projection (SparseLLM, arXiv 2402.17946, for an FFN).

After the channel choice and the least-squares refit of the down projection (solvers/modules.py),
a one-part MLP ``y = D (phi(G x) * (U x)) + c`` (gated: SwiGLU, GeGLU; ``y = D phi(G x) + c``
without ``U``: OPT's fc1/fc2) has its kept rows of ``G``, ``U`` refitted too. The exact problem

    min_{G, U, D, c}  sum_tokens |t - D (phi(G x) * (U x)) - c|^2

(``t`` the module's target on the pruned model's inputs, ``x`` its input there) is not a least
squares in ``G``; with auxiliaries ``a`` (gate pre-activation), ``b`` (up output) and ``p``
(down input) per token it becomes

    L = alpha |t - D p - c|^2 + beta |p - phi(a) * b|^2 + gamma (|a - G x|^2 + |b - U x|^2)

whose blocks each have a closed form (or one Gauss-Newton step for the nonlinearity):

* ``p = (alpha D^T D + beta I)^-1 (alpha D^T (t - c) + beta phi(a) * b)``: one ``k x k`` factor
  per iteration, applied to every token;
* ``b = (beta phi(a) p + gamma U x) / (beta phi(a)^2 + gamma)``, elementwise;
* ``a``: one Gauss-Newton step of ``beta (p - phi(a) b)^2 + gamma (a - G x)^2`` around the current
  ``a`` (``phi`` linearised), elementwise, always defined;
* ``G``, ``U``: ridge least squares of ``a``, ``b`` on ``x`` (Gram of ``x``, shrunk toward the
  current rows by ``input_damp``, default the project's dampening); ``D``, ``c``: least squares of ``t`` on ``p``.

Fixed point and what each variable can change: for fixed weights the auxiliaries sit where the
output residual ``t - D p`` is traded against the distance to the forward values; the gradient of
``L`` in ``G`` and ``U`` is ``gamma (a - G x) x^T`` and ``gamma (b - U x) x^T``, so the input
rows move exactly where the auxiliaries pull the forward values toward a lower output residual.
As ``beta, gamma -> inf`` the auxiliaries are pinned to the forward values and only ``D`` moves:
today's refit. At a fixed point every block is optimal given the others (a coordinate-wise
stationary point of ``L``). ``L`` is a relaxation: the result is judged on the exact objective.
After the iterations ``D``, ``c`` are refitted once more on the *true* forward activations of the
new ``G``, ``U`` (exact least squares), and the new rows are kept only if that exact calibration
error is below the error of the plain refit; otherwise the layer is left as it was. So the
calibration objective never rises; whether held-out text gains is measured (docs/structprune.md).

Memory: the auxiliaries ``a``, ``b`` of every calibration token (two activation stores of the kept
width, RAM up to the activation budget, disk beyond), the MLP's inputs and targets (stored by
the caller), and ``engine.budget.inner_refit_bytes`` of matrices; one layer resident.
"""

from __future__ import annotations

import time

import torch

from ..engine import distributed
from ..engine.activations import ActivationStore
from ..engine.clock import timed_call
from ..engine.stats import StatsAccumulator
from .obs import refit

#: SparseLLM's FFN penalties (alpha = beta = gamma = 0.1 in its code): only their ratios matter.
ALPHA, BETA, GAMMA = 1.0, 1.0, 1.0


def _spd_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A^-1 B`` for symmetric positive definite ``A`` (float64)."""
    return torch.cholesky_solve(B, torch.linalg.cholesky(A))


def as_tokens(t: torch.Tensor, device) -> torch.Tensor:
    """A chunk's ``[..., d]`` activations as float32 ``[tokens, d]`` on ``device``."""
    return t.to(device).float().reshape(-1, t.shape[-1])


def _with_one(x: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([x, x.new_ones(x.shape[0], 1)], 1) if bias else x


def _act_and_slope(act, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``phi(a)`` and ``phi'(a)`` elementwise (any activation torch can differentiate)."""
    with torch.enable_grad():
        a = a.detach().requires_grad_(True)
        y = act(a)
        (g,) = torch.autograd.grad(y.sum(), a)
    return y.detach(), g.detach()


class _Rows:
    """One input projection's kept rows as ``[k, d (+1)]`` float64, read from and written to the layer."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias
        self.M = weight.detach().double()
        if bias is not None:
            self.M = torch.cat([self.M, bias.detach().double()[:, None]], 1)

    def apply(self, xt: torch.Tensor) -> torch.Tensor:
        return xt @ self.M.T.to(xt.dtype)

    @torch.no_grad()
    def write(self, M: torch.Tensor) -> None:
        d = self.weight.shape[1]
        self.weight.copy_(M[:, :d].to(self.weight.dtype))
        if self.bias is not None:
            self.bias.copy_(M[:, d].to(self.bias.dtype))


@timed_call("input refit")
def refit_mlp_inputs(adapter, layer, xs: ActivationStore, ts: ActivationStore, device, iterations: int,
                     fit_bias: bool, damp: float, row_damp: float | None = None) -> dict:
    """Refit the kept rows of a one-part MLP's input projections with its output projection
    (the module docstring's alternating closed forms, ``iterations`` of them) toward targets
    ``ts`` on inputs ``xs`` (one chunk each, the MLP's input and its target output per token).
    ``damp`` dampens the output projection's refits, ``row_damp`` (default ``damp``) the input rows'
    ridge toward their current values.

    Keeps the result only if its exact calibration error is lower; returns
    ``{"error_before", "error_after", "adopted", "gated", "seconds"}`` (errors as sums of squares)."""
    t0 = time.perf_counter()
    part = adapter.mlp_parts(layer)[0]
    act = adapter.mlp_activation(layer)
    ins, in_b = part.in_weights(), part.in_biases()
    gated = len(ins) == 2
    rows = [_Rows(w, b) for w, b in zip(ins, in_b)]
    xbias = [b is not None for b in in_b]
    D0 = part.out_weight().detach().double()
    c0 = None if part.out_bias() is None else part.out_bias().detach().double()
    out_bias = fit_bias and part.bias_ok
    d = ins[0].shape[1]

    def forward_z(xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        a = rows[0].apply(_with_one(xt, xbias[0]))
        b = rows[1].apply(_with_one(xt, xbias[1])) if gated else None
        return (act(a) * b if gated else act(a)), a, b

    def out_of(z: torch.Tensor, D: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        y = z @ D.T.to(z.dtype)
        return y if c is None else y + c.to(z.dtype)

    # Sweep 0: the forward auxiliaries, the Gram of x, the plain refit's exact error.
    Sxx = torch.zeros(d + 1, d + 1, dtype=torch.float64, device=device)
    A_st, B_st = ActivationStore(), ActivationStore()
    err0, count = [], 0  # per-chunk sums: added exactly (the same on any split over ranks)
    for x, t in zip(xs, ts):
        xt, tt = as_tokens(x, device), as_tokens(t, device)
        x1 = _with_one(xt, True)
        Sxx += (x1.T @ x1).double()
        z, a, b = forward_z(xt)
        err0.append(float((tt - out_of(z, D0, c0)).pow(2).sum()))
        count += xt.shape[0]
        A_st.append(a.cpu())
        if gated:
            B_st.append(b.cpu())
    distributed.sum_tensors([Sxx])
    err0, count = distributed.fsum_parts(err0), sum(distributed.gather_objects(count))
    Sx = [Sxx if xb else Sxx[:d, :d] for xb in xbias]
    row_damp = damp if row_damp is None else row_damp
    ridge = [row_damp * float(torch.diagonal(S).mean().clamp_min(1e-12)) for S in Sx]
    D, c = D0, c0
    for _ in range(iterations):
        k = D.shape[1]
        # float32: alpha D^T D + beta I is well conditioned (beta I), and k x k is the largest buffer here
        L = torch.linalg.cholesky(ALPHA * (D.T @ D).float() + BETA * torch.eye(k, device=device))
        cross = [torch.zeros(r.M.shape, dtype=torch.float64, device=device) for r in rows]
        acc = StatsAccumulator(gram=True)
        A_new, B_new = ActivationStore(), ActivationStore()
        for ci, (x, t) in enumerate(zip(xs, ts)):
            xt, tt = as_tokens(x, device), as_tokens(t, device)
            a = A_st[ci].to(device).float()
            b = B_st[ci].to(device).float() if gated else None
            fa, slope = _act_and_slope(act, a)
            pre = fa * b if gated else fa
            resid = tt if c is None else tt - c.float()
            rhs = ALPHA * (resid @ D.float()) + BETA * pre
            p = torch.cholesky_solve(rhs.T, L).T  # [tokens, k]
            if gated:  # b: a weighted mean of the product's fit and the forward value
                ux = rows[1].apply(_with_one(xt, xbias[1]))
                b = (BETA * fa * p + GAMMA * ux) / (BETA * fa * fa + GAMMA)
                coef = b * slope  # d(phi(a) b)/da
                lin = fa * b - coef * a  # phi(a) b ~ lin + coef a'
            else:
                coef, lin = slope, fa - slope * a
            gx = rows[0].apply(_with_one(xt, xbias[0]))
            a = (BETA * coef * (p - lin) + GAMMA * gx) / (BETA * coef * coef + GAMMA)
            for j, (r, v) in enumerate(zip(rows, (a, b) if gated else (a,))):
                cross[j] += (v.T @ _with_one(xt, xbias[j])).double()
            acc.add_z("mlp", p, d, target=tt)
            A_new.append(a.cpu())
            if gated:
                B_new.append(b.cpu())
        A_st.close()
        B_st.close()
        A_st, B_st = A_new, B_new
        del L
        distributed.sum_tensors(cross)
        for j, r in enumerate(rows):  # ridge toward the current rows: (C + rI R)(S + rI)^-1
            S = Sx[j] + ridge[j] * torch.eye(Sx[j].shape[0], dtype=torch.float64, device=device)
            r.M = _spd_solve(S, (cross[j] + ridge[j] * r.M).T).T
        st = acc.finish()["mlp"]
        D, c = refit(st.gram, st.zsum, st.count, torch.arange(D.shape[1], device=st.gram.device), C=st.C,
                     W=D, bias=c, fit_bias=out_bias, damp=damp)
        D = D.double()
        c = None if c is None else c.double()
    A_st.close()
    B_st.close()
    # The exact problem for the new rows: D, c refitted on the true forward activations.
    acc = StatsAccumulator(gram=True)
    for x, t in zip(xs, ts):
        z, _, _ = forward_z(as_tokens(x, device))
        acc.add_z("mlp", z, d, target=as_tokens(t, device))
    st = acc.finish()["mlp"]
    D, c = refit(st.gram, st.zsum, st.count, torch.arange(D.shape[1], device=st.gram.device), C=st.C,
                 W=D0, bias=c0, fit_bias=out_bias, damp=damp)
    err1 = []
    for x, t in zip(xs, ts):
        z, _, _ = forward_z(as_tokens(x, device))
        err1.append(float((as_tokens(t, device) - out_of(z, D.double(), None if c is None else c.double())).pow(2).sum()))
    err1 = distributed.fsum_parts(err1)
    adopted = iterations > 0 and err1 < err0
    if adopted:
        for r in rows:
            r.write(r.M)
        part.set_output(D, c)
    return {"error_before": err0, "error_after": err1, "adopted": adopted, "gated": gated, "tokens": count,
            "seconds": time.perf_counter() - t0}


__all__ = ["ALPHA", "BETA", "GAMMA", "as_tokens", "refit_mlp_inputs"]
