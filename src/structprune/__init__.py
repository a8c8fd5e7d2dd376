"""StructPrune: structured global pruning of LLMs with one decoder layer on the GPU."""

__version__ = "0.1.0"
