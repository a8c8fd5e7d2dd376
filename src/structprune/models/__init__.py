"""Model resolution and loading (aliases, GGUF, local folders, hub ids)."""

from .loading import ResolvedModel, cache_dir, load_model, model_context_length, resolve_model

__all__ = ["ResolvedModel", "cache_dir", "load_model", "model_context_length", "resolve_model"]
