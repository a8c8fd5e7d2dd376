"""benchmarks/tune_structprune.py (issue 11 item 4) on a tiny random model: held-out perplexities
with intervals, paired ratios to the reference value (itself: exactly 1), a decision per sparsity
by the protocol's rule, and a resumed sweep that measures only what is missing."""

from __future__ import annotations

import json
import math

import pytest
import torch


@pytest.fixture
def tune(monkeypatch, make_tiny_llama, byte_tokenizer, load_benchmark):
    mod = load_benchmark("tune_structprune")
    model = make_tiny_llama(vocab_size=257, max_position_embeddings=64)
    monkeypatch.setattr(mod, "load_model", lambda name, dtype=None: (model, byte_tokenizer))
    calls = []
    real = mod.prune

    def counting(m, calib, cfg, **kw):
        calls.append((cfg.sparsity, cfg.temperature))
        return real(m, calib, cfg, **kw)

    monkeypatch.setattr(mod, "prune", counting)
    mod.calls = calls
    return mod


def _args(out, *extra):
    return ["--model", "tiny", "--sparsity", "0.3,0.5", "--sweep", "temperature=0.5,inf", "--reference", "1",
            "--nsamples", "4", "--seqlen", "32", "--heldout", "3", "--threads", "1", "--out", str(out), *extra]


def test_sweep_has_intervals_paired_ratios_and_decisions(tune, tmp_path, one_torch_thread):
    out = tmp_path / "tune_t"
    assert tune.main(_args(out)) == 0
    rec = json.loads(out.with_suffix(".json").read_text())
    assert len(rec["rows"]) == 6 and len(tune.calls) == 6  # the reference (1) is added to the sweep
    assert set(rec["dense_domains"]) == {"wikitext2"}  # the second held-out domain, by default
    for r in rec["rows"]:
        for h in (r["heldout"], r["heldout_domains"]["wikitext2"]):
            assert len(h["window_nlls"]) == 3 and h["ppl_interval"][0] <= h["ppl"] <= h["ppl_interval"][1]
        assert set(r["ratios"]) == {"c4", "wikitext2"} and r["ratio_to_reference"] == r["ratios"]["c4"]
        for q in r["ratios"].values():
            if r["temperature"] == 1:
                assert (q["value"], q["low"], q["high"]) == (1.0, 1.0, 1.0)
            else:
                assert q["low"] <= q["value"] <= q["high"]
    assert [d["sparsity"] for d in rec["decisions"]] == [0.3, 0.5]
    for d in rec["decisions"]:
        at = [r for r in rec["rows"] if r["sparsity"] == d["sparsity"]]
        gm = lambda r: math.prod(q["value"] for q in r["ratios"].values()) ** 0.5  # noqa: E731
        wins = [r for r in at if r["temperature"] != 1 and all(q["high"] < 1 for q in r["ratios"].values())]
        best = min(wins or at, key=gm)
        assert d["best"] == best["temperature"]
        if not wins:  # adopted only where every domain's interval excludes 1
            assert d["decision"].startswith("keep temperature=1")
    md = out.with_suffix(".md").read_text()
    assert "| 0.30 | inf |" in md and "Decision per sparsity" in md


def test_resume_measures_only_what_is_missing_and_refuses_other_settings(tune, tmp_path, one_torch_thread):
    out = tmp_path / "tune_t"
    assert tune.main(_args(out)[:3] + ["0.3"] + _args(out)[4:]) == 0
    assert len(tune.calls) == 3
    assert tune.main(_args(out, "--resume")) == 0
    assert len(tune.calls) == 6 and [c[0] for c in tune.calls[3:]] == [0.5, 0.5, 0.5]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert sorted((r["sparsity"], str(r["temperature"])) for r in rows) == sorted(
        (s, t) for s in (0.3, 0.5) for t in ("1", "0.5", "inf"))
    with pytest.raises(SystemExit, match="other settings"):
        tune.main(_args(out, "--resume", "--fixed", "iterations=2"))
    # Rows measured under another default the sweep reads are refused; restored, they resume.
    rec = json.loads(out.with_suffix(".json").read_text())
    rec["rows"][0]["config"]["r_min"] = 0.2
    out.with_suffix(".json").write_text(json.dumps(rec))
    with pytest.raises(SystemExit, match="another resolved config"):
        tune.main(_args(out, "--resume"))
    rec["rows"][0]["config"]["r_min"] = 0.05
    out.with_suffix(".json").write_text(json.dumps(rec))
    assert tune.main(_args(out, "--resume")) == 0 and len(tune.calls) == 6


