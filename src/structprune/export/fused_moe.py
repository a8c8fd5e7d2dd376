"""Export fields of the fused (Phi-3) and mixture-of-experts (Mixtral, Qwen2-MoE) families.

Uniform widths: the family's stock config, with the kept heads, ``head_dim`` and widths
(Mixtral: ``intermediate_size`` per expert; Qwen2-MoE: ``moe_intermediate_size`` and
``shared_expert_intermediate_size``). The stock layers have no bias on ``o_proj`` or
``down_proj``, so a model a refit gave such a bias is written with per-layer modeling code.
Per-layer widths: the per-layer lists of ``modeling_structprune.py``, where
``layer_intermediate_size`` is the width of every routed expert of the layer and
``layer_shared_intermediate_size`` (Qwen2-MoE) the shared expert's (0: none).
"""

from __future__ import annotations

FAMILIES = ("phi3", "mixtral", "qwen2_moe")
#: per-layer config keys beyond modeling_structprune.PER_LAYER_KEYS
EXTRA_PER_LAYER_KEYS = ("layer_shared_intermediate_size",)


def _widths(config, layout: dict) -> tuple[int, int]:
    """``(routed expert width or dense MLP width, shared expert width or 0)`` of one layer."""
    parts = layout.get("mlp_parts")
    if not parts:
        return layout["mlp"], 0
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or len(parts)
    return parts[0], (parts[-1] if len(parts) > experts else 0)


def stock_fields(config, base: str, first: dict) -> tuple[dict | None, str]:
    """Stock config fields for a model whose every layer has layout ``first``, or ``(None, why not)``."""
    if first["o_bias"] or first["mlp_out_bias"]:
        return None, f"stock {base} has no o_proj/down_proj bias (a refit added one)"
    d = {"num_attention_heads": first["heads"], "num_key_value_heads": first["kv_heads"],
         "head_dim": first["head_dim"]}
    inter, shared = _widths(config, first)
    if base == "qwen2_moe":
        if not first.get("mlp_parts"):
            return None, "qwen2_moe layers without experts: written per layer"
        d.update(moe_intermediate_size=inter, shared_expert_intermediate_size=shared)
    else:
        d["intermediate_size"] = inter
    return d, ""


def per_layer_fields(config, base: str, lay: list[dict]) -> dict:
    """The per-layer lists that replace the dense-family ones for ``base``."""
    widths = [_widths(config, l) for l in lay]
    d = {"layer_intermediate_size": [w[0] for w in widths]}
    if base == "qwen2_moe":
        d["layer_shared_intermediate_size"] = [w[1] for w in widths]
    return d


def save_kwargs(model, base: str) -> dict:
    """``save_pretrained`` options: MoE weights stay in the model's own 3D layout.

    transformers 5.x converts 3D experts back to the per-expert Hub layout on save by default;
    the file would then hold other names and shapes than the pruned model (and the disk path's
    shards), so :func:`structprune.load_pruned` could not verify them, and a per-expert layout
    is what the 3D loader converts from anyway."""
    import inspect

    if base in ("mixtral", "qwen2_moe") and "save_original_format" in inspect.signature(model.save_pretrained).parameters:
        return {"save_original_format": False}
    return {}
