"""LLaMA family: LLaMA (1-3.x), Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms), SmolLM2; grouped-query attention."""

from __future__ import annotations

from torch import nn

from .base import Adapter, AttentionShape


class LlamaAdapter(Adapter):
    """Decoder layers at ``model.model.layers``; SwiGLU MLP; GQA attention.

    Removing query heads inside KV groups changes the group size, so the attention
    module's ``num_key_value_groups`` is updated (sdpa and eager attention read it);
    nothing else in the forward depends on the head counts. Llama 3.x's rope scaling
    acts per position and per head dimension, and Qwen3's ``q_norm``/``k_norm`` are one
    RMSNorm of ``head_dim`` weights shared by every head, so neither changes with the
    kept heads; ``head_dim`` is read from the attention module (Qwen3 sets it explicitly).
    """

    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def pre_layer_modules(self) -> list[nn.Module]:
        inner = self.model.model
        return [m for m in (inner.embed_tokens, getattr(inner, "rotary_emb", None)) if m is not None]

    def head_modules(self) -> list[nn.Module]:
        return [self.model.model.norm, self.model.lm_head]

    def attn_linears(self, layer):
        a = layer.self_attn
        return [a.q_proj, a.k_proj, a.v_proj], a.o_proj

    def mlp_linears(self, layer):
        m = layer.mlp
        return [m.gate_proj, m.up_proj], m.down_proj

    def mlp_activation(self, layer):
        return layer.mlp.act_fn

    def attention_shape(self, layer) -> AttentionShape:
        a = layer.self_attn
        dh = a.head_dim
        return AttentionShape(
            num_heads=a.q_proj.out_features // dh,
            num_kv_heads=a.k_proj.out_features // dh,
            head_dim=dh,
            hidden_size=a.o_proj.out_features,
            qkv_bias=a.q_proj.bias is not None,
        )

    def set_attention_heads(self, layer, num_heads: int, num_kv_heads: int) -> None:
        layer.self_attn.num_key_value_groups = num_heads // num_kv_heads
