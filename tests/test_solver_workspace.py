"""Lean solver workspace (issue 10): solver tensors live on their inputs' device, and one
module solve holds a small constant number of n x n buffers."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import structprune
from structprune.adapters.base import AttentionShape
from structprune.solvers.flap import mean_compensation
from structprune.solvers.obs import (ModuleProblem, attention_path, channel_path, obs_prune_attention, obs_prune_mlp,
                                     refit)

SHAPE = AttentionShape(num_heads=6, num_kv_heads=2, head_dim=5, hidden_size=20, qkv_bias=False)


def _stats(seed=0, d=20, n=30, T=400):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(T, n, generator=g) @ torch.randn(n, n, generator=g) * 0.3 + 0.5
    W, b = torch.randn(d, n, generator=g), torch.randn(d, generator=g)
    Y = Z @ W.T + b + 0.3 * torch.randn(T, d, generator=g)
    C = torch.cat([Y.T @ Z, Y.sum(0)[:, None]], 1)
    return dict(H=Z.T @ Z, zsum=Z.sum(0), count=T, W=W, b=b, C=C, yy=float((Y * Y).sum()))


def _solve_everything(s, lin):
    """Every solver entry point on the statistics ``s``; returns all results (tensors, floats, lists)."""
    H, zs, T, W, b, C, yy = s["H"], s["zsum"], s["count"], s["W"], s["b"], s["C"], s["yy"]
    out = []
    prob = ModuleProblem.build(H, zs, T, W=W, bias=b)
    path = channel_path(prob, 12, 1.0, block=4)
    removed = {c for st in path.steps for c in st}
    kept = [c for c in range(30) if c not in removed]
    out += [prob.W, prob.Hinv, path.errors]
    out += list(refit(H, zs, T, kept, W=W, bias=b))  # keep as a list
    out += list(refit(H, zs, T, torch.tensor(kept, device=H.device), C=C, W=W, bias=b))
    out += [refit(H, zs, T, kept, W=W, fit_bias=False)[0]]
    prob = ModuleProblem.build(H, zs, T, C=C, W=W, bias=b, yy=yy, dtype=torch.float32)
    out += [channel_path(prob, 10, 1.0).errors, prob.base_error]
    prob = ModuleProblem.build(H, zs, T, W=W, bias=b)
    out += [attention_path(prob, SHAPE).errors]
    out += [obs_prune_mlp(W, H, zs, T, 12, bias=b)[1]]
    out += [obs_prune_attention(W, H, zs, T, SHAPE, 1, 2, bias=b)[2]]
    out += [mean_compensation(lin, zs / T, torch.tensor(kept, device=H.device))]
    return out


def test_solvers_create_every_tensor_on_the_inputs_device():
    """Inputs on the CPU while the default device is "meta": a tensor a solver creates without
    its inputs' device lands on meta, and indexing or combining it with the CPU inputs fails.
    This is the GPU failure (CPU index tensors against a CUDA Gram) reproduced without a GPU."""
    s = _stats()
    lin = torch.nn.Linear(30, 20)
    expected = _solve_everything(s, lin)
    with torch.device("meta"):
        got = _solve_everything(s, lin)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if isinstance(e, torch.Tensor):
            assert g.device == e.device == torch.device("cpu")
            assert torch.equal(g, e)
        else:
            assert g == e


# One MLP module solve as StructPrune runs it (external target, float32 path, refit against C)
# and as obs-local / refit_layer run it (own output, float64); peak resident memory above the
# inputs, in units of n^2 float64 entries. glibc returns every large block to the OS on free
# (MALLOC_MMAP_THRESHOLD_), so the resident set follows the live tensors; VmHWM is reset after
# a warm-up solve, so MKL's own buffers are in the baseline.
_MEASURE = textwrap.dedent('''
    import gc, sys
    import torch
    from structprune.solvers import obs
    torch.set_num_threads(1)
    n, d = int(sys.argv[1]), int(sys.argv[2])

    def status():
        f = dict(l.split(":", 1) for l in open("/proc/self/status"))
        return int(f["VmRSS"].split()[0]) * 1024, int(f["VmHWM"].split()[0]) * 1024

    g = torch.Generator().manual_seed(0)
    Z = torch.randn(2 * n, n, generator=g) + 0.3 * torch.randn(2 * n, 1, generator=g)
    H, zsum, count = Z.T @ Z, Z.sum(0), Z.shape[0]
    W, b = torch.randn(d, n, generator=g) / n ** 0.5, torch.randn(d, generator=g)
    Y = Z @ W.T + b + 0.1 * torch.randn(2 * n, d, generator=g)
    C = torch.cat([Y.T @ Z, Y.sum(0)[:, None]], 1)
    yy = float((Y * Y).sum())
    del Z, Y

    def solve(target):
        if target:
            prob = obs.ModuleProblem.build(H, zsum, count, C=C, W=W, bias=b, yy=yy, dtype=torch.float32)
        else:
            prob = obs.ModuleProblem.build(H, zsum, count, W=W, bias=b)
        path = obs.channel_path(prob, n // 2, 1.0)
        del prob
        removed = {c for s in path.steps for c in s}
        keep = torch.tensor([c for c in range(n) if c not in removed])
        if target:
            return obs.refit(H, zsum, count, keep, C=C, W=W, bias=b)
        return obs.refit(H, zsum, count, keep, W=W, bias=b)

    for target in (True, False):
        solve(target)
        gc.collect()
        base, _ = status()
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
        out = solve(target)
        _, peak = status()
        print("target" if target else "own", (peak - base) / (n * n * 8))
''')


def _can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _can_reset_peak_rss(),
                    reason="needs Linux's resettable peak RSS (/proc/self/clear_refs)")
def test_one_module_solve_holds_a_constant_number_of_n_by_n_buffers():
    """ModuleProblem.build + channel_path + refit at n = 1024, d = 3n/8 (a 7B MLP's d/n):
    at most 2.5 n^2 float64 entries above the inputs. Measured 2.0 (the Cholesky factor and
    the inverse solved into an identity, while the inverse is formed); the previous solver
    needed 5.0 (float64 copies of H and of the augmented Gram, the factor, the identity, the
    inverse, and cholesky_solve's internal copies)."""
    n, d = 1024, 384
    src = str(Path(structprune.__file__).resolve().parents[1])  # the structprune this test imported
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
    res = subprocess.run([sys.executable, "-c", _MEASURE, str(n), str(d)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    peaks = {line.split()[0]: float(line.split()[1]) for line in res.stdout.splitlines()}
    assert set(peaks) == {"target", "own"}, res.stdout
    for mode, peak in peaks.items():
        assert peak <= 2.5, f"{mode}: peak workspace {peak:.2f} n^2 float64 entries"
    # The float32 path (StructPrune's) drops the float64 factor before the identity is made:
    # 1.5 n^2 at the peak (measured 2.0 before; on a 7B MLP the difference is 0.5 GB).
    assert peaks["target"] <= 1.75, f"float32 path: peak workspace {peaks['target']:.2f} n^2 float64 entries"
