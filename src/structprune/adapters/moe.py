"""Mixture-of-experts families: Mixtral and Qwen2-MoE (attention as Mistral / Qwen2).

Each routed expert's MLP channels are structures (an :class:`ExpertPart` per expert);
Qwen2-MoE's shared expert is one more part. The router, the shared expert's gate and the
number of experts are never touched.

transformers 5.x stores the experts of a layer as one module with 3D parameters
(``gate_up_proj`` ``[E, 2n, d]``, ``down_proj`` ``[E, d, n]``, or transposed), which its
fused expert kernels (``grouped_mm``, ``batched_mm``) need to be rectangular. So the routed
experts of a layer keep the *same number* of channels (``tied_parts``), each expert
choosing its own channels; layers may differ, and the shared expert has its own width.

The experts' inputs are not ``nn.Linear`` calls, so :meth:`MoEAdapter.register_mlp_capture`
hooks the experts module (it receives the hidden states, each token's experts and routing
weights) and recomputes each expert's channel activations on the tokens routed to it,
times the routing weight, exactly as the forward weights them; the shared expert's are
times its sigmoid gate. A removed channel then contributes nothing, so the usual
``W @ z`` statistics hold per part.
"""

from __future__ import annotations

import torch
from torch import nn

from .llama import LlamaAdapter
from .parts import LinearMLPPart, MLPPart


def _is_moe(mlp: nn.Module) -> bool:
    return hasattr(mlp, "experts")


class ExpertPart(MLPPart):
    """Expert ``e`` of a 3D experts module (concatenated gate/up layout, optionally transposed)."""

    bias_ok = False  # the experts module has no output bias to hold a refit's constant

    def __init__(self, experts: nn.Module, e: int):
        if not getattr(experts, "is_concatenated", True) or getattr(experts, "has_bias", False):
            raise NotImplementedError("only experts with concatenated gate/up rows and no biases are supported")
        self.experts, self.e = experts, e
        self.transposed = bool(getattr(experts, "is_transposed", False))

    @property
    def size(self) -> int:
        return self.experts.down_proj.shape[2 if not self.transposed else 1]

    def _gate_up(self) -> torch.Tensor:  # [2n, d]
        w = self.experts.gate_up_proj[self.e]
        return w.T if self.transposed else w

    def in_weights(self):
        w, n = self._gate_up(), self.size
        return [w[:n], w[n:]]

    def out_weight(self):
        w = self.experts.down_proj[self.e]
        return w.T if self.transposed else w

    def out_parameter(self):
        return self.experts.down_proj

    def out_view(self, t):
        return t[self.e].T if self.transposed else t[self.e]

    def keep(self, idx):
        raise RuntimeError("experts share one 3D tensor: cut them together (MoEAdapter.cut_mlp)")

    @torch.no_grad()
    def set_output(self, weight, bias):
        if bias is not None:
            raise ValueError("an expert's output projection cannot hold a bias")
        self.out_weight().copy_(weight.to(self.experts.down_proj.dtype))


class GatedSharedPart(LinearMLPPart):
    """Qwen2-MoE's shared expert: its output is scaled per token by ``sigmoid(shared_expert_gate(x))``,
    so a bias on its output projection would not be a constant: no bias refit."""

    bias_ok = False


@torch.no_grad()
def cut_experts(experts: nn.Module, keeps: list[torch.Tensor]) -> None:
    """Keep channels ``keeps[e]`` of every expert (the same count in each), in place."""
    k = {len(x) for x in keeps}
    if len(k) != 1:
        raise ValueError(f"experts of a layer must keep the same number of channels, got {[len(x) for x in keeps]}")
    k = k.pop()
    t = bool(getattr(experts, "is_transposed", False))
    gu, down = experts.gate_up_proj, experts.down_proj
    n = down.shape[1 if t else 2]
    dev = gu.device
    rows = [torch.cat([x, n + x]).to(dev, torch.long) for x in keeps]
    gu_new = torch.stack([gu[e].index_select(1 if t else 0, r) for e, r in enumerate(rows)])
    down_new = torch.stack([down[e].index_select(0 if t else 1, x.to(dev, torch.long)) for e, x in enumerate(keeps)])
    experts.gate_up_proj = nn.Parameter(gu_new.contiguous(), requires_grad=gu.requires_grad)
    experts.down_proj = nn.Parameter(down_new.contiguous(), requires_grad=down.requires_grad)
    if hasattr(experts, "intermediate_dim"):
        experts.intermediate_dim = k


