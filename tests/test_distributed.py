"""Issue 28: the same pruning over torch.distributed (gloo on the CPU), identical to one process.

Each case is pruned once in this process, then by 2 spawned ranks (one group for all cases: the
start-up of a group costs more than the cases). Plans and weights must equal the single-process
run's bit for bit: chunks are assigned whole to ranks and statistics are exact float64 sums
(engine/distributed.py). A real ``torchrun`` CLI run, killed on one rank and restarted by
``--max-restarts 1``, must give the same bytes; a dead rank must end the job with one line."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from dist import run_ranks
from safetensors.torch import load_file
from tiny import calib_ids, tiny_llama, tiny_qwen2, tiny_qwen2_moe

from structprune import PruneConfig, prune
from structprune.api import prune_checkpoint

# name, factory, method and options, windows, batch size. Uneven shards: 5 chunks over 2 ranks.
CASES = [
    ("llama-structprune", tiny_llama, dict(method="structprune"), 5, 1),
    # two ADMM iterations, each refitting the MLPs' input rows (solvers/inner.py) and the attentions' value
    # rows (solvers/values.py), judged by the calibration KL
    ("llama-admm2", tiny_llama, dict(method="structprune", iterations=2, inner_iterations=2, value_iterations=2), 4, 1),
    ("qwen2-obs-local", tiny_qwen2, dict(method="obs-local"), 4, 2),
    ("qwen2moe-structprune", tiny_qwen2_moe, dict(method="structprune"), 4, 1),
    ("llama-global", tiny_llama, dict(method="global", allocation="threshold"), 4, 1),  # in memory: prune()
]


def _config(opts: dict, n: int, batch: int) -> PruneConfig:
    return PruneConfig(sparsity=0.4, nsamples=n, seqlen=16, mlp_multiple=1, batch_size=batch, **opts)


def _prune(folder: Path, out: Path, factory, opts: dict, n: int, batch: int) -> None:
    """One case, as every rank (and the single process) runs it: a streamed checkpoint, or for the
    in-memory ``global`` reference ``prune()`` whose model is then saved by rank 0."""
    config, calib = _config(opts, n, batch), calib_ids(n, 16)
    if opts["method"] == "global":
        model = factory(2)
        result = prune(model, calib, config, device="cpu", progress=False)
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{out}.rank{_rank()}.pt")
        if _rank() == 0:
            out.mkdir()
            (out / "plan.json").write_text(json.dumps([p.to_dict() for p in result.plans]))
        return
    prune_checkpoint(folder, out, calib, config, device="cpu", progress=False)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _ranks_prune(rank: int, tmp: str, cases: list) -> None:
    for name, factory, opts, n, batch in cases:
        _prune(Path(tmp) / name, Path(tmp) / f"{name}-ranks", factory, opts, n, batch)
    nlls = _perplexities(Path(tmp) / cases[0][0])
    if rank == 0:
        (Path(tmp) / "ppl-ranks.json").write_text(json.dumps(nlls))
    (Path(tmp) / f"refusals-rank{rank}.json").write_text(json.dumps(_refusals(Path(tmp) / cases[0][0], rank)))


def _refusals(folder: Path, rank: int, only: tuple = ("unreachable", "one-chunk", "other-windows")) -> dict:
    """The one-line refusal of each bad input, as this rank raised it (before any work)."""
    from structprune.errors import StructPruneError

    bad = {"unreachable": (calib_ids(4, 16), dict(method="structprune", sparsity=0.99, nsamples=4)),
           "one-chunk": (calib_ids(1, 16), dict(method="wanda-sp", sparsity=0.4, nsamples=1)),
           # rank 1 drew other windows (another tokenizer or corpus file on its node)
           "other-windows": (calib_ids(4, 16, seed=1 + rank), dict(method="wanda-sp", sparsity=0.4, nsamples=4))}
    out = {}
    for name, (calib, opts) in bad.items():
        if name not in only:
            continue
        try:
            prune_checkpoint(folder, folder.parent / f"refused-{name}", calib,
                             PruneConfig(seqlen=16, mlp_multiple=1, **opts), device="cpu", progress=False)
            out[name] = None
        except StructPruneError as e:
            out[name] = str(e)
    return out


def _perplexities(folder: Path) -> dict:
    """Perplexity of a checkpoint, streamed and in memory, over 5 windows in chunks of 2 (uneven)."""
    from structprune.eval.perplexity import perplexity_from_ids
    from structprune.eval.streamed import streamed_perplexity
    from structprune.models.checkpoint import load_skeleton

    ids = calib_ids(1, 5 * 16 + 3, seed=7)
    model, reader = load_skeleton(folder)
    try:
        streamed, _ = streamed_perplexity(model, reader, None, ids, 16, device="cpu", batch_size=2, progress=False)
    finally:
        reader.close()
    from transformers import AutoModelForCausalLM

    memory = perplexity_from_ids(AutoModelForCausalLM.from_pretrained(folder), ids, 16, device="cpu", batch_size=2,
                                 progress=False)
    return {k: {"ppl": r.ppl, "nlls": list(r.window_nlls)} for k, r in (("streamed", streamed), ("memory", memory))}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(str(folder / "*.safetensors"))):
        out.update(load_file(f))
    return out


def _stable_report(folder: Path) -> dict:
    r = json.loads((folder / "report.json").read_text())
    for k in list(r):
        if k in ("timings", "memory", "world_size", "ranks", "layer_reads") or "seconds" in k or k.startswith(("peak_", "process_peak")):
            r.pop(k)
    r["config"].pop("activation_budget")
    r["solver_log"] = [{k: v for k, v in e.items() if "seconds" not in k} for e in r["solver_log"]]
    for e in r["solver_log"]:  # the MLP input and value refits' per-layer entries time themselves too
        for key in ("inner", "values"):
            e[key] = [{k: v for k, v in (x or {}).items() if k != "seconds"} for x in e.get(key, [])]
    return r


def test_two_ranks_prune_and_evaluate_exactly_as_one_process(tmp_path, one_torch_thread):
    for name, factory, opts, n, batch in CASES:
        factory(2).save_pretrained(tmp_path / name, max_shard_size="8KB")  # before any group exists
        _prune(tmp_path / name, tmp_path / f"{name}-one", factory, opts, n, batch)
    t0 = time.perf_counter()
    run_ranks(_ranks_prune, tmp_path, 2, (str(tmp_path), CASES))
    print(f"2 ranks, {len(CASES)} cases: {time.perf_counter() - t0:.1f}s")
    assert json.loads((tmp_path / "ppl-ranks.json").read_text()) == _perplexities(tmp_path / CASES[0][0])
    # bad inputs: refused by both ranks with the same line, the single-process one where there is one
    refused = [json.loads((tmp_path / f"refusals-rank{r}.json").read_text()) for r in range(2)]
    assert refused[0] == refused[1]
    assert refused[0]["unreachable"] == _refusals(tmp_path / CASES[0][0], 0, ("unreachable",))["unreachable"]
    assert refused[0]["one-chunk"].startswith("1 calibration windows in chunks of 1 make 1 chunks, fewer than the 2")
    assert refused[0]["other-windows"].startswith("ranks disagree on the calibration windows (rank 1 differs")
    assert not list(tmp_path.glob("*refused-*")) and not list(tmp_path.glob(".refused-*"))  # nothing left behind
    for name, _, opts, _, _ in CASES:
        one, ranks = tmp_path / f"{name}-one", tmp_path / f"{name}-ranks"
        assert json.loads((ranks / "plan.json").read_text()) == json.loads((one / "plan.json").read_text()), name
        if opts["method"] == "global":  # every rank holds the pruned model in memory
            ref = torch.load(f"{one}.rank0.pt")
            for r in range(2):
                got = torch.load(f"{ranks}.rank{r}.pt")
                assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), (name, r)
            continue
        a, b = _weights(one), _weights(ranks)
        assert a.keys() == b.keys(), name
        diff = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
        assert not diff, f"{name}: weights differ (max {max(diff.values()):.3g}) in {sorted(diff)[:4]}"
        assert _stable_report(ranks) == _stable_report(one), name
        report = json.loads((ranks / "report.json").read_text())
        assert report["world_size"] == 2 and [r["peak_rss_bytes"] > 0 for r in report["ranks"]] == [True, True]
        assert not [p for p in ranks.rglob(".rank-*")], "the other ranks' scratch copies are removed"


def test_statistics_are_the_same_bits_for_any_split_of_the_chunks():
    """The float64 accumulators of per-chunk float32 products: one process, any 2- or 3-way split and
    any order of the chunks sum to the same bits (the reason distributed runs are exact)."""
    from structprune.engine.stats import StatsAccumulator

    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(64, 24, generator=g) * torch.rand(1, generator=g) * 10 for _ in range(12)]
    targets = [torch.randn(64, 8, generator=g) for _ in range(12)]

    def fold(order):
        acc = StatsAccumulator(gram=True)
        for c in order:
            acc.add_z("m", chunks[c], 8, target=targets[c])
        return acc.finish()["m"]

    ref = fold(range(12))
    for parts in ([list(range(0, 12, 2)), list(range(1, 12, 2))], [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]):
        partial = [fold(p[::-1]) for p in parts]
        total = partial[0].gram.clone()
        for s in partial[1:]:
            total += s.gram
        assert torch.equal(total, ref.gram)
        C = sum((s.C for s in partial[1:]), partial[0].C.clone())
        assert torch.equal(C, ref.C)


# -- a real torchrun: the CLI, a rank killed and the job restarted, a dead rank ------------------

_KILL_AT_FETCH = r"""
import os, signal, sys
n = int(sys.argv.pop(1))
if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and n > 0:
    from structprune.engine import disk
    fetch, seen = disk.DiskLayerStore.fetch, [0]
    def killing_fetch(self, i):
        seen[0] += 1
        if seen[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return fetch(self, i)
    disk.DiskLayerStore.fetch = killing_fetch
from structprune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _tiny_folder(path: Path, byte_tokenizer) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=False)).save_pretrained(path)
    byte_tokenizer.save_pretrained(path)
    return str(path)


