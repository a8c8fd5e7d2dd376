"""``--protocol`` on the command line: sizes from eval/protocol.py, per-window NLLs, intervals and
paired ratios in report.json and in ``structprune eval --json``."""

from __future__ import annotations

import json
import math

import pytest

from structprune.cli import main
from structprune.eval import protocol as protocols
from structprune.eval.intervals import paired_ratio


@pytest.fixture
def tiny(tmp_path, make_tiny_llama, byte_tokenizer):
    """A saved tiny LLaMA with a byte tokenizer, a text file, and a small protocol scoring that
    file (the real ones need 2048-token windows, beyond the tiny model's context)."""
    model = make_tiny_llama()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    byte_tokenizer.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"The quick brown fox {i} jumps over the lazy dog." for i in range(400)))
    small = protocols.Protocol("cpu", calib_nsamples=3, calib_seqlen=64, eval_seqlen=128,
                               eval_limits={str(text): 5})
    return str(folder), str(text), small


def test_prune_with_protocol_sets_sizes_and_reports_intervals(tiny, tmp_path, monkeypatch):
    folder, text, small = tiny
    monkeypatch.setitem(protocols.PROTOCOLS, "cpu", small)
    out = tmp_path / "out"
    assert main(["prune", folder, "--sparsity", "0.4", "--method", "wanda-sp", "--calib", text, "--protocol", "cpu",
                 "--mlp-multiple", "1", "--output", str(out), "-q"]) == 0
    r = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert r["protocol"]["name"] == "cpu" and r["protocol"]["eval_windows"] == {text: 5}
    assert (r["calibration"]["nsamples"], r["calibration"]["seqlen"]) == (3, 64)
    p = r["ppl"][text]  # the protocol's datasets are evaluated when --eval is not given
    assert (p["nwindows"], p["seqlen"]) == (5, 128)
    assert len(p["window_nlls"]["dense"]) == len(p["window_nlls"]["pruned"]) == 5
    for key, ppl in (("dense_interval", p["dense"]), ("pruned_interval", p["pruned"])):
        low, high = p[key]
        assert low <= ppl <= high
    ratio = p["ratio_pruned_to_dense"]
    assert ratio["value"] == pytest.approx(p["pruned"] / p["dense"], rel=1e-9)
    assert ratio["low"] <= ratio["value"] <= ratio["high"]
    again = paired_ratio(p["window_nlls"]["pruned"], p["window_nlls"]["dense"])  # recomputable from the report
    assert (again.low, again.high) == (ratio["low"], ratio["high"])


@pytest.mark.parametrize("extra", [["--nsamples", "4"], ["--seqlen", "32"], ["--eval-limit", "2"],
                                   ["--eval-seqlen", "64"]])
def test_protocol_refuses_sizes_given_by_hand(tiny, tmp_path, monkeypatch, capsys, extra):
    folder, text, small = tiny
    monkeypatch.setitem(protocols.PROTOCOLS, "cpu", small)
    out = tmp_path / "out"
    assert main(["prune", folder, "--sparsity", "0.4", "--calib", text, "--protocol", "cpu", "--output", str(out),
                 "-q", *extra]) == 2
    assert f"drop {extra[0]}" in capsys.readouterr().err and not out.exists()


def test_eval_with_protocol_writes_nlls_and_intervals(tiny, tmp_path, monkeypatch, capsys):
    folder, text, small = tiny
    monkeypatch.setitem(protocols.PROTOCOLS, "cpu", small)
    out = tmp_path / "eval.json"
    assert main(["eval", folder, "--protocol", "cpu", "--json", str(out), "-q"]) == 0
    r = json.loads(out.read_text())
    v = r["ppl"][text]
    assert v["nwindows"] == 5 and len(v["window_nlls"]) == 5 and r["protocol"]["name"] == "cpu"
    assert v["ppl"] == pytest.approx(math.exp(sum(v["window_nlls"]) / 5), rel=1e-9)
    assert v["ppl_interval"][0] <= v["ppl"] <= v["ppl_interval"][1]
    assert "95% bootstrap" in capsys.readouterr().out
