"""Structure scorers: tensors in, one score per head and per MLP channel out (higher = keep).

Every scorer has the signature ``score(adapter, layer, stats) -> {"attn": [H], "mlp": [n]}``
where ``stats`` are the layer's :class:`~structprune.engine.ModuleStats`.
"""

from .basic import SCORERS, magnitude_sp, per_head, wanda_sp

__all__ = ["SCORERS", "magnitude_sp", "per_head", "wanda_sp"]
