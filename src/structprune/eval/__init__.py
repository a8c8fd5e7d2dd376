"""Perplexity under the project's measurement protocol (docs/protocol.md), with intervals."""

from .intervals import Interval, at_most, paired_ratio, ppl_interval
from .perplexity import PerplexityResult, encode_corpus, evaluate_datasets, perplexity, perplexity_from_ids
from .protocol import PROTOCOLS, Protocol, get_protocol

__all__ = ["PROTOCOLS", "Interval", "PerplexityResult", "Protocol", "at_most", "encode_corpus", "evaluate_datasets",
           "get_protocol", "paired_ratio", "perplexity", "perplexity_from_ids", "ppl_interval"]
