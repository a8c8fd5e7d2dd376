"""The command line: a full run on a tiny saved model, and every bad input of issue 2 refused cleanly."""

import json
from pathlib import Path

import pytest
import torch

from structprune.cli import main
from tiny import final_state_distortion


@pytest.fixture
def tiny_folder(tmp_path, make_tiny_llama, byte_tokenizer):
    def make(name="tiny", nan=False, **kw):
        model = make_tiny_llama(**kw)
        if nan:
            with torch.no_grad():
                model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
        path = tmp_path / name
        model.save_pretrained(path)
        byte_tokenizer.save_pretrained(path)
        return str(path)
    return make


@pytest.fixture
def calib_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(" ".join(f"The quick brown fox {i} jumps over the lazy dog." for i in range(400)))
    return str(p)


def _args(model, out, calib, *extra):
    return ["prune", model, "--sparsity", "0.4", "--method", "wanda-sp", "--calib", calib, "--nsamples", "2",
            "--seqlen", "64", "--eval", calib, "--eval-limit", "1", "--eval-seqlen", "128",
            "--mlp-multiple", "1", "--output", str(out), "-q", *extra]


def _no_leftovers(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


def test_prune_writes_report(tiny_folder, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(tiny_folder(), out, calib_file)) == 0
    r = json.loads((out / "report.json").read_text())
    for key in ("method", "sparsity_target", "sparsity_achieved", "params_before", "params_after", "layers",
                "ppl", "peak_gpu_mem_bytes", "prune_seconds"):
        assert key in r
    assert r["method"] == "wanda-sp" and r["peak_gpu_mem_bytes"] is None
    assert abs(r["sparsity_achieved"] - 0.4) < 0.05  # tiny model: coarse structures
    assert r["params_after"] < r["params_before"]
    assert {"heads", "kv_heads", "mlp"} <= set(r["layers"][0])
    assert set(r["ppl"][calib_file]) >= {"dense", "pruned"}
    assert "sparsity" in capsys.readouterr().out


def test_structprune_solver_options_reach_the_config(tiny_folder, calib_file, tmp_path):
    out = tmp_path / "out"
    assert main(_args(tiny_folder(), out, calib_file, "--method", "structprune", "--energy-scale", "robust",
                      "--target", "dense", "--temperature", "2")) == 0
    cfg = json.loads((out / "report.json").read_text())["config"]
    assert (cfg["method"], cfg["energy_scale"], cfg["target"], cfg["temperature"]) == ("structprune", "robust", "dense",
                                                                                         2.0)


def test_default_method_with_uniform_widths_exports_a_stock_config(tiny_folder, calib_file, tmp_path):
    """StructPrune is the CLI default; with --uniform-widths it must still give a stock-config model."""
    out = tmp_path / "out"
    args = [a for a in _args(tiny_folder(), out, calib_file, "--uniform-widths") if a not in ("--method", "wanda-sp")]
    assert main(args) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["method"] == "structprune" and all(w == r["layers"][0] for w in r["layers"])
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize("sparsity", ["1.0", "-0.1", "1.5"])
def test_sparsity_out_of_range(tiny_folder, calib_file, tmp_path, capsys, sparsity):
    out = tmp_path / "out"
    args = _args(tiny_folder(), out, calib_file)
    args[args.index("--sparsity") + 1] = sparsity
    assert main(args) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err
    _no_leftovers(out)


def test_missing_model(tmp_path, calib_file, capsys):
    out = tmp_path / "out"
    assert main(_args(str(tmp_path / "nope"), out, calib_file)) == 2
    assert "not found" in capsys.readouterr().err
    _no_leftovers(out)


def test_unsupported_architecture(tmp_path, calib_file, byte_tokenizer, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=257, n_embd=32, n_layer=1, n_head=2, n_positions=256)).save_pretrained(path)
    byte_tokenizer.save_pretrained(path)
    out = tmp_path / "out"
    assert main(_args(str(path), out, calib_file, "--eval", "")) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture 'gpt2'" in err and "llama" in err and "opt" in err
    _no_leftovers(out)


