"""Where one module's solve spends its time, operation by operation, at a real shape (issue 30).

A StructPrune layer solves each module twice per one-shot run (the dense profile's full removal
path, then the pass's path down to its cut and the float64 refit). This times each operation of
one MLP (or attention) solve on synthetic, correlated, heavy-tailed activations of a real shape
(``--n`` inner channels, ``--d`` model width, ``--tokens`` calibration tokens), with the
alternatives for the inverse the path starts from, and checks each alternative's accuracy against a
float64 reference (relative Frobenius error of the inverse; the channels a path removes and its
step errors):

* ``solves-f32`` (today): float64 Cholesky factor, two float32 triangular solves on an identity;
* ``potri-f32``: the same factor, LAPACK's ``cholesky_inverse`` in float32 (triangular inverse and
  its product with its transpose: a third of the solves' flops);
* ``potri-f64``: the same in float64 (the reference);
* ``all-f32``: the factor too in float32, then ``cholesky_inverse`` (no float64 at all).

    python benchmarks/profile_solver.py --n 11008 --d 4096 --tokens 4096 --threads 2 \\
        --out benchmarks/results/profile_solver_7b_mlp
    python benchmarks/profile_solver.py --n 8192 --d 3072 --tokens 4096 --threads 2 \\
        --out benchmarks/results/profile_solver_3b_mlp

Run it on an idle machine: every figure is a wall time of the calling thread(s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from structprune.engine.stats import StatsAccumulator
from structprune.solvers import obs
from structprune.solvers.parts import path_block, path_min_keep

ROOT = Path(__file__).resolve().parents[1]


def activations(n: int, tokens: int, seed: int = 0, chunk: int = 1024):
    """Per-chunk ``z`` like an MLP's down input: correlated SiLU-gated values with 1% outlier channels x30."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(n) + 0.1 * torch.randn(n, n, generator=g) / n ** 0.5
    scale = 1 + 30 * (torch.rand(n, generator=g) < 0.01).float()
    for i in range(0, tokens, chunk):
        m = min(chunk, tokens - i)
        a = torch.randn(m, n, generator=g) @ mix
        yield torch.nn.functional.silu(a) * torch.randn(m, n, generator=g) * scale


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def inverse(A64: torch.Tensor, how: str) -> torch.Tensor:
    """The damped Gram's inverse from its float64 Cholesky factor, by ``how``."""
    if how == "all-f32":  # the factor too in float32 (what a GPU without fast float64 wants)
        return torch.cholesky_inverse(obs._cholesky_(A64.to(torch.float32)), upper=True)
    U = obs._cholesky_(A64.clone())
    if how == "potri-f64":
        return torch.cholesky_inverse(U, upper=True)
    U32 = U.to(torch.float32)
    del U
    if how == "potri-f32":
        return torch.cholesky_inverse(U32, upper=True)
    return obs._cholesky_solve_(U32, torch.eye(U32.shape[0]))


