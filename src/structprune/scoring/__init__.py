"""Structure scorers: tensors in, one score per head and per MLP channel out (higher = keep).

Every scorer has the signature ``score(adapter, layer, stats) -> {"attn": [H], "mlp": [n]}``
where ``stats`` are the layer's :class:`~structprune.engine.ModuleStats`.
"""

from .basic import SCORERS as _BASIC
from .basic import magnitude_sp, mlp_column_sums, per_head, wanda_sp
from .flap import flap_keys, fluctuation, fluctuation_channels, standardise

SCORERS = {**_BASIC, "flap": fluctuation}

__all__ = ["SCORERS", "magnitude_sp", "mlp_column_sums", "per_head", "wanda_sp", "flap_keys", "fluctuation", "fluctuation_channels",
           "standardise"]
