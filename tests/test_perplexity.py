"""Perplexity windowing and arithmetic on tiny random models; one real-model smoke test."""

from __future__ import annotations

import math

import pytest
import torch

from structprune.errors import StructPruneError
from structprune.eval import encode_corpus, perplexity, perplexity_from_ids


def _reference_ppl(model, ids: torch.Tensor, seqlen: int, nwindows: int) -> float:
    """Plain per-window loop in float64: exp(mean next-token NLL)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(nwindows):
            window = ids[0, i * seqlen : (i + 1) * seqlen].unsqueeze(0)
            logp = torch.log_softmax(model(window).logits[0, :-1].double(), dim=-1)
            total -= logp.gather(1, window[0, 1:, None]).sum().item()
            count += seqlen - 1
    return math.exp(total / count)


def test_windowing_and_value_match_a_plain_loop(make_tiny_llama):
    model = make_tiny_llama()
    torch.manual_seed(1)
    ids = torch.randint(0, 257, (1, 1000))
    seqlen = 64
    result = perplexity_from_ids(model, ids, seqlen, progress=False)
    assert result.nwindows == 1000 // seqlen == 15  # tail of 40 tokens dropped
    assert result.ntokens == 15 * (seqlen - 1)
    assert result.seqlen == seqlen
    assert result.ppl == pytest.approx(_reference_ppl(model, ids, seqlen, 15), rel=1e-5)


def test_limit_and_batching(make_tiny_llama):
    model = make_tiny_llama()
    ids = torch.randint(0, 257, (1, 1000), generator=torch.Generator().manual_seed(2))
    limited = perplexity_from_ids(model, ids, 64, limit=4, progress=False)
    assert limited.nwindows == 4
    assert limited.ppl == pytest.approx(_reference_ppl(model, ids, 64, 4), rel=1e-5)
    batched = perplexity_from_ids(model, ids, 64, limit=4, batch_size=3, progress=False)
    assert batched.ppl == pytest.approx(limited.ppl, rel=1e-5)


def test_uniform_logits_give_vocab_size(make_tiny_llama):
    model = make_tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    ids = torch.randint(0, 257, (1, 300), generator=torch.Generator().manual_seed(3))
    assert perplexity_from_ids(model, ids, 50, progress=False).ppl == pytest.approx(257, rel=1e-5)


def test_half_precision_model_is_scored_in_float32(make_tiny_llama):
    model = make_tiny_llama().to(torch.bfloat16)
    ids = torch.randint(0, 257, (1, 256), generator=torch.Generator().manual_seed(4))
    result = perplexity_from_ids(model, ids, 128, progress=False)
    assert math.isfinite(result.ppl) and result.ppl > 1


def test_seqlen_beyond_context_and_too_short_text(make_tiny_llama):
    model = make_tiny_llama(max_position_embeddings=128)
    ids = torch.randint(0, 257, (1, 1000))
    with pytest.raises(StructPruneError, match="exceeds the model's context length 128"):
        perplexity_from_ids(model, ids, 256, progress=False)
    with pytest.raises(StructPruneError, match="fewer than one window"):
        perplexity_from_ids(model, ids[:, :100], 128, progress=False)


def test_perplexity_on_a_text_file(tmp_path, make_tiny_llama, byte_tokenizer):
    path = tmp_path / "eval.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 20)  # 900 bytes
    model = make_tiny_llama()
    ids = encode_corpus(byte_tokenizer, str(path))
    assert ids.shape == (1, 900)
    result = perplexity(model, byte_tokenizer, str(path), seqlen=100, progress=False)
    assert (result.dataset, result.nwindows) == (str(path), 9)
    assert result.ppl == pytest.approx(_reference_ppl(model, ids, 100, 9), rel=1e-5)


def test_real_smollm2_first_windows(tmp_path, smollm2_path):
    from structprune.data import load_text
    from structprune.models import load_model

    # A slice of WikiText-2 keeps this fast: tokenising the whole test set takes seconds.
    path = tmp_path / "wiki_head.txt"
    path.write_text(load_text("wikitext2")[:6000])
    model, tokenizer = load_model(str(smollm2_path))
    result = perplexity(model, tokenizer, str(path), seqlen=256, limit=2, progress=False)
    assert result.nwindows == 2
    assert 5 < result.ppl < 60  # dense is ~20 at 2048; short windows score a bit higher