def path_with(problem_inv: torch.Tensor, W: torch.Tensor, n: int, r_min: float, steps: int,
              max_steps: int | None = None) -> obs.Path:
    """The greedy channel path on a given inverse (down to ``r_min``, or ``max_steps`` steps)."""
    prob = obs.ModuleProblem(W=W.clone(), Hinv=problem_inv.clone(memory_format=torch.contiguous_format), n=n, bias=True, base_error=0.0)
    done = [0]

    def stop(cost):
        done[0] += 1
        return max_steps is not None and done[0] >= max_steps
    return obs.channel_path(prob, path_min_keep(n, r_min, 1), 1.0, path_block(n, steps, 1), stop)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=11008, help="inner channels (a 7B MLP: 11008)")
    p.add_argument("--d", type=int, default=4096, help="model width (output rows)")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens (8x512 = 4096)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--r-min", type=float, default=0.05)
    p.add_argument("--path-steps", type=int, default=32)
    p.add_argument("--keep", type=float, default=0.7, help="kept share of a pass's cut (its path stops there)")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--methods", default="solves-f32,potri-f32,all-f32,potri-f64")
    p.add_argument("--out", required=True, help="results path without extension (.json and .md are written)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n, d = args.n, args.d
    g = torch.Generator().manual_seed(1)
    W = torch.randn(d, n, generator=g) / n ** 0.5
    rows, ops = [], {}

    def note(name, seconds):
        ops[name] = round(seconds, 2)
        print(f"{name}: {seconds:.2f} s", flush=True)

    acc = StatsAccumulator(gram=True)
    t = 0.0
    for z in activations(n, args.tokens):
        t0 = time.perf_counter()
        acc.add_z("mlp", z, d)
        t += time.perf_counter() - t0
    note("gram (float64 accumulation of float32 chunk products)", t)
    st = acc.finish()["mlp"]
    A64, s = timed(lambda: obs._gram(st.gram, st.zsum, st.count, True))
    obs.damp_(A64, args.damp)
    note("augmented float64 Gram copy", s)
    _, s = timed(lambda: obs._cholesky_(A64.clone()))
    note("float64 Cholesky factor", s)
    Wd = obs._augmented_weights(W, None, True)
    ref_inv = None
    ref_path = None
    for how in ["potri-f64"] + [m for m in args.methods.split(",") if m != "potri-f64"]:
        inv, s_inv = timed(lambda: inverse(A64, how))
        if ref_inv is None:
            ref_inv = inv.double()
        err = float((inv.double() - ref_inv).norm() / ref_inv.norm())
        dtype = torch.float64 if how.endswith("f64") else torch.float32
        inv_p = inv.to(dtype)
        path, s_path = timed(lambda: path_with(inv_p, Wd.to(dtype), n, args.r_min, args.path_steps))
        kept_cut = int(round(args.keep * n))
        cut_steps = next((k for k, c in enumerate(path.kept) if c <= kept_cut), len(path.steps))
        _, s_cut = timed(lambda: path_with(inv_p, Wd.to(dtype), n, args.r_min, args.path_steps, cut_steps))
        if ref_path is None:
            ref_path = path
        same_steps = sum(a == b for a, b in zip(path.steps, ref_path.steps))
        step_err = max((abs(a - b) / max(abs(b), 1e-30) for a, b in zip(path.errors, ref_path.errors)), default=0.0)
        rows.append({"inverse": how, "inverse_seconds": round(s_inv, 2), "inverse_rel_error": err,
                     "path_seconds_full": round(s_path, 2), "path_seconds_to_cut": round(s_cut, 2),
                     "path_steps": len(path.steps), "steps_to_cut": cut_steps,
                     "same_steps_as_reference": same_steps, "max_step_error_rel_diff": step_err})
        print(json.dumps(rows[-1]), flush=True)
        inv = inv_p = None  # noqa: F841 (frees both before the next inverse)
    keep = torch.arange(0, n, 2)[: int(args.keep * n)].sort().values
    _, s = timed(lambda: obs.refit(st.gram, st.zsum, st.count, keep, W=W, fit_bias=True, damp=args.damp))
    note(f"float64 refit of {keep.numel()} kept channels", s)
    try:
        code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        code = None
    cmd = "python benchmarks/profile_solver.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    result = {"command": cmd, "shape": {"n": n, "d": d, "tokens": args.tokens}, "threads": args.threads,
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "code": code,
              "load_average_at_end": os.getloadavg(), "operations": ops, "inverses": rows}
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# One module's solve, operation by operation (n = {n}, d = {d}, {args.tokens} tokens, "
             f"{args.threads} threads)", "",
             f"Synthetic correlated heavy-tailed activations; load average at the end {os.getloadavg()[0]:.1f}; "
             f"code {code}; torch {torch.__version__}.", "", "| operation | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in ops.items()]
    lines += ["", "The inverse the removal path starts from, and the path on it (reference: potri-f64):", "",
              "| inverse | seconds | rel. error | full path s (steps) | path to a "
              f"{args.keep:.0%} cut s (steps) | same steps | max step-error diff |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['inverse']} | {r['inverse_seconds']} | {r['inverse_rel_error']:.1e} | "
                     f"{r['path_seconds_full']} ({r['path_steps']}) | {r['path_seconds_to_cut']} ({r['steps_to_cut']}) "
                     f"| {r['same_steps_as_reference']} / {r['path_steps']} | {r['max_step_error_rel_diff']:.1e} |")
    lines += ["", "Command:", "", f"    {cmd}"]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
