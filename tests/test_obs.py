"""The closed form of method.md equals brute-force least squares."""

import pytest
import torch

from structprune.adapters.base import AttentionShape
from structprune.solvers.obs import ModuleProblem, channel_path, obs_prune_attention, obs_prune_mlp, refit


def _data(seed=0, d=20, n=30, T=500):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(T, n, generator=g) @ torch.randn(n, n, generator=g) * 0.3 + 0.5
    W, b = torch.randn(d, n, generator=g), torch.randn(d, generator=g)
    return Z, W, b


def _lstsq(Z, cols, Y):
    A = torch.cat([Z[:, cols], torch.ones(Z.shape[0], 1)], 1).double()
    sol = torch.linalg.lstsq(A, Y.double()).solution
    return sol[:-1].T, sol[-1], ((Y.double() - A @ sol) ** 2).sum()


def test_mlp_refit_equals_lstsq_and_error_is_tracked():
    Z, W, b = _data()
    Y = Z @ W.T + b
    H, zs, T = Z.T @ Z, Z.sum(0), Z.shape[0]
    kept, WK, bK = obs_prune_mlp(W, H, zs, T, 12, bias=b, damp=1e-9)
    Wl, bl, err = _lstsq(Z, kept, Y)
    assert (Wl - WK).abs().max() < 1e-4 and (bl - bK).abs().max() < 1e-4
    path = channel_path(ModuleProblem.build(H, zs, T, W=W, bias=b, damp=1e-9), 12, 1.0, block=1)
    removed = {c for s in path.steps for c in s}
    _, _, true_err = _lstsq(Z, [c for c in range(30) if c not in removed], Y)
    assert abs(sum(path.errors) - true_err) / true_err < 1e-5


def test_greedy_beats_random_subset():
    Z, W, b = _data(1)
    Y = Z @ W.T + b
    kept, _, _ = obs_prune_mlp(W, Z.T @ Z, Z.sum(0), Z.shape[0], 10, bias=b, damp=1e-9)
    _, _, err = _lstsq(Z, kept, Y)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        _, _, err_rand = _lstsq(Z, torch.randperm(30, generator=g)[:10].tolist(), Y)
        assert err <= err_rand


