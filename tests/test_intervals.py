"""Bootstrap intervals over windows and paired ratios (eval/intervals.py), the protocols'
sizes (eval/protocol.py), and per-window NLLs carried by every perplexity result."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from structprune.errors import StructPruneError
from structprune.eval import (
    PROTOCOLS,
    at_most,
    evaluate_datasets,
    get_protocol,
    paired_ratio,
    perplexity_from_ids,
    ppl_interval,
)
from structprune.eval.intervals import bootstrap_means
from structprune.eval.protocol import limit_for


def _nlls(n: int, seed: int = 0, mean: float = 3.0, sd: float = 0.4) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(mean, sd) for _ in range(n)]


def test_point_is_the_token_perplexity_and_lies_inside_its_interval():
    nlls = _nlls(40)
    ci = ppl_interval(nlls)
    assert ci.value == pytest.approx(math.exp(sum(nlls) / 40), rel=1e-12)
    assert ci.low < ci.value < ci.high and ci.contains(ci.value)
    assert (ci.nwindows, ci.level, ci.n_boot, ci.seed) == (40, 0.95, 10_000, 0)


def test_known_answer_two_windows():
    # Two windows: a resample's mean is a (prob 1/4), (a+b)/2 (1/2) or b (1/4), so the 2.5% and
    # 97.5% quantiles are the extremes: the interval is [exp(a), exp(b)] exactly.
    ci = ppl_interval([2.0, 4.0])
    assert ci.value == pytest.approx(math.exp(3.0))
    assert ci.low == pytest.approx(math.exp(2.0)) and ci.high == pytest.approx(math.exp(4.0))


def test_known_answer_against_the_normal_approximation():
    # Many windows: the bootstrap distribution of the mean is close to normal with the sample
    # standard error, so the interval of the mean NLL is mean +- 1.96 s / sqrt(n).
    nlls = _nlls(400, seed=3)
    n = len(nlls)
    m = sum(nlls) / n
    se = math.sqrt(sum((x - m) ** 2 for x in nlls) / n / n)
    ci = ppl_interval(nlls, n_boot=20_000)
    assert math.log(ci.low) == pytest.approx(m - 1.96 * se, abs=0.1 * se)
    assert math.log(ci.high) == pytest.approx(m + 1.96 * se, abs=0.1 * se)


def test_interval_shrinks_with_more_windows():
    widths = [math.log(ci.high / ci.low) for ci in (ppl_interval(_nlls(n, seed=1)) for n in (10, 40, 160))]
    assert widths[0] > widths[1] > widths[2]
    # The standard error falls as 1/sqrt(n): 4x the windows about halves the width.
    assert 1.6 < widths[0] / widths[1] < 2.5 and 1.6 < widths[1] / widths[2] < 2.5


def test_deterministic_in_the_seed():
    nlls = _nlls(20)
    assert ppl_interval(nlls) == ppl_interval(nlls)
    assert ppl_interval(nlls, seed=1) != ppl_interval(nlls)
    assert torch.equal(bootstrap_means(torch.tensor(nlls, dtype=torch.float64), 50, seed=7),
                       bootstrap_means(torch.tensor(nlls, dtype=torch.float64), 50, seed=7))


def test_one_window_has_a_zero_width_interval():
    ci = ppl_interval([2.5])
    assert ci.low == ci.value == ci.high == pytest.approx(math.exp(2.5))


def test_paired_ratio_of_a_model_with_itself_is_exactly_one():
    nlls = _nlls(40)
    r = paired_ratio(nlls, nlls)
    assert r.value == r.low == r.high == 1.0
    assert at_most(r, 1.0) and not at_most(r, 0.99)


def test_paired_ratio_known_answer_and_pairing():
    a = _nlls(40, seed=5, sd=1.0)  # windows of very different difficulty
    b = [x + 0.1 for x in a]  # b is uniformly 0.1 nat worse on every window
    r = paired_ratio(a, b)
    # Every resample's mean difference is -0.1: the ratio is exp(-0.1) with no spread.
    assert r.value == pytest.approx(math.exp(-0.1), rel=1e-12)
    assert r.low == pytest.approx(r.value, rel=1e-12) and r.high == pytest.approx(r.value, rel=1e-12)
    # Unpaired intervals overlap heavily: pairing is what separates the two models.
    ia, ib = ppl_interval(a), ppl_interval(b)
    assert ia.high > ib.low
    assert at_most(r, 1.0)


def test_paired_ratio_contains_its_point_and_is_antisymmetric():
    a, b = _nlls(30, seed=1), _nlls(30, seed=2)
    r, inv = paired_ratio(a, b), paired_ratio(b, a)
    assert r.contains(r.value)
    assert inv.value == pytest.approx(1 / r.value)
    # Same resampled indices: the interval of b/a is the reciprocal of a/b's (up to quantile interpolation).
    assert inv.low == pytest.approx(1 / r.high, rel=1e-9) and inv.high == pytest.approx(1 / r.low, rel=1e-9)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="same windows"):
        paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        ppl_interval([])
    with pytest.raises(ValueError, match="finite"):
        ppl_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="level"):
        ppl_interval([1.0, 2.0], level=1.0)


def test_perplexity_results_carry_window_nlls_and_interval(make_tiny_llama):
    model = make_tiny_llama()
    ids = torch.randint(0, 257, (1, 1000), generator=torch.Generator().manual_seed(2))
    res = perplexity_from_ids(model, ids, 64, limit=6, batch_size=4, progress=False)
    assert len(res.window_nlls) == 6
    assert math.exp(sum(res.window_nlls) / 6) == pytest.approx(res.ppl, rel=1e-9)
    # Windows are scored independently: one window alone gives its own NLL.
    first = perplexity_from_ids(model, ids, 64, limit=1, progress=False)
    assert first.window_nlls[0] == pytest.approx(res.window_nlls[0], rel=1e-5)
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))  # strict JSON
    assert d["window_nlls"] == pytest.approx(list(res.window_nlls))
    low, high = d["ppl_interval"]
    assert low <= res.ppl <= high and (low, high) == (res.interval().low, res.interval().high)


def test_protocols_and_per_dataset_limits(make_tiny_llama, byte_tokenizer, tmp_path):
    cpu, gpu = get_protocol("cpu"), get_protocol("GPU")
    assert (cpu.calib_nsamples, cpu.calib_seqlen, cpu.eval_seqlen) == (32, 2048, 2048)
    assert cpu.eval_limits == {"wikitext2": 40, "ptb": 20, "c4": 20}
    assert (gpu.calib_nsamples, gpu.calib_seqlen) == (128, 2048) and gpu.limit("wikitext2") is None
    assert set(PROTOCOLS) == {"cpu", "gpu"}
    with pytest.raises(StructPruneError, match="unknown protocol"):
        get_protocol("tpu")
    assert limit_for({"ptb": 20}, "PTB") == 20 and limit_for({"ptb": 20}, "wikitext2") is None
    assert limit_for(5, "ptb") == 5
    # evaluate_datasets applies a mapping per dataset (a file it does not name: every window).
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("x" * 640)
    b.write_text("y" * 640)
    res = evaluate_datasets(make_tiny_llama(), byte_tokenizer, [str(a), str(b)], seqlen=64,
                            limit={str(a): 3}, progress=False)
    assert (res[str(a)].nwindows, res[str(b)].nwindows) == (3, 10)


def test_evaluate_datasets_under_a_protocol(make_tiny_llama, byte_tokenizer, tmp_path):
    """``protocol=`` sets the datasets, the window length and the windows; the per-window NLLs it
    keeps give the interval and the paired ratio of two models."""
    from structprune.eval import Protocol, paired_ratio

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("the quick brown fox " * 40)
    b.write_text("jumps over the lazy dog " * 40)
    proto = Protocol("tiny", 2, 32, 32, {str(a): 3, str(b): 2})
    m1, m2 = make_tiny_llama(), make_tiny_llama(seed=1)
    r1 = evaluate_datasets(m1, byte_tokenizer, protocol=proto, progress=False)
    r2 = evaluate_datasets(m2, byte_tokenizer, protocol=proto, progress=False)
    assert list(r1) == [str(a), str(b)]
    assert [(r.nwindows, r.seqlen) for r in r1.values()] == [(3, 32), (2, 32)]
    ratio = paired_ratio(r1[str(a)].window_nlls, r2[str(a)].window_nlls)
    assert ratio.low <= ratio.value <= ratio.high and ratio.nwindows == 3
    assert math.isclose(ratio.value, r1[str(a)].ppl / r2[str(a)].ppl, rel_tol=1e-6)
    with pytest.raises(StructPruneError, match="needs datasets or a protocol"):
        evaluate_datasets(m1, byte_tokenizer, progress=False)


def test_a_protocol_without_ptb_evaluates_what_ships_and_says_what_it_left_out(no_assets, make_tiny_llama,
                                                                                byte_tokenizer, caplog):
    """PTB does not ship: with nothing providing it, the protocol's default sets are WikiText-2 and
    C4 (both ship) with one line naming PTB and how to add it; naming PTB still refuses."""
    from structprune.eval import Protocol

    proto = Protocol("cpu", 2, 32, 32, {"wikitext2": 2, "ptb": 2, "c4": 1})
    have, notes = proto.readable_datasets()
    assert have == ["wikitext2", "c4"]
    assert len(notes) == 1 and notes[0].startswith("PTB left out of the cpu protocol's evaluation: PTB (Penn Treebank)")
    assert "ptb.valid.txt" in notes[0] and "\n" not in notes[0]
    model = make_tiny_llama(vocab_size=257, max_position_embeddings=64)
    with caplog.at_level("WARNING"):
        res = evaluate_datasets(model, byte_tokenizer, protocol=proto, progress=False)
    assert list(res) == ["wikitext2", "c4"] and [r.nwindows for r in res.values()] == [2, 1]
    assert "PTB left out" in caplog.text
    with pytest.raises(StructPruneError, match="LDC terms"):
        evaluate_datasets(model, byte_tokenizer, ["wikitext2", "ptb"], protocol=proto, progress=False)


def test_the_cli_default_evaluation_leaves_out_ptb_in_one_line(no_assets, capsys):
    from structprune.cli import _default_datasets
    from structprune.eval import get_protocol

    assert _default_datasets(None) == ["wikitext2"]
    assert _default_datasets(get_protocol("gpu")) == ["wikitext2", "c4"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[structprune] PTB left out of the gpu protocol's evaluation: ")