def _env() -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", STRUCTPRUNE_CHECKPOINT_SECONDS="0", STRUCTPRUNE_DIST_TIMEOUT="60")


def test_torchrun_cli_killed_rank_restarts_to_the_same_bytes(tmp_path, byte_tokenizer, one_torch_thread, monkeypatch):
    """``torchrun --nproc-per-node 2 --max-restarts 1 -m structprune.cli prune``: rank 1 is killed at
    its 6th layer fetch (the cutting pass's second layer, after the journaled profile and sensitivities), torchrun
    restarts both ranks, the restart resumes from the journals, and the output equals the
    single-process CLI's bytes."""
    import hashlib

    monkeypatch.setenv("STRUCTPRUNE_CHECKPOINT_SECONDS", "0")  # as the ranks run
    model = _tiny_folder(tmp_path / "tiny", byte_tokenizer)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"The quick brown fox {i} jumps over the lazy dog." for i in range(400)))
    args = ["prune", model, "--sparsity", "0.4", "--calib", str(calib), "--nsamples", "4", "--seqlen", "64",
            "--eval", "", "--mlp-multiple", "1", "--max-shard-size", "20KB", "-q"]
    one = tmp_path / "one"
    from structprune.cli import main

    assert main([*args, "--output", str(one)]) == 0  # the single-process reference, in this process
    out = tmp_path / "ranks"
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "--max-restarts", "1", "--no-python", sys.executable, "-c", _KILL_AT_FETCH, "6",
                          *args, "--output", str(out)], env=_env(), capture_output=True, text=True, timeout=300)
    print(f"torchrun with one restart: {time.perf_counter() - t0:.1f}s")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Failures" not in run.stdout

    def files(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
                if p.is_file() and p.name not in ("report.json", "README.md")}
    assert files(out) == files(one)
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["timings"]["resumed"] is True
    assert not (tmp_path / ".ranks.partial").exists() and not list(out.rglob(".rank-*"))


