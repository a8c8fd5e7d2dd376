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

:class:`Gemma3MultimodalAdapter` prunes the language model of ``Gemma3ForConditionalGeneration``
(``model_type`` ``gemma3``) in place: its decoder layers, embeddings and final norm sit under
``model.model.language_model`` and the config nests them in ``text_config``. The vision tower
and the multimodal projector are neither pruned nor moved; a text-only forward never runs them.
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


class Gemma3MultimodalAdapter(GemmaAdapter):
    """Gemma3ForConditionalGeneration: the language model (``model.model.language_model``, a
    ``Gemma3TextModel``) is pruned exactly as ``Gemma3ForCausalLM``'s; ``lm_head`` is the wrapper's.

    Only the text part has structures; the vision tower (SigLIP) and ``multi_modal_projector``
    keep every weight (the projector maps into the hidden size, which pruning keeps)."""

    model_types = ("gemma3",)

    def text_model(self) -> nn.Module:
        """The language model (``Gemma3TextModel``) inside the multimodal wrapper."""
        return self.model.model.language_model

    def text_config(self):
        return self.config.get_text_config()

    def layers(self) -> nn.ModuleList:
        return self.text_model().layers

    def pre_layer_modules(self) -> list[nn.Module]:
        inner = self.text_model()
        return [m for m in (inner.embed_tokens, getattr(inner, "rotary_emb", None)) if m is not None]

    def head_modules(self) -> list[nn.Module]:
        mods = [self.text_model().norm, self.model.lm_head]
        return mods + [self.softcap] if self.softcap is not None else mods
