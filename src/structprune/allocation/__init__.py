"""Allocation: how many structures each layer keeps, given a global sparsity."""

from .widths import LayerWidths, layer_cost, nearest_attention_option, uniform_widths, widths_for_budget

__all__ = ["LayerWidths", "layer_cost", "nearest_attention_option", "uniform_widths", "widths_for_budget"]
