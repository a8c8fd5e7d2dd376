"""Allocation: how many structures each layer keeps, given a global sparsity."""

from .owl import outlier_ratio, owl_retention, owl_widths
from .threshold import cost_normalised, fit_budget, threshold_counts, threshold_widths
from .widths import LayerWidths, layer_cost, nearest_attention_option, uniform_widths, widths_for_budget

__all__ = ["LayerWidths", "layer_cost", "nearest_attention_option", "uniform_widths", "widths_for_budget",
           "outlier_ratio", "owl_retention", "owl_widths", "cost_normalised", "fit_budget", "threshold_counts",
           "threshold_widths"]