def test_seqlen_beyond_context(tiny_folder, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = _args(tiny_folder(), out, calib_file, "--eval", "")
    args[args.index("--seqlen") + 1] = "512"  # context is 256
    assert main(args) == 2
    assert "exceeds the model's context" in capsys.readouterr().err
    _no_leftovers(out)


def test_calibration_too_short(tiny_folder, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    out = tmp_path / "out"
    assert main(_args(tiny_folder(), out, str(short), "--eval", "")) == 2
    assert "short" in capsys.readouterr().err.lower()
    _no_leftovers(out)


def test_nan_in_calibration_statistics(tiny_folder, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(tiny_folder(nan=True), out, calib_file, "--eval", "")) == 2
    assert "NaN or Inf" in capsys.readouterr().err
    _no_leftovers(out)


@pytest.mark.parametrize("method", ["magnitude-sp", "wanda-sp"])
def test_nan_weights_are_refused_naming_the_tensor(tiny_folder, calib_file, tmp_path, capsys, method):
    """A NaN in a checkpoint's weights is refused with the layer and tensor named, also by the
    data-free magnitude-sp, which reads no activations that could reveal it."""
    out = tmp_path / "out"
    args = _args(tiny_folder(nan=True), out, calib_file, "--eval", "", "--method", method)
    assert main(args) == 2
    assert "layer 0: mlp.up_proj.weight holds NaN or Inf weights" in capsys.readouterr().err
    _no_leftovers(out)


def test_refit_producing_nan_is_refused():
    from torch import nn

    from structprune.errors import StructPruneError
    from structprune.surgery import set_output_projection

    lin = nn.Linear(3, 2)
    with pytest.raises(StructPruneError, match="NaN or Inf"):
        set_output_projection(lin, torch.full((2, 3), float("nan")))


def test_existing_output_is_not_clobbered(tiny_folder, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(_args(tiny_folder(), out, calib_file, "--eval", "")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_real_smollm2_perplexity_ordering(smollm2_path):
    """On real text, pruning the real model raises its perplexity (same windows, same code)."""
    from structprune import load_model, prune
    from structprune.data import get_calibration
    from structprune.eval.perplexity import encode_corpus, perplexity_from_ids

    model, tok = load_model("smollm2-135m")
    calib = get_calibration(tok, "c4", nsamples=4, seqlen=128, seed=0)
    ids = encode_corpus(tok, "wikitext2")
    dense = perplexity_from_ids(model, ids, 256, limit=2, progress=False).ppl
    r = prune(model, calib, device="cpu", progress=False, method="wanda-sp", sparsity=0.3, seqlen=128)
    assert abs(r.report["sparsity_achieved"] - 0.3) < 0.01
    pruned = perplexity_from_ids(model, ids, 256, limit=2, progress=False).ppl
    assert 5 < dense < pruned, (dense, pruned)


def test_real_smollm2_structprune_reconstructs_better_than_wanda(smollm2_path):
    """On real weights and text (first 4 layers, to stay fast), StructPrune's output at the last
    layer stays much closer to the dense model's than Wanda-sp's, on held-out windows."""
    import copy

    from structprune import load_model, prune
    from structprune.data import get_calibration
    from structprune.data.calibration import get_heldout_calibration

    model, tok = load_model("smollm2-135m")
    model.model.layers = model.model.layers[:4]
    model.config.num_hidden_layers = 4
    calib = get_calibration(tok, "c4", nsamples=4, seqlen=128, seed=0)
    held = get_heldout_calibration(tok, "c4", nsamples=2, seqlen=128, seed=1)
    ref = final_state_distortion(model, held)
    dist = {}
    for method, kw in (("wanda-sp", {}), ("structprune", {"iterations": 1, "sens_nsamples": 2})):
        m = copy.deepcopy(model)
        prune(m, calib, device="cpu", progress=False, method=method, sparsity=0.3, seqlen=128, **kw)
        dist[method] = final_state_distortion(m, held, ref)
    assert dist["structprune"] < 0.5 * dist["wanda-sp"], dist


# -- issue 14: the first run anywhere ------------------------------------------------------------

def _strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_report_is_strict_json_and_the_summary_has_time_and_memory(tiny_folder, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(tiny_folder(), out, calib_file, "--method", "structprune")) == 0
    r = _strict_json(out / "report.json")  # a one-iteration run has no dual residual: null, not NaN
    assert r["total_seconds"] >= r["prune_seconds"] > 0
    assert r["peak_rss_bytes"] > 0 and r["process_peak_rss_bytes"] >= r["peak_rss_bytes"]
    text = capsys.readouterr().out
    assert "total time" in text and "peak memory" in text and "MiB" in text


@pytest.mark.parametrize("flag", ["--nsamples", "--seqlen"])
def test_zero_calibration_sizes_are_refused(tiny_folder, calib_file, tmp_path, capsys, flag):
    out = tmp_path / "out"
    args = _args(tiny_folder(), out, calib_file)
    args[args.index(flag) + 1] = "0"
    assert main(args) == 2
    assert f"{flag} must be at least" in capsys.readouterr().err
    _no_leftovers(out)


def _refuse_model_load(monkeypatch):
    import structprune.models.loading as loading

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")
    monkeypatch.setattr(loading, "load_model", boom)


@pytest.mark.parametrize("bad", ["binary", "seqlen", "eval"])
def test_inputs_are_checked_before_the_model_is_loaded(tiny_folder, calib_file, tmp_path, capsys, monkeypatch, bad):
    model = tiny_folder()
    _refuse_model_load(monkeypatch)
    out = tmp_path / "new" / "deeper" / "out"
    args = _args(model, out, calib_file)
    if bad == "binary":
        blob = tmp_path / "calib.txt.bin"
        blob.write_bytes(bytes(range(256)) * 64)
        args[args.index("--calib") + 1] = str(blob)
    elif bad == "seqlen":
        args[args.index("--seqlen") + 1] = "4096"  # the tiny model's context is 256
    else:
        args[args.index("--eval") + 1] = str(tmp_path / "missing.txt")
    assert main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (the fixture's save prints progress first)
    assert last.startswith("structprune: error:") and {"binary": "UTF-8", "seqlen": "context",
                                                       "eval": "not found"}[bad] in last, last
    assert not (tmp_path / "new").exists()  # no empty parent folders left behind


def test_a_failure_after_the_checks_leaves_no_created_parent(tiny_folder, calib_file, tmp_path, monkeypatch):
    import structprune.api as api

    def fail(*a, **k):
        from structprune.errors import StructPruneError
        raise StructPruneError("simulated failure while pruning")
    monkeypatch.setattr(api, "prune", fail)
    monkeypatch.setattr(api, "prune_checkpoint", fail)
    out = tmp_path / "a" / "b" / "out"
    assert main(_args(tiny_folder(), out, calib_file)) == 2
    assert not (tmp_path / "a").exists()


def test_ctrl_c_is_one_line_and_leaves_nothing(tiny_folder, calib_file, tmp_path, capsys, monkeypatch):
    import structprune.api as api

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(api, "prune", interrupt)
    monkeypatch.setattr(api, "prune_checkpoint", interrupt)
    out = tmp_path / "out"
    assert main(_args(tiny_folder(), out, calib_file)) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    _no_leftovers(out)


def test_output_files_follow_the_umask(tiny_folder, calib_file, tmp_path):
    import os
    import stat

    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert main(_args(tiny_folder(), out, calib_file)) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}


def test_magnitude_sp_reads_no_calibration_text(tiny_folder, tmp_path, monkeypatch, calib_file):
    import structprune.data.calibration as calibration

    def boom(*a, **k):
        raise AssertionError("calibration text was loaded for a data-free method")
    monkeypatch.setattr(calibration, "get_calibration", boom)
    out = tmp_path / "out"
    args = _args(tiny_folder(), out, str(tmp_path / "no-such-calibration.txt"), "--method", "magnitude-sp")
    args[args.index("--eval") + 1] = calib_file
    assert main(args) == 0
    r = _strict_json(out / "report.json")
    assert r["calibration"] is None and abs(r["sparsity_achieved"] - 0.4) < 0.05


def test_a_checkpoint_folder_is_streamed_from_disk_and_equals_the_in_memory_run(tiny_folder, calib_file, tmp_path):
    model = tiny_folder()
    disk, memory = tmp_path / "disk", tmp_path / "memory"
    assert main(_args(model, disk, calib_file, "--method", "structprune")) == 0
    assert main(_args(model, memory, calib_file, "--method", "structprune", "--in-memory")) == 0
    rd, rm = (_strict_json(p / "report.json") for p in (disk, memory))
    assert (rd["residency"], rm["residency"]) == ("disk", "memory")
    assert rd["layers"] == rm["layers"] and rd["sparsity_achieved"] == rm["sparsity_achieved"]
    ppl = rd["ppl"][calib_file]
    assert abs(ppl["pruned"] - rm["ppl"][calib_file]["pruned"]) < 1e-3 * ppl["pruned"]
    assert len(ppl["window_nlls"]["dense"]) == ppl["nwindows"]  # per-window NLLs saved with the result
    # time per phase and per layer, the sensitivity pass included (issue 10's profile)
    nlayers = len(rd["layers"])
    # (the sweep's forward is the profile's, recorded: no "sensitivity fwd" phase in float32)
    assert "sensitivity fwd" not in rd["timings"]
    phases = ("sensitivity bwd", "structprune profile")
    for phase in phases:
        assert len(rd["timings"][phase]["per_layer"]) == nlayers
        assert all(x > 0 for x in rd["timings"][phase]["per_layer"])
    assert sum(rd["timings"][p]["seconds"] for p in phases) <= rd["prune_seconds"]


def test_activation_budget_spills_and_gives_the_same_model(tiny_folder, calib_file, tmp_path):
    model = tiny_folder()
    ram, disk = tmp_path / "ram", tmp_path / "spilled"
    assert main(_args(model, ram, calib_file, "--method", "structprune")) == 0
    assert main(_args(model, disk, calib_file, "--method", "structprune", "--activation-budget", "0",
                      "--offload-dir", str(tmp_path / "spill"))) == 0
    a, b = (_strict_json(p / "report.json") for p in (ram, disk))
    assert a["layers"] == b["layers"] and a["ppl"] == b["ppl"]
    assert b["memory"]["activations_peak_ram_bytes"] == 0 and b["memory"]["activations_spilled_bytes"] > 0
    assert b["memory"]["layer_weights_bytes"] > 0 and b["timings"]
    assert not list((tmp_path / "spill").glob("*/*"))  # spill files removed
    from structprune import load_pruned
    wa, wb = load_pruned(ram).state_dict(), load_pruned(disk).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_activation_budget_is_refused(tiny_folder, calib_file, tmp_path, capsys):
    assert main(_args(tiny_folder(), tmp_path / "out", calib_file, "--activation-budget", "lots")) == 2
    assert "activation_budget must be a size" in capsys.readouterr().err


_KILLING_CHILD = r"""
import os, signal, sys
from structprune.engine import disk
from structprune.export import shards
point, n = sys.argv[1], int(sys.argv[2])
count = [0]
if point == "fetch":  # SIGKILL at the n-th layer fetch of the run
    fetch = disk.DiskLayerStore.fetch
    def killing(self, i):
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return fetch(self, i)
    disk.DiskLayerStore.fetch = killing
else:  # SIGKILL inside the final save, after the n-th shard of the output is written
    flush = shards.ShardWriter._flush
    def killing(self):
        flush(self)
        if "scratch" not in str(self.folder):
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
    shards.ShardWriter._flush = killing
from structprune.cli import main
sys.argv = [sys.argv[0], *sys.argv[3:]]  # the command the report records
sys.exit(main(sys.argv[1:]))
"""


def test_sigkilled_run_resumes_with_the_same_command(tiny_folder, calib_file, tmp_path):
    """The promise for long runs: kill -9 a streamed `structprune prune` (during the sensitivities,
    during the pruning pass, while writing the output), rerun the same command with --resume, and
    get the same bytes and the same report (timings and memory aside) as a run never killed."""
    import hashlib
    import json
    import os
    import signal
    import subprocess
    import sys

    model = tiny_folder()
    args = ["prune", model, "--sparsity", "0.4", "--calib", calib_file, "--nsamples", "2", "--seqlen", "64",
            "--eval", "", "--mlp-multiple", "1", "--max-shard-size", "20KB", "-q"]
    env = dict(os.environ, STRUCTPRUNE_CHECKPOINT_SECONDS="0", OMP_NUM_THREADS="1")

    def cli(out, *extra, kill=("none", "0")):
        cmd = [sys.executable, "-c", _KILLING_CHILD, *kill, *args, "--output", str(out), *extra]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    def files(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
                if p.is_file() and p.name not in ("report.json", "README.md")}  # the card names its folder

    def report(folder):
        r = json.loads((folder / "report.json").read_text())
        for k in list(r):
            if k in ("timings", "memory", "command", "layer_reads") or "seconds" in k or k.startswith(("peak_", "process_peak")):
                r.pop(k)
        r["config"].pop("activation_budget")  # a quarter of the memory available at the start
        r["solver_log"] = [{k: v for k, v in e.items() if "seconds" not in k} for e in r["solver_log"]]
        return r

    ref = tmp_path / "ref"
    assert cli(ref).returncode == 0
    # 2 layers, fetches 1-2 the profile, 3-4 the sensitivity sweep, 5-6 the pass: a profile resumed part-way
    # (its sweep then runs its own forward), the sweep, the pass, the save
    for point, n in [("fetch", 2), ("fetch", 3), ("fetch", 6), ("save", 1)]:
        out = tmp_path / f"out-{point}-{n}"
        partial = tmp_path / f".{out.name}.partial"
        killed = cli(out, kill=(point, str(n)))
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert not out.exists() and (partial / ".resume").is_dir()
        if n == 2:  # the same command without --resume is refused and keeps the partial run
            again = cli(out)
            assert again.returncode == 2 and "--resume" in again.stderr and partial.is_dir()
        resumed = cli(out, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert not partial.exists() and not (out / ".resume").exists()
        assert files(out) == files(ref), (point, n)
        assert report(out) == report(ref), (point, n)
        assert json.loads((out / "report.json").read_text())["command"].endswith(f"--output {out}")


def test_admm_is_not_on_the_command_line(tiny_folder, calib_file, tmp_path, capsys):
    """Cross-layer ADMM ended worse than the one-shot pass at the CPU protocol (docs/structprune.md,
    section 3): its flags are refused like any unknown flag (exit 2, one line), nothing is written."""
    for flag, value in (("--iterations", "3"), ("--rho", "1"), ("--tol-abs", "1e6"), ("--tol-rel", "0.5"),
                        ("--select", "last")):
        out = tmp_path / flag.strip("-")
        with pytest.raises(SystemExit) as exc:
            main(_args(tiny_folder(), out, calib_file, "--eval", "", "--method", "structprune", flag, value))
        assert exc.value.code == 2
        assert f"unrecognized arguments: {flag} {value}" in capsys.readouterr().err
        _no_leftovers(out)