class MoEAdapter(LlamaAdapter):
    """Mixtral / Qwen2-MoE: LLaMA-style attention; MLP = routed experts (+ a shared expert)."""

    model_types = ("mixtral", "qwen2_moe")
    # transformers' default experts kernel (grouped_mm) needs rows of 16 bytes: 8 channels in
    # bfloat16/float16, 4 in float32; widths of 8k run everywhere.
    tied_multiple = 8

    def mlp_parts(self, layer):
        mlp = layer.mlp
        if not _is_moe(mlp):  # Qwen2-MoE's dense layers (mlp_only_layers)
            return super().mlp_parts(layer)
        parts: list[MLPPart] = [ExpertPart(mlp.experts, e) for e in range(self.num_experts(layer))]
        shared = getattr(mlp, "shared_expert", None)
        if shared is not None:
            parts.append(GatedSharedPart([(shared.gate_proj, [0]), (shared.up_proj, [0])], shared.down_proj))
        return parts

    def num_experts(self, layer) -> int:
        return layer.mlp.experts.gate_up_proj.shape[0]

    def tied_parts(self, layer) -> int:
        return self.num_experts(layer) if _is_moe(layer.mlp) else 0

    def mlp_linears(self, layer):
        if _is_moe(layer.mlp):
            raise TypeError("an MoE layer's experts are not linear layers: use mlp_parts")
        return super().mlp_linears(layer)

    def mlp_output_module(self, layer):
        return layer.mlp if _is_moe(layer.mlp) else super().mlp_output_module(layer)

    def prunable_linears(self, layer):
        mlp = layer.mlp
        if not _is_moe(mlp):
            return super().prunable_linears(layer)
        qkv, o = self.attn_linears(layer)
        shared = getattr(mlp, "shared_expert", None)
        return [*qkv, o, mlp.experts, *([shared] if shared is not None else [])]

    def cut_mlp(self, layer, keeps):
        if not _is_moe(layer.mlp):
            return super().cut_mlp(layer, keeps)
        E = self.num_experts(layer)
        cut_experts(layer.mlp.experts, list(keeps[:E]))
        if len(keeps) > E:
            self.mlp_parts(layer)[E].keep(keeps[E])

    def register_mlp_capture(self, layer, emit):
        mlp = layer.mlp
        if not _is_moe(mlp):
            return super().register_mlp_capture(layer, emit)
        E = self.num_experts(layer)

        def experts_hook(module, args, kwargs):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            vals = list(args) + [kwargs[k] for k in names[len(args):]]
            x, idx, weights = vals[:3]
            x = x.detach().reshape(-1, x.shape[-1]).float()
            for e, part in enumerate(self.mlp_parts(layer)[:E]):
                tok, pos = torch.where(idx == e)
                if tok.numel() == 0:
                    emit(e, z=x.new_zeros(0, part.size), count=x.shape[0])
                    continue
                xe = x[tok]
                gate, up = (w.float() for w in part.in_weights())
                h = module.act_fn(xe @ gate.T) * (xe @ up.T)
                emit(e, z=h * weights[tok, pos].float()[:, None], x=xe, count=x.shape[0])

        def shared_hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            s = module.shared_expert
            h = s.act_fn(s.gate_proj(x)) * s.up_proj(x)
            emit(E, z=(torch.sigmoid(module.shared_expert_gate(x)) * h).float(), x=x.float())

        handles = [mlp.experts.register_forward_pre_hook(experts_hook, with_kwargs=True)]
        if getattr(mlp, "shared_expert", None) is not None:
            handles.append(mlp.register_forward_pre_hook(shared_hook))
        return handles