def test_attention_state_is_legal_and_refit_exact():
    Z, W, b = _data(2)
    Y = Z @ W.T + b
    shape = AttentionShape(num_heads=6, num_kv_heads=2, head_dim=5, hidden_size=20, qkv_bias=False)
    for kv, m in [(2, 2), (1, 3), (1, 1)]:
        heads, groups, WK, bK = obs_prune_attention(W, Z.T @ Z, Z.sum(0), Z.shape[0], shape, kv, m,
                                                    bias=b, damp=1e-9)
        assert len(groups) == kv and len(heads) == kv * m
        assert all(sum(h // 3 == g for h in heads) == m for g in groups)
        cols = [h * 5 + i for h in heads for i in range(5)]
        Wl, bl, _ = _lstsq(Z, cols, Y)
        assert (Wl - WK).abs().max() < 1e-4


def test_external_target_refit():
    Z, W, b = _data(4)
    Yt = Z @ W.T + b + torch.randn(500, 20, generator=torch.Generator().manual_seed(5)) * 0.5
    Za = torch.cat([Z, torch.ones(500, 1)], 1).double()
    C = Yt.double().T @ Za
    kept, WK, bK = obs_prune_mlp(None, Z.T @ Z, Z.sum(0), 500, 12, C=C, damp=1e-9, yy=float((Yt.double() ** 2).sum()))
    Wl, bl, _ = _lstsq(Z, kept, Yt)
    assert (Wl - WK).abs().max() < 1e-4
    W2, b2 = refit(Z.T @ Z, Z.sum(0), 500, torch.tensor(kept), C=C, damp=1e-9)
    assert (W2 - WK).abs().max() < 1e-8 and (b2 - bK).abs().max() < 1e-8


def test_dampening_shrinks_an_external_target_refit_toward_the_current_weights():
    """With the module's own output given as an external target (``C = [W b] H``), a refit that
    keeps everything must return ``W`` unchanged at any dampening when ``W`` is the prior; without
    the prior the ridge pulls toward 0 and shrinks the weights."""
    Z, W, b = _data(6)
    Z = Z.double()
    H, s = Z.T @ Z, Z.sum(0)
    Za = torch.cat([Z, torch.ones(500, 1)], 1).double()
    C = torch.cat([W, b[:, None]], 1).double() @ (Za.T @ Za)
    keep = torch.arange(30)
    W1, b1 = refit(H, s, 500, keep, C=C, W=W, bias=b, damp=0.1)
    assert (W1 - W.double()).abs().max() < 1e-8 and (b1 - b.double()).abs().max() < 1e-8
    W0, _ = refit(H, s, 500, keep, C=C, damp=0.1)
    assert (W0 - W.double()).abs().max() > 1e-3
    # The path built from the same statistics starts at W too, and its refits agree with refit().
    prob = ModuleProblem.build(H, s, 500, C=C, W=W, bias=b, damp=0.1)
    assert (prob.W[:, :30] - W.double()).abs().max() < 1e-8
    path = channel_path(prob, 20, 1.0, block=5)
    kept = torch.tensor(sorted(set(range(30)) - {c for st in path.steps for c in st}))
    Wp, bp = prob.weights()
    Wr, br = refit(H, s, 500, kept, C=C, W=W, bias=b, damp=0.1)
    assert (Wp[:, kept] - Wr).abs().max() < 1e-6 and (bp - br).abs().max() < 1e-6


def test_own_output_refit_equals_the_external_target_it_stands_for():
    """``refit(W=...)`` solves for the correction ``W_R G_RK A^-1`` of the kept weights; it must equal
    the refit against the external target ``C = [W b] G`` with ``W`` as the ridge prior; with nothing
    removed it returns the weights bit for bit."""
    Z, W, b = _data(7)
    Z = Z.double()
    H, s = Z.T @ Z, Z.sum(0)
    Za = torch.cat([Z, torch.ones(500, 1)], 1)
    keep = torch.tensor([0, 3, 4, 8, 9, 15, 16, 22, 23, 29])
    for fit_bias in (True, False):
        C = torch.cat([W, b[:, None]], 1).double() @ (Za.T @ Za) if fit_bias else W.double() @ H
        Wo, bo = refit(H, s, 500, keep, W=W, bias=b, fit_bias=fit_bias, damp=0.05)
        Wc, bc = refit(H, s, 500, keep, C=C, W=W, bias=b, fit_bias=fit_bias, damp=0.05)
        assert (Wo - Wc).abs().max() < 1e-9 * Wc.abs().max()
        assert (bo is None) == (not fit_bias) and (bo is None or (bo - bc).abs().max() < 1e-9 * bc.abs().max())
        Wa, ba = refit(H, s, 500, torch.arange(H.shape[0]), W=W, bias=b, fit_bias=fit_bias, damp=0.05)
        assert torch.equal(Wa, W.double()) and (ba is None or torch.equal(ba, b.double()))


def test_problem_owns_its_weights_and_refuses_an_indefinite_gram():
    """The greedy path updates its weights in place and the Gram is damped in place: never the
    caller's (a float64 W or H without the bias column used to be aliased). A Gram that is not
    positive definite is an error, not NaNs."""
    Z, W, _ = _data(8)
    W, H = W.double(), (Z.T @ Z).double()
    W0, H0 = W.clone(), H.clone()
    prob = ModuleProblem.build(H, Z.sum(0), 500, W=W, fit_bias=False, damp=1e-6)
    channel_path(prob, 10, 1.0, block=5)
    refit(H, Z.sum(0), 500, torch.arange(10), W=W, fit_bias=False)
    assert torch.equal(W, W0) and torch.equal(H, H0)
    with pytest.raises(torch.linalg.LinAlgError):
        ModuleProblem.build(-torch.eye(30), torch.zeros(30), 500, W=W, fit_bias=False)


def test_a_float32_factor_orders_removals_as_the_float64_one():
    """What lets an accelerator skip float64 in the removal paths (solvers/obs.py factor_dtype): on
    a correlated heavy-tailed Gram (SiLU-gated, 1% outlier channels x30, 1% dampening), a path from a
    float32 Cholesky factor removes the same channels as one from the float64 factor, with every
    step's error within 1e-5: so a float32 path factors in float32 on every device."""
    from structprune.solvers.obs import factor_dtype

    g = torch.Generator().manual_seed(0)
    n, d, T = 384, 144, 2048
    X = torch.randn(T, n, generator=g) @ (torch.eye(n) + 0.1 * torch.randn(n, n, generator=g) / n ** 0.5)
    Z = torch.nn.functional.silu(X) * torch.randn(T, n, generator=g) * (1 + 30 * (torch.rand(n, generator=g) < 0.01))
    H, zs, W = (Z.T @ Z).double(), Z.sum(0).double(), torch.randn(d, n, generator=g)
    paths = {f: channel_path(ModuleProblem.build(H, zs, T, W=W, dtype=torch.float32, factor=f), 19, 1.0, block=12)
             for f in (torch.float64, torch.float32)}
    a, b = paths[torch.float64], paths[torch.float32]
    assert a.steps == b.steps
    assert max(abs(x - y) / x for x, y in zip(a.errors, b.errors)) < 1e-5
    assert factor_dtype("cpu", torch.float32) == torch.float32 == factor_dtype("cuda", torch.float32)
    assert factor_dtype("cpu", torch.float64) == torch.float64 == factor_dtype("cuda", torch.float64)


def test_a_float32_factor_that_fails_is_redone_in_float64(caplog):
    """A Gram positive definite in float64 whose float32 rounding is not (rank 8 plus 1e-9 I, no
    dampening): the module's factor falls back to float64, with a warning, instead of failing the run;
    a Gram that is not positive definite in float64 either still raises."""
    g = torch.Generator().manual_seed(0)
    n = 40
    V = torch.randn(n, 8, generator=g, dtype=torch.float64)
    H = V @ V.T + 1e-9 * torch.eye(n, dtype=torch.float64)
    assert int(torch.linalg.cholesky_ex(H.float()).info) != 0  # the premise: float32 fails here
    with caplog.at_level("WARNING", logger="structprune.solvers.obs"):
        p = ModuleProblem.build(H, torch.zeros(n, dtype=torch.float64), 100, W=torch.randn(5, n), fit_bias=False,
                                damp=0.0, dtype=torch.float32)
    assert p.Hinv.dtype == torch.float32 and "factored in float64" in caplog.text
    with pytest.raises(torch.linalg.LinAlgError):
        ModuleProblem.build(-H, torch.zeros(n, dtype=torch.float64), 100, W=torch.randn(5, n), fit_bias=False,
                            damp=0.0, dtype=torch.float32)


def test_float32_inverse_is_row_major_and_matches_float64():
    """The float32 path's inverse (LAPACK potri from the float64 factor) is a row-major [n+1, n+1]
    tensor (the in-place compaction of ModuleProblem needs it) within 1e-5 of the float64 inverse."""
    from structprune.solvers.obs import _damped_inverse

    Z, _, _ = _data(n=40, T=400)
    H, zs = (Z.T @ Z).double(), Z.sum(0).double()
    ref, d64 = _damped_inverse(H, zs, 400, True, 0.01, torch.float64)
    got, d32 = _damped_inverse(H, zs, 400, True, 0.01, torch.float32)
    assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == (41, 41) and d32 == d64
    assert torch.equal(got, got.T)
    assert float((got.double() - ref).norm() / ref.norm()) < 1e-5


def test_a_float32_own_output_refit_fits_as_well_as_the_float64_one():
    """What lets an accelerator skip float64 in the refit (solvers/obs.py refit_dtype): solved as a
    correction of the kept weights, a float32 factor and solve on a correlated heavy-tailed Gram
    (SiLU-gated, 1% outlier channels x30, 1% dampening) leaves an error against the module's own
    output within 1e-6 (relative) of the float64 refit's; the CPU keeps float64."""
    from structprune.solvers.obs import precision, refit_dtype

    g = torch.Generator().manual_seed(0)
    n, d, T = 384, 144, 2048
    X = torch.randn(T, n, generator=g) @ (torch.eye(n) + 0.1 * torch.randn(n, n, generator=g) / n ** 0.5)
    Z = torch.nn.functional.silu(X) * torch.randn(T, n, generator=g) * (1 + 30 * (torch.rand(n, generator=g) < 0.01))
    Z = Z.double()
    H, zs, W, b = Z.T @ Z, Z.sum(0), torch.randn(d, n, generator=g), torch.randn(d, generator=g)
    keep = torch.randperm(n, generator=g)[: int(0.6 * n)].sort().values
    Y = Z @ W.double().T + b.double()

    def error(Wk, bk):
        return float(((Z[:, keep] @ Wk.T + bk - Y) ** 2).sum())

    e64 = error(*refit(H, zs, T, keep, W=W, bias=b, damp=0.01, solve_dtype=torch.float64))
    W32, b32 = refit(H, zs, T, keep, W=W, bias=b, damp=0.01, solve_dtype=torch.float32)
    assert W32.dtype == torch.float64  # the kept weights plus a float32 correction
    assert abs(error(W32, b32) - e64) / e64 < 1e-6
    assert refit_dtype("cpu") == torch.float64 and refit_dtype("cuda") == torch.float32
    assert precision("cpu")["refit"].startswith("float64") and precision("cuda")["refit"].startswith("float32")
