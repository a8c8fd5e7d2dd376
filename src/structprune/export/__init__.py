"""Writing pruned models as Hugging Face folders, and reading them back (verified)."""

from .loader import is_structprune_export, load_pruned, verify_weights, weight_shapes
from .writer import ExportConfig, atomic_output_dir, check_output_dir, export_config, save_pruned, write_json

__all__ = ["ExportConfig", "atomic_output_dir", "check_output_dir", "export_config", "is_structprune_export", "load_pruned",
           "save_pruned", "verify_weights", "weight_shapes", "write_json"]
