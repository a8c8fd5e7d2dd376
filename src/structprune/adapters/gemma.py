"""Gemma 2 and Gemma 3 (text): GeGLU MLP, sandwich norms, scaled embeddings, soft-capping.

What differs from LLaMA and why none of it is pruned or needs an update after a cut:

- the embeddings are multiplied by ``sqrt(hidden_size)`` inside ``embed_tokens``
  (a pre-layer module, never cut);
- each block has pre- and post-norms around attention and MLP; they act on the hidden
  size, which pruning keeps;
- Gemma 3's ``q_norm``/``k_norm`` are one RMSNorm of ``head_dim`` weights shared by all heads;
- attention scores are scaled by ``query_pre_attn_scalar ** -0.5`` (a config constant,
  not ``1/sqrt(head_dim * heads)``) and soft-capped per score in Gemma 2: both are per head;
- sliding-window and global layers alternate: the engine captures each type's mask
  (and Gemma 3's per-type rotary tables), see ``engine.capture.layer_kwargs``;
- the final logits are soft-capped in Gemma 2 (``final_logit_softcapping``): the head
  modules end with :class:`LogitSoftcap` so losses and perplexities are the model's.

Grouped-query attention with a single KV head (Gemma 2/3 small models) leaves only
query heads prunable: the one KV group is always kept, with at least one query head.
"""

from __future__ import annotations

import torch
from torch import nn

from .llama import LlamaAdapter


class LogitSoftcap(nn.Module):
    """``cap * tanh(logits / cap)``: Gemma 2's final logit soft-capping, as its LM forward applies it."""

    def __init__(self, cap: float):
        super().__init__()
        self.cap = float(cap)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.tanh(logits / self.cap) * self.cap


class GemmaAdapter(LlamaAdapter):
    """Gemma2ForCausalLM / Gemma3ForCausalLM: decoder layers at ``model.model.layers``,
    gate/up/down projections (GeGLU), q/k/v/o attention; cut exactly like LLaMA."""

    model_types = ("gemma2", "gemma3_text")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        cap = getattr(self.text_config(), "final_logit_softcapping", None)
        # One instance per adapter: head_modules() is called repeatedly and must return the same modules.
        self.softcap = LogitSoftcap(cap) if cap else None

    def text_config(self):
        """The language model's config (the config itself for text-only models)."""
        return self.config

    def head_modules(self) -> list[nn.Module]:
        mods = super().head_modules()
        return mods + [self.softcap] if self.softcap is not None else mods
