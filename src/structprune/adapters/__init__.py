"""Architecture adapters: one per model family, behind :class:`Adapter` and a registry."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedArchitectureError
from .base import Adapter, AttentionShape, LayerPlan, MLPShape, count_params, module_costs, prunable_params, removable_cost
from .gemma import Gemma3MultimodalAdapter, GemmaAdapter
from .llama import LlamaAdapter
from .moe import MoEAdapter
from .opt import OPTAdapter
from .phi3 import Phi3Adapter

ADAPTERS: list[type[Adapter]] = [LlamaAdapter, GemmaAdapter, Gemma3MultimodalAdapter, OPTAdapter, Phi3Adapter,
                                 MoEAdapter]


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``'s family, or an error naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    # Exported pruned models carry their family in ``structprune_base_model_type``.
    model_type = getattr(model.config, "structprune_base_model_type", None) or model_type
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r}: StructPrune supports {', '.join(supported_model_types())}"
    )


__all__ = [
    "Adapter", "AttentionShape", "LayerPlan", "MLPShape", "count_params", "module_costs", "prunable_params",
    "removable_cost",
    "Gemma3MultimodalAdapter", "GemmaAdapter", "LlamaAdapter", "MoEAdapter", "OPTAdapter", "Phi3Adapter",
    "get_adapter", "supported_model_types",
]
