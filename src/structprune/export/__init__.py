"""Writing pruned models (and reading them back)."""

from .writer import atomic_output_dir, save_pruned

__all__ = ["atomic_output_dir", "save_pruned"]
