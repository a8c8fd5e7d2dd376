"""Structured surgery: the only code that changes a layer's shapes."""

from .reshape import layer_shapes, reshape_meta_layer
from .slicing import apply_layer_plan, head_rows, mask_layer_plan, set_output_projection, slice_linear

__all__ = ["layer_shapes", "reshape_meta_layer", "apply_layer_plan", "head_rows", "mask_layer_plan", "set_output_projection", "slice_linear"]