def test_iterations_sweep_keeps_admm_trace(tune, tmp_path, one_torch_thread, load_benchmark):
    """Sweeping ``iterations`` is item 1's ADMM-against-one-shot comparison: each row keeps the
    residuals, rho and the kept iterate of every iteration, the one-shot row exactly one."""
    out = tmp_path / "tune_k"
    args = ["--model", "tiny", "--sparsity", "0.4", "--sweep", "iterations=1,3", "--reference", "1",
            "--fixed", "rho=1;tol_abs=0;tol_rel=0", "--nsamples", "4", "--seqlen", "32", "--heldout", "3",
            "--threads", "1", "--out", str(out)]
    assert tune.main(args) == 0
    rec = json.loads(out.with_suffix(".json").read_text())
    rows = {r["iterations"]: r for r in rec["rows"]}  # the swept value, not the trace
    one, admm = rows[1], rows[3]
    assert [e["iteration"] for e in one["admm_trace"]] == [1] and one["chosen_iteration"] == 1
    k = len(admm["admm_trace"])  # up to 3: the loop stops once the kept structures repeat
    assert [e["iteration"] for e in admm["admm_trace"]] == list(range(1, k + 1)) and k >= 2
    assert admm["fixed_point"]["supports_of"] == k and one["fixed_point"] is None
    assert admm["chosen_iteration"] in range(1, k + 2) and rec["decisions"][0]["best"] in (1, 3)
    for e in admm["admm_trace"][1:]:  # from iteration 2 on there is an earlier consensus: both residuals
        assert e["primal_residual"] >= 0 and e["dual_residual"] >= 0 and e["rho"] > 0
    md = out.with_suffix(".md").read_text()
    assert "primal / dual residual per iteration" in md
    # the sweep's convergence picture draws the rows with two or more iterations, and refuses a
    # sweep without any
    plot = load_benchmark("plot_convergence")
    png = tmp_path / "conv.png"
    plot.main([str(out.with_suffix(".json")), "--out", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rec["rows"] = [one]
    only_one = tmp_path / "one.json"
    only_one.write_text(json.dumps(rec))
    with pytest.raises(SystemExit, match="two or more iterations"):
        plot.main([str(only_one), "--out", str(tmp_path / "none.png")])


def test_sweep_values_parse_to_the_fields_types():
    """Booleans must not arrive as the truthy string "false", also when a resumed row's value
    comes back through str() (``True``)."""
    from structprune.config import field_value as v
    assert v("false") is False and v("true") is True and v("True") is True
    assert v("inf") == float("inf") and v("32") == 32 and isinstance(v("32"), int) and v("0.01") == 0.01
    assert v("own") == "own"


def test_render_rewrites_the_markdown_with_the_joint_decision(tune, tmp_path, one_torch_thread):
    """--render measures nothing (no prune), keeps the JSON's rows and command, and states the
    one-default rule: the lowest geometric mean over the sparsities."""
    out = tmp_path / "tune_r"
    assert tune.main(_args(out)) == 0
    rec = json.loads(out.with_suffix(".json").read_text())
    tune.calls.clear()
    out.with_suffix(".md").unlink()
    assert tune.main(["--out", str(out), "--render"]) == 0 and tune.calls == []
    assert json.loads(out.with_suffix(".json").read_text()) == rec
    joint = tune.joint_decision(rec["rows"], "temperature")
    gm = {v: (math.prod(r["heldout"]["ppl"] for r in rec["rows"] if r["temperature"] == v)) ** 0.5
          for v in {r["temperature"] for r in rec["rows"]}}
    assert joint["best"] == min(gm, key=gm.get) and joint["sparsities"] == [0.3, 0.5]
    md = out.with_suffix(".md").read_text()
    assert f"**temperature={joint['best']}**" in md and rec["command"] in md
    assert tune.joint_decision([r for r in rec["rows"] if r["sparsity"] == 0.3], "temperature") is None



def test_a_fixed_input_refit_knob_is_left_out_of_rows_that_refit_no_inputs(load_benchmark):
    """``--sweep value_iterations=0,4 --fixed input_damp=1.0``: the reference row (no input refit)
    would refuse ``input_damp``; it is built without it, the refitting row with it."""
    from structprune.errors import StructPruneError
    mod = load_benchmark("tune_structprune")

    class A:
        nsamples, seqlen = 4, 32

    fixed = {"input_damp": 1.0}
    assert mod.sweep_config(A, fixed, "value_iterations", 0.5, 0).input_damp is None
    assert mod.sweep_config(A, fixed, "value_iterations", 0.5, 4).input_damp == 1.0
    assert mod.sweep_config(A, fixed, "inner_iterations", 0.5, 2).input_damp == 1.0
    with pytest.raises(StructPruneError, match="input-row refits"):  # swept itself, it is not dropped
        mod.sweep_config(A, {}, "input_damp", 0.5, 1.0)


def test_equivalence_rule_adopts_only_a_value_within_one_percent_everywhere(load_benchmark):
    """``--rule equivalent`` (a change made for speed): a value whose paired interval lies within
    [0.99, 1.01] in every domain is equivalent; one that is 5% worse in one domain is not."""
    mod = load_benchmark("tune_structprune")
    g = torch.Generator().manual_seed(0)
    base = {d: (4.0 + torch.rand(8, generator=g)).tolist() for d in ("c4", "wikitext2")}

    def row(value, shift):
        dom = {d: {"window_nlls": [x + shift.get(d, 0.0) for x in v], "ppl": 1.0} for d, v in base.items()}
        return {"sparsity": 0.3, "cut_paths": value, "heldout": dom["c4"], "heldout_domains": {"wikitext2": dom["wikitext2"]}}

    rows = [row("pruned", {}), row("dense", {"c4": 0.001, "wikitext2": -0.002}), row("other", {"wikitext2": 0.05})]
    (d,) = mod.compare(rows, "cut_paths", "pruned", rule="equivalent")
    assert d["best"] == ["dense"]
    assert "cut_paths=dense equivalent" in d["decision"] and "cut_paths=other not equivalent" in d["decision"]
    (b,) = mod.compare(rows, "cut_paths", "pruned")  # the default rule: nothing is lower everywhere
    assert b["decision"].startswith("keep cut_paths=pruned")


def test_compare_code_pairs_two_files_of_the_same_settings(tune, tmp_path, one_torch_thread):
    """--compare-code (a change with no config knob, measured by two code versions): the rows of two
    results files become a sweep of `code`, paired against the first file's; the reference pairs with
    itself exactly; files of other settings are refused; nothing is pruned."""
    a, b = tmp_path / "base", tmp_path / "cand"
    args = ["--model", "tiny", "--sparsity", "0.3", "--sweep", "temperature=1", "--reference", "1", "--nsamples", "4",
            "--seqlen", "32", "--heldout", "3", "--threads", "1"]
    assert tune.main([*args, "--out", str(a)]) == 0
    assert tune.main([*args, "--out", str(b), "--fixed", "damp=0.05"]) == 0  # another "version": other weights
    cand = json.loads(b.with_suffix(".json").read_text())
    cand["settings"]["fixed"] = ""  # as if the same command had run on other code
    b.with_suffix(".json").write_text(json.dumps(cand))
    tune.calls.clear()
    out = tmp_path / "cmp"
    assert tune.main(["--out", str(out), "--rule", "equivalent", "--compare-code", f"{a}.json:main",
                      f"{b}.json:candidate"]) == 0 and tune.calls == []
    rec = json.loads(out.with_suffix(".json").read_text())
    assert [r["code"] for r in rec["rows"]] == ["main", "candidate"] and rec["settings"]["sweep"] == "code"
    ref, other = rec["rows"]
    assert (ref["ratios"]["c4"]["value"], ref["ratios"]["c4"]["low"]) == (1.0, 1.0)
    want = tune.paired_ratio(other["heldout"]["window_nlls"], ref["heldout"]["window_nlls"]).to_dict()
    assert other["ratios"]["c4"] == want and other["swept"] == {"temperature": 1}
    assert "code=candidate" in rec["decisions"][0]["decision"]
    assert "| 0.30 | candidate |" in out.with_suffix(".md").read_text()
    cand["settings"]["seqlen"] = 64
    b.with_suffix(".json").write_text(json.dumps(cand))
    with pytest.raises(SystemExit, match="seqlen"):
        tune.main(["--out", str(out), "--compare-code", f"{a}.json:main", f"{b}.json:candidate"])
