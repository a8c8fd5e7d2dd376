"""Calibration windows and (cached) tokenisation of the corpora.

Default calibration follows SparseGPT: 128 random windows of 2048 tokens from C4,
seed 0. Our C4 is a 1,500-document subset, split into disjoint document ranges for
calibration, held-out calibration and evaluation (see ``corpora.C4_*_DOCS``).
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import CalibrationError
from .corpora import C4_CALIB_DOCS, C4_HELDOUT_DOCS, CORPORA, c4_documents, load_text

logger = logging.getLogger(__name__)

_CACHE_SIZE = 16
_token_cache: OrderedDict[tuple, object] = OrderedDict()


def _tokenizer_key(tokenizer) -> tuple:
    name = getattr(tokenizer, "name_or_path", "") or ""
    # Unnamed tokenizers (built in code) are only cached per object.
    ident = name if name else f"id:{id(tokenizer)}"
    return (type(tokenizer).__name__, ident, len(tokenizer))


def _cached(key: tuple, compute):
    if key in _token_cache:
        _token_cache.move_to_end(key)
        return _token_cache[key]
    value = compute()
    _token_cache[key] = value
    if len(_token_cache) > _CACHE_SIZE:
        _token_cache.popitem(last=False)
    return value


def clear_token_cache() -> None:
    """Forget all cached tokenisations."""
    _token_cache.clear()


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D LongTensor, with the tokenizer's default special tokens."""
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def encode_text(tokenizer, name: str, split: str = "eval") -> torch.Tensor:
    """Token ids ``[1, numel]`` of a corpus or file (see ``load_text``), cached in-process.

    Built-in corpora are cached by tokenizer and corpus; files by path, size and mtime.
    """
    if name.lower() in CORPORA:
        key = ("text", _tokenizer_key(tokenizer), name.lower(), split)
    else:
        path = Path(name).expanduser()
        stat = path.stat() if path.is_file() else None
        key = ("file", _tokenizer_key(tokenizer), str(path.resolve()), stat and (stat.st_size, stat.st_mtime_ns))
    # A clone, so a caller writing into it cannot corrupt the cache.
    return _cached(key, lambda: tokenize(tokenizer, load_text(name, split)).unsqueeze(0)).clone()


def _c4_doc_tokens(tokenizer, doc_range: tuple[int, int]) -> list[list[int]]:
    """Each C4 document of the range tokenised on its own (SparseGPT's scheme needs them)."""

    def compute():
        docs = c4_documents(doc_range)
        return tokenizer(docs, verbose=False)["input_ids"]

    return _cached(("c4docs", _tokenizer_key(tokenizer), doc_range), compute)


def _check_args(nsamples: int, seqlen: int) -> None:
    if nsamples < 1 or seqlen < 2:
        raise CalibrationError(f"need nsamples >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}")


def _random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, rng: random.Random, what: str) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at random offsets of a 1-D token stream."""
    numel = ids.numel()
    if numel < seqlen + 1:
        raise CalibrationError(
            f"{what} has {numel} tokens, fewer than seqlen+1={seqlen + 1}; use a longer text or a shorter --seqlen"
        )
    starts = [rng.randint(0, numel - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def _c4_windows(tokenizer, doc_range, nsamples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    """C4 windows: SparseGPT's per-document sampling when enough documents are long enough.

    SparseGPT draws a random document until one has more than ``seqlen`` tokens, then a
    random window inside it. On our 1,000-document subset few documents exceed 2048
    tokens, so that scheme would draw most windows from the same few dozen documents
    (overlapping, near-duplicate windows). When fewer than ``nsamples`` documents are
    long enough we instead cut windows at random offsets from all documents of the range
    joined with a space (the way C4 evaluation text is built).
    """
    rng = random.Random(seed)
    docs = _c4_doc_tokens(tokenizer, doc_range)
    n_long = sum(len(d) > seqlen for d in docs)
    if n_long >= nsamples:
        windows = []
        attempts = 0
        while len(windows) < nsamples:
            attempts += 1
            if attempts > 1000 * nsamples:  # unreachable with n_long >= nsamples; guards a hang
                raise CalibrationError(f"could not sample {nsamples} C4 windows of {seqlen} tokens from {what}")
            doc = docs[rng.randint(0, len(docs) - 1)]
            if len(doc) <= seqlen:
                continue
            start = rng.randint(0, len(doc) - seqlen - 1)
            windows.append(torch.tensor(doc[start : start + seqlen], dtype=torch.long))
        logger.info("C4 %s: %d windows from single documents (%d long enough)", what, nsamples, n_long)
        return torch.stack(windows)
    logger.info(
        "C4 %s: only %d documents exceed %d tokens (< %d samples); cutting windows from the joined documents",
        what,
        n_long,
        seqlen,
        nsamples,
    )

    def joined():
        return tokenize(tokenizer, " ".join(c4_documents(doc_range)))

    ids = _cached(("c4joined", _tokenizer_key(tokenizer), doc_range), joined)
    return _random_windows(ids, nsamples, seqlen, rng, f"C4 documents {doc_range[0]}:{doc_range[1]}")


def get_calibration(
    tokenizer, source: str = "c4", nsamples: int = 128, seqlen: int = 2048, seed: int = 0
) -> torch.Tensor:
    """Calibration windows ``[nsamples, seqlen]`` (LongTensor, CPU), deterministic in ``seed``.

    ``source`` is ``c4`` (documents ``C4_CALIB_DOCS``, disjoint from C4 evaluation and
    held-out text), ``wikitext2``, ``ptb`` or a path to a .txt/.json/.jsonl(.gz) file
    (random windows of the tokenised text).
    """
    _check_args(nsamples, seqlen)
    if source.lower() == "c4":
        return _c4_windows(tokenizer, C4_CALIB_DOCS, nsamples, seqlen, seed, "calibration")
    if source.lower() in CORPORA:
        logger.warning("calibrating on the %s evaluation text: its perplexity will be optimistic", source)
    ids = encode_text(tokenizer, source, split="eval")[0]
    return _random_windows(ids, nsamples, seqlen, random.Random(seed), f"calibration text '{source}'")


def get_heldout_calibration(
    tokenizer, source: str = "c4", nsamples: int = 32, seqlen: int = 2048, seed: int = 1
) -> torch.Tensor:
    """Held-out calibration windows for choosing hyper-parameters, never evaluation text.

    For ``c4`` they come from documents ``C4_HELDOUT_DOCS``, disjoint from both the
    calibration and the evaluation documents; for ``wikitext2`` from its validation split
    (a second domain; the protocol evaluates on the test split). Other sources have no
    separate held-out part: windows come from the same text with another seed (a warning says so).
    """
    _check_args(nsamples, seqlen)
    if source.lower() == "c4":
        return _c4_windows(tokenizer, C4_HELDOUT_DOCS, nsamples, seqlen, seed, "held-out calibration")
    if source.lower() == "wikitext2":
        ids = encode_text(tokenizer, "wikitext2", split="heldout")[0]
        return _random_windows(ids, nsamples, seqlen, random.Random(seed), "held-out text 'wikitext2' (validation)")
    logger.warning(
        "held-out calibration for '%s' overlaps its calibration text; use source='c4' for disjoint text", source
    )
    ids = encode_text(tokenizer, source, split="eval")[0]
    return _random_windows(ids, nsamples, seqlen, random.Random(seed), f"held-out text '{source}'")
