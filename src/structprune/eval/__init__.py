"""Perplexity under the project's measurement protocol (docs/protocol.md)."""

from .perplexity import PerplexityResult, encode_corpus, evaluate_datasets, perplexity, perplexity_from_ids

__all__ = ["PerplexityResult", "encode_corpus", "evaluate_datasets", "perplexity", "perplexity_from_ids"]
