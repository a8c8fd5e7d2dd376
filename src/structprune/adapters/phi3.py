"""Phi-3 (Phi-3/3.5/4-mini): LLaMA-like GQA attention and SwiGLU MLP, with fused projections.

``qkv_proj`` stacks the q, k and v rows (``[H*dh | K*dh | K*dh]``) and ``gate_up_proj`` the
gate and up rows (``[n | n]``, gate first: ``Phi3MLP`` chunks its output in two). Cutting
a head keeps its rows in every segment; cutting a channel keeps row ``j`` and row ``n + j``.

Phi-3's attention splits ``qkv`` at ``self.config.num_attention_heads * head_dim``: the
config object is shared by every layer, so a layer with pruned heads gets its own
:class:`LayerConfig` view (the shared config with that layer's head counts) rather than
an edited copy, so later changes to the model's config (attention implementation) still apply.
"""

from __future__ import annotations

from .base import Adapter, AttentionShape
from .config_view import LayerConfig, shared_config
from .llama import LlamaAdapter
from .parts import LinearMLPPart, fused_rows


class Phi3Adapter(Adapter):
    """Decoder layers at ``model.model.layers``; fused ``qkv_proj`` and ``gate_up_proj``."""

    model_types = ("phi3",)

    # Where things are is LLaMA's layout; only the projections differ.
    layers = LlamaAdapter.layers
    pre_layer_modules = LlamaAdapter.pre_layer_modules
    head_modules = LlamaAdapter.head_modules

    def attn_linears(self, layer):
        a = layer.self_attn
        return [a.qkv_proj], a.o_proj

    def mlp_linears(self, layer):
        m = layer.mlp
        return [m.gate_up_proj], m.down_proj

    def mlp_activation(self, layer):
        return layer.mlp.activation_fn

    def mlp_parts(self, layer):
        m = layer.mlp
        return [LinearMLPPart([(m.gate_up_proj, [0, m.down_proj.in_features])], m.down_proj)]

    def attention_shape(self, layer) -> AttentionShape:
        a = layer.self_attn
        dh = a.head_dim
        heads = a.o_proj.in_features // dh
        kv = (a.qkv_proj.out_features // dh - heads) // 2
        return AttentionShape(num_heads=heads, num_kv_heads=kv, head_dim=dh, hidden_size=a.o_proj.out_features,
                              qkv_bias=a.qkv_proj.bias is not None)

    def qkv_weights(self, layer):
        s = self.attention_shape(layer)
        w = layer.self_attn.qkv_proj.weight
        q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        return w[:q], w[q:q + kv], w[q + kv:q + 2 * kv]

    def value_rows(self, layer):
        s = self.attention_shape(layer)
        lin = layer.self_attn.qkv_proj
        v0, kv = (s.num_heads + s.num_kv_heads) * s.head_dim, s.num_kv_heads * s.head_dim
        return lin.weight[v0:v0 + kv], None if lin.bias is None else lin.bias[v0:v0 + kv]

    def attn_input_rows(self, layer, q_rows, kv_rows):
        s = self.attention_shape(layer)
        q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        return [(layer.self_attn.qkv_proj, fused_rows([(0, q_rows), (q, kv_rows), (q + kv, kv_rows)]))]

    def set_attention_heads(self, layer, num_heads: int, num_kv_heads: int) -> None:
        a = layer.self_attn
        a.num_key_value_heads = num_kv_heads
        a.num_key_value_groups = num_heads // num_kv_heads
        a.config = LayerConfig(shared_config(a.config), num_attention_heads=num_heads,
                               num_key_value_heads=num_kv_heads)
