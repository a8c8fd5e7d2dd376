"""A per-layer view of a model config shared by every layer.

Some attention implementations (Phi-3's fused ``qkv`` split, and the probe that captures attention
probabilities in solvers/values.py) read head counts or the attention implementation from
``self.config``, one object shared by every layer. A layer that needs other values gets a
:class:`LayerConfig` view with those attributes overridden instead of an edited copy, so later
changes to the shared config (attention implementation) still reach it.
"""

from __future__ import annotations

import copy


class LayerConfig:
    """A read-through view of a shared config with some attributes overridden for one layer."""

    def __init__(self, base, **overrides):
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", dict(overrides))

    def __getattr__(self, name):
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name, value):
        setattr(self._base, name, value)

    def __deepcopy__(self, memo):
        return LayerConfig(copy.deepcopy(self._base, memo), **self._overrides)


def shared_config(config):
    """The model-wide config behind a (possibly per-layer) attention config."""
    return config._base if isinstance(config, LayerConfig) else config


__all__ = ["LayerConfig", "shared_config"]
