"""Corpora and calibration windows: shapes, determinism, disjointness, errors."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from structprune.data import (
    C4_CALIB_DOCS,
    C4_EVAL_DOCS,
    C4_HELDOUT_DOCS,
    get_calibration,
    get_heldout_calibration,
    load_c4_documents,
    load_text,
)
from structprune.errors import CalibrationError, StructPruneError



def _byte_of(tokenizer) -> dict[int, int]:
    """Token id -> byte for the byte-level test tokenizer (GPT-2's byte-to-unicode table)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {tokenizer.convert_tokens_to_ids(c): b for b, c in chars.items()}


def _decode(tokenizer, windows: torch.Tensor) -> list[bytes]:
    # Bytes, not str: a window may cut a multi-byte UTF-8 character in two.
    table = _byte_of(tokenizer)
    return [bytes(table[i] for i in w.tolist()) for w in windows]


def test_builtin_corpora_match_the_assets(assets):
    wiki = load_text("wikitext2")
    assert len(wiki) == 1_294_336  # the README's character count
    assert wiki.startswith("\n\n = Robert Boulter = ")  # row 0 is empty
    ptb = load_text("ptb")
    assert "\n" not in ptb and "  " not in ptb[:1000]
    docs = load_c4_documents()
    assert len(docs) == 1500
    assert load_text("c4") == " ".join(docs[C4_EVAL_DOCS[0] : C4_EVAL_DOCS[1]])


def test_doc_ranges_are_disjoint():
    ranges = sorted([C4_CALIB_DOCS, C4_HELDOUT_DOCS, C4_EVAL_DOCS])
    for (_, stop), (start, _) in zip(ranges, ranges[1:]):
        assert stop <= start


def test_c4_calibration_shape_and_determinism(byte_tokenizer):
    a = get_calibration(byte_tokenizer, "c4", nsamples=8, seqlen=512, seed=0)
    b = get_calibration(byte_tokenizer, "c4", nsamples=8, seqlen=512, seed=0)
    c = get_calibration(byte_tokenizer, "c4", nsamples=8, seqlen=512, seed=1)
    assert a.shape == (8, 512) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_c4_calibration_never_touches_eval_documents(byte_tokenizer):
    calib_text = load_text("c4", "calib").encode()
    heldout_text = load_text("c4", "heldout").encode()
    eval_text = load_text("c4", "eval").encode()
    for window in _decode(byte_tokenizer, get_calibration(byte_tokenizer, "c4", nsamples=16, seqlen=1024)):
        assert window in calib_text
        assert window not in eval_text and window not in heldout_text
    # Few held-out documents exceed 2048 bytes, so this exercises the joined-documents fallback.
    heldout = get_heldout_calibration(byte_tokenizer, "c4", nsamples=48, seqlen=2048)
    assert heldout.shape == (48, 2048)
    for window in _decode(byte_tokenizer, heldout):
        assert window in heldout_text
        assert window not in eval_text and window not in calib_text


def test_file_calibration(tmp_path, byte_tokenizer):
    path = tmp_path / "calib.txt"
    path.write_text("".join(f"line {i} of some calibration text.\n" for i in range(200)))
    a = get_calibration(byte_tokenizer, str(path), nsamples=4, seqlen=64, seed=0)
    b = get_calibration(byte_tokenizer, str(path), nsamples=4, seqlen=64, seed=0)
    c = get_calibration(byte_tokenizer, str(path), nsamples=4, seqlen=64, seed=3)
    assert a.shape == (4, 64)
    assert torch.equal(a, b) and not torch.equal(a, c)
    for window in _decode(byte_tokenizer, a):
        assert window in path.read_bytes()


def test_jsonl_gz_file(tmp_path, byte_tokenizer):
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        for i in range(3):
            fh.write(json.dumps({"text": f"document {i}"}) + "\n")
    assert load_text(str(path)) == "document 0 document 1 document 2"


def test_too_short_file_raises_calibration_error(tmp_path, byte_tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("x" * 100)
    with pytest.raises(CalibrationError, match=r"100 tokens.*seqlen\+1=129"):
        get_calibration(byte_tokenizer, str(path), nsamples=2, seqlen=128)


def test_unknown_corpus_and_missing_file():
    with pytest.raises(StructPruneError, match="unknown corpus"):
        load_text("imagenet")
    with pytest.raises(StructPruneError, match="not found"):
        load_text("/nonexistent/calib.txt")


def test_packaged_corpora_equal_the_assets(assets, no_assets):
    wiki = load_text("wikitext2")
    assert wiki == (assets / "wikitext2" / "wikitext-2-raw-v1.test.txt").read_text(encoding="utf-8")
    docs = load_c4_documents()
    with gzip.open(assets / "c4" / "c4-validation-subset-1500.json.gz", "rt", encoding="utf-8") as fh:
        assert docs == [json.loads(line)["text"] for line in fh]


def test_packaged_corpora_need_no_assets_and_ptb_says_why_it_is_absent(no_assets, monkeypatch):
    assert len(load_text("wikitext2")) == 1_294_336
    assert len(load_c4_documents()) == 1500
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):  # as where `datasets` is not installed
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(StructPruneError, match="LDC terms and does not ship"):
        load_text("ptb")


def test_altered_packaged_corpus_is_refused(no_assets, monkeypatch, tmp_path):
    src = no_assets.BUNDLED_DIR / no_assets.BUNDLED["wikitext2"][0]
    text = gzip.decompress(src.read_bytes()).replace(b"Robert Boulter", b"Robert Boulted", 1)
    (tmp_path / src.name).write_bytes(gzip.compress(text))
    monkeypatch.setattr(no_assets, "BUNDLED_DIR", tmp_path)
    with pytest.raises(StructPruneError, match="SHA-256"):
        load_text("wikitext2")


def test_wikitext2_heldout_is_the_validation_split_disjoint_from_evaluation(no_assets, byte_tokenizer):
    """Tuning's second domain: WikiText-2 validation (shipped, SHA-checked), never the test text
    the protocol evaluates on."""
    from structprune.data.calibration import get_heldout_calibration

    valid, test = load_text("wikitext2", "heldout"), load_text("wikitext2")
    assert valid.startswith("\n\n = Homarus gammarus = \n") and len(valid) == 1149668
    titles = lambda t: {line.strip() for line in t.split("\n") if line.startswith(" = ") and not line.startswith(" = =")}
    assert len(titles(valid)) == 60 and not titles(valid) & titles(test)
    win = get_heldout_calibration(byte_tokenizer, "wikitext2", nsamples=3, seqlen=256, seed=1)
    assert win.shape == (3, 256)
    for w in win:
        text = byte_tokenizer.decode(w.tolist())[8:-8]  # byte tokens: the text itself (ends may split a char)
        assert text in valid and text not in test
