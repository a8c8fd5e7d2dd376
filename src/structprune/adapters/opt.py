"""OPT: multi-head attention with biases, ReLU MLP (fc1 -> relu -> fc2)."""

from __future__ import annotations

from torch import nn

from .base import Adapter, AttentionShape


class OPTAdapter(Adapter):
    """Decoder layers at ``model.model.decoder.layers``.

    OPT's attention reshapes with ``self.num_heads``: slicing q/k/v/out_proj without
    updating it still runs but gives wrong logits, so :meth:`set_attention_heads`
    must follow every cut (pitfalls.md).
    """

    model_types = ("opt",)

    def layers(self) -> nn.ModuleList:
        return self.model.model.decoder.layers

    def pre_layer_modules(self) -> list[nn.Module]:
        dec = self.model.model.decoder
        return [m for m in (dec.embed_tokens, dec.embed_positions, dec.project_in) if m is not None]

    def head_modules(self) -> list[nn.Module]:
        dec = self.model.model.decoder
        return [m for m in (dec.final_layer_norm, dec.project_out, self.model.lm_head) if m is not None]

    def attn_linears(self, layer):
        a = layer.self_attn
        return [a.q_proj, a.k_proj, a.v_proj], a.out_proj

    def mlp_linears(self, layer):
        return [layer.fc1], layer.fc2

    def mlp_activation(self, layer):
        return layer.activation_fn

    def attention_shape(self, layer) -> AttentionShape:
        a = layer.self_attn
        dh = a.head_dim
        n = a.q_proj.out_features // dh
        return AttentionShape(
            num_heads=n, num_kv_heads=n, head_dim=dh, hidden_size=a.out_proj.out_features,
            qkv_bias=a.q_proj.bias is not None,
        )

    def set_attention_heads(self, layer, num_heads: int, num_kv_heads: int) -> None:
        assert num_heads == num_kv_heads, "OPT has no grouped-query attention"
        a = layer.self_attn
        a.num_heads = num_heads
        a.embed_dim = num_heads * a.head_dim