_DEAD_RANK = r"""
import datetime, os, signal, sys
import torch, torch.distributed as dist
rank, store, folder, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
sys.path[:0] = [sys.argv[5]]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=float(os.environ["STRUCTPRUNE_DIST_TIMEOUT"])))
from structprune import PruneConfig
from structprune.api import prune_checkpoint
from structprune.engine import disk
from structprune.errors import StructPruneError
from tiny import calib_ids
if rank == 1:
    fetch, seen = disk.DiskLayerStore.fetch, [0]
    def dying_fetch(self, i):
        seen[0] += 1
        if seen[0] == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return fetch(self, i)
    disk.DiskLayerStore.fetch = dying_fetch
try:
    prune_checkpoint(folder, out, calib_ids(4, 16), PruneConfig(method="structprune", sparsity=0.4, nsamples=4,
                     seqlen=16, mlp_multiple=1), device="cpu", progress=False)
except StructPruneError as e:
    print(f"structprune: error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def test_a_dead_rank_ends_the_job_with_one_line(tmp_path, one_torch_thread):
    """Rank 1 is SIGKILLed in the middle of the run: rank 0 must not hang but stop within a bounded
    time, with one line that says another rank died, and keep the partial folder for a restart."""
    tiny_llama(2).save_pretrained(tmp_path / "model", max_shard_size="8KB")
    tests = str(Path(__file__).resolve().parent)
    env = dict(_env(), STRUCTPRUNE_DIST_TIMEOUT="30")
    procs = [subprocess.Popen([sys.executable, "-c", _DEAD_RANK, str(r), str(tmp_path / "store"),
                               str(tmp_path / "model"), str(tmp_path / "out"), tests], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    t0 = time.perf_counter()
    _, err1 = procs[1].communicate(timeout=120)
    assert procs[1].returncode == -signal.SIGKILL, err1[-2000:]
    _, err0 = procs[0].communicate(timeout=120)
    waited = time.perf_counter() - t0
    assert procs[0].returncode == 2, err0[-2000:]
    lines = [line for line in err0.splitlines() if line.startswith("structprune: error:")]
    assert len(lines) == 1 and "rank 0 of 2" in lines[0] and "rank 1 died" in lines[0], err0[-2000:]
    assert waited < 60, waited
    assert (tmp_path / ".out.partial" / ".resume").is_dir()  # kept: torchrun's restart continues it
