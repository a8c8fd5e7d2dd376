"""Structurally pruned LLaMA / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 / OPT models with per-layer widths.

(Gemma 3 both as the text model, ``Gemma3ForCausalLM``, and as the multimodal
``Gemma3ForConditionalGeneration``, whose language model is resized and whose vision
tower and projector are the stock ones; its per-layer lists sit in the top-level config.)

This file is copied next to the weights of every model StructPrune exports with
non-uniform widths, and ``config.json`` points at it through ``auto_map``, so

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

works where StructPrune is not installed. It must therefore import only torch and
transformers.

Each model is the stock transformers model, built at the dense width and then
resized layer by layer to the widths in the config (``layer_num_heads``,
``layer_num_kv_heads``, ``layer_intermediate_size``, and whether each layer's
attention and MLP output projections have a bias, ``layer_o_bias`` and
``layer_mlp_out_bias``: refitting with bias compensation adds one). Reusing the
stock forward (instead of a copy of it) keeps this file small and lets it follow
transformers' attention kernels and caches; the stock forward reads every width
from the projections' shapes except the attention bookkeeping set in ``_resize``.
Under ``from_pretrained`` the model is built on the meta device, so the dense
build costs no memory.
"""

from __future__ import annotations

from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

PER_LAYER_KEYS = ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_size", "layer_o_bias",
                  "layer_mlp_out_bias")


def _new_linear(in_features: int, out_features: int, bias: bool, like: nn.Linear) -> nn.Linear:
    # Same device and dtype as the module it replaces (meta under from_pretrained).
    return nn.Linear(in_features, out_features, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


def _per_layer(config, num_layers: int) -> list[tuple[int, int, int, bool, bool]]:
    """The per-layer widths of ``config``, checked (ValueError says what is wrong)."""
    lists = []
    for key in PER_LAYER_KEYS:
        value = getattr(config, key, None)
        if not isinstance(value, (list, tuple)) or len(value) != num_layers:
            raise ValueError(f"config.{key} must list one value per decoder layer ({num_layers}), got {value!r}")
        lists.append(list(value))
    rows = list(zip(*lists))
    for i, (heads, kv, inter, _, _) in enumerate(rows):
        if not (isinstance(heads, int) and isinstance(kv, int) and isinstance(inter, int)):
            raise ValueError(f"layer {i}: widths must be integers, got {heads!r}, {kv!r}, {inter!r}")
        if heads < 1 or kv < 1 or inter < 1 or heads % kv:
            raise ValueError(f"layer {i}: {heads} heads / {kv} KV heads / {inter} MLP channels is not a valid layer")
    return rows


def _resize_llama_layers(model) -> None:
    """Resize every decoder layer of a LLaMA-like model (LLaMA, Mistral, Qwen2/3, Gemma 2/3) to its config
    widths. Qwen3's and Gemma 3's q/k norms span one head (``head_dim``) and stay as built."""
    _resize_llama_decoder(model.model.layers, model.config, model.config.hidden_size)


def _resize_gqa_attention(attn, hidden: int, heads: int, kv: int, o_bias: bool) -> None:
    """Give a LLaMA-like attention ``heads`` query heads in ``kv`` KV groups (and an o bias if a refit added one)."""
    dh = attn.head_dim
    qkv_bias = attn.q_proj.bias is not None  # the family's own layout (Qwen2: q/k/v biases)
    attn.q_proj = _new_linear(hidden, heads * dh, qkv_bias, attn.q_proj)
    attn.k_proj = _new_linear(hidden, kv * dh, qkv_bias, attn.k_proj)
    attn.v_proj = _new_linear(hidden, kv * dh, qkv_bias, attn.v_proj)
    attn.o_proj = _new_linear(heads * dh, hidden, o_bias, attn.o_proj)
    # eager and sdpa attention repeat K/V by this factor; nothing else reads the head counts.
    attn.num_key_value_groups = heads // kv


def _resize_llama_decoder(layers, config, hidden: int) -> None:
    """Resize LLaMA-like decoder ``layers`` to the per-layer widths listed in ``config``."""
    for layer, (heads, kv, inter, o_bias, out_bias) in zip(layers, _per_layer(config, len(layers))):
        _resize_gqa_attention(layer.self_attn, hidden, heads, kv, bool(o_bias))
        _resize_gated_mlp(layer.mlp, hidden, inter, bool(out_bias))


def _resize_opt_layers(model) -> None:
    """Resize every OPT decoder layer to its config widths (OPT has no grouped-query attention)."""
    config = model.config
    hidden = config.hidden_size
    layers = model.model.decoder.layers
    for layer, (heads, kv, inter, o_bias, out_bias) in zip(layers, _per_layer(config, len(layers))):
        if heads != kv:
            raise ValueError(f"OPT layers have as many KV heads as heads, got {heads} and {kv}")
        attn = layer.self_attn
        dh = attn.head_dim
        qkv_bias = attn.q_proj.bias is not None
        attn.q_proj = _new_linear(hidden, heads * dh, qkv_bias, attn.q_proj)
        attn.k_proj = _new_linear(hidden, heads * dh, qkv_bias, attn.k_proj)
        attn.v_proj = _new_linear(hidden, heads * dh, qkv_bias, attn.v_proj)
        attn.out_proj = _new_linear(heads * dh, hidden, bool(o_bias), attn.out_proj)
        # OPT's attention reshapes with num_heads: without this the logits are silently wrong.
        attn.num_heads = heads
        attn.embed_dim = heads * dh
        in_bias = layer.fc1.bias is not None
        layer.fc1 = _new_linear(hidden, inter, in_bias, layer.fc1)
        layer.fc2 = _new_linear(inter, hidden, bool(out_bias), layer.fc2)


class _PerLayerConfig:
    """Reads a config.json whose ``model_type`` names the base family (so that tokenizers and
    ``AutoConfig`` read it without remote code) as this per-layer variant, without the
    "model of type llama to instantiate a model of type structprune_llama" warning."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        config_dict["model_type"] = cls.model_type
        return cls.from_dict(config_dict, **kwargs)


# Config classes: the stock ones plus the per-layer lists (stored as ordinary extra
# attributes, which every transformers 5.x config serialises, so no fields are declared).
# base model_type -> (config class, model class); used by StructPrune's writer and loader.
CLASSES = {}


def _family(key: str, config_base, model_base, resize, what: str = "decoder layers") -> None:
    """Define ``StructPrune<Config>`` and ``StructPrune<Model>`` for family ``key`` at module level (the
    names ``auto_map`` points at): the stock classes, with the model resized by ``resize(model)`` to the
    per-layer widths in its config after the stock build."""
    config_cls = type(f"StructPrune{config_base.__name__}", (_PerLayerConfig, config_base), {
        "__module__": __name__, "model_type": f"structprune_{key}",
        "__doc__": f"{config_base.__name__} with per-layer widths (see the module docstring)."})

    def __init__(self, config):
        model_base.__init__(self, config)
        resize(self)

    model_cls = type(f"StructPrune{model_base.__name__}", (model_base,), {
        "__module__": __name__, "config_class": config_cls, "__init__": __init__,
        "__doc__": f"{model_base.__name__} whose {what} have the widths listed in the config."})
    globals()[config_cls.__name__] = config_cls
    globals()[model_cls.__name__] = model_cls
    CLASSES[key] = (config_cls, model_cls)


def _resize_gemma3_language_model(model) -> None:
    # The vision tower and multimodal projector are the stock ones; the per-layer lists are top-level
    # config attributes, ``text_config`` keeps the dense counts and the pruned ``head_dim``.
    _resize_llama_decoder(model.model.language_model.layers, model.config, model.config.text_config.hidden_size)


_family("llama", LlamaConfig, LlamaForCausalLM, _resize_llama_layers)
_family("mistral", MistralConfig, MistralForCausalLM, _resize_llama_layers)
_family("qwen2", Qwen2Config, Qwen2ForCausalLM, _resize_llama_layers)
_family("qwen3", Qwen3Config, Qwen3ForCausalLM, _resize_llama_layers)
_family("gemma2", Gemma2Config, Gemma2ForCausalLM, _resize_llama_layers)
_family("gemma3_text", Gemma3TextConfig, Gemma3ForCausalLM, _resize_llama_layers)
_family("gemma3", Gemma3Config, Gemma3ForConditionalGeneration, _resize_gemma3_language_model,
        "language model's decoder layers")
_family("opt", OPTConfig, OPTForCausalLM, _resize_opt_layers)


# -- fused (Phi-3) and mixture-of-experts (Mixtral, Qwen2-MoE) families ----------------------------
# ``layer_intermediate_size`` is the width of each routed expert of a layer (all experts of a layer
# share one 3D tensor), ``layer_shared_intermediate_size`` Qwen2-MoE's shared expert's.
import torch  # noqa: E402
from transformers import (  # noqa: E402
    MixtralConfig,
    MixtralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)


class _LayerConfig:
    """A read-through view of the shared config with one layer's head counts (Phi-3's attention
    splits its fused qkv output at ``self.config.num_attention_heads * head_dim``)."""

    def __init__(self, base, **overrides):
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", dict(overrides))

    def __getattr__(self, name):
        if name.startswith("__"):  # copy/pickle protocol lookups: default behaviour (state = __dict__)
            raise AttributeError(name)
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name, value):
        setattr(self._base, name, value)


def _resize_phi3_layers(model) -> None:
    """Resize every Phi-3 layer: fused qkv_proj rows ``(heads + 2 kv) * head_dim``, gate_up_proj ``2 * inter``."""
    config = model.config
    hidden = config.hidden_size
    for layer, (heads, kv, inter, o_bias, out_bias) in zip(model.model.layers,
                                                           _per_layer(config, len(model.model.layers))):
        attn = layer.self_attn
        dh = attn.head_dim
        attn.qkv_proj = _new_linear(hidden, (heads + 2 * kv) * dh, attn.qkv_proj.bias is not None, attn.qkv_proj)
        attn.o_proj = _new_linear(heads * dh, hidden, bool(o_bias), attn.o_proj)
        attn.num_key_value_heads = kv
        attn.num_key_value_groups = heads // kv
        attn.config = _LayerConfig(config, num_attention_heads=heads, num_key_value_heads=kv)
        mlp = layer.mlp
        mlp.gate_up_proj = _new_linear(hidden, 2 * inter, mlp.gate_up_proj.bias is not None, mlp.gate_up_proj)
        mlp.down_proj = _new_linear(inter, hidden, bool(out_bias), mlp.down_proj)


def _new_expert_params(experts, inter: int) -> None:
    """Replace a 3D experts module's parameters with ones of ``inter`` channels per expert."""
    gu, down = experts.gate_up_proj, experts.down_proj
    t = bool(getattr(experts, "is_transposed", False))
    E, hidden = gu.shape[0], down.shape[2 if t else 1]
    kw = dict(device=gu.device, dtype=gu.dtype)
    experts.gate_up_proj = nn.Parameter(torch.empty((E, hidden, 2 * inter) if t else (E, 2 * inter, hidden), **kw))
    experts.down_proj = nn.Parameter(torch.empty((E, inter, hidden) if t else (E, hidden, inter), **kw))
    if hasattr(experts, "intermediate_dim"):
        experts.intermediate_dim = inter


def _resize_gated_mlp(mlp, hidden: int, inter: int, out_bias: bool) -> None:
    in_bias = mlp.gate_proj.bias is not None
    mlp.gate_proj = _new_linear(hidden, inter, in_bias, mlp.gate_proj)
    mlp.up_proj = _new_linear(hidden, inter, in_bias, mlp.up_proj)
    mlp.down_proj = _new_linear(inter, hidden, out_bias, mlp.down_proj)
    mlp.intermediate_size = inter


def _resize_moe_layers(model) -> None:
    """Resize every Mixtral / Qwen2-MoE layer: GQA attention as LLaMA, every expert to the layer's width."""
    config = model.config
    hidden = config.hidden_size
    layers = model.model.layers
    shared = getattr(config, "layer_shared_intermediate_size", None) or [0] * len(layers)
    for layer, (heads, kv, inter, o_bias, out_bias), s in zip(layers, _per_layer(config, len(layers)), shared):
        _resize_gqa_attention(layer.self_attn, hidden, heads, kv, bool(o_bias))
        mlp = layer.mlp
        if not hasattr(mlp, "experts"):  # Qwen2-MoE's dense layers
            _resize_gated_mlp(mlp, hidden, inter, bool(out_bias))
            continue
        _new_expert_params(mlp.experts, inter)
        if getattr(mlp, "shared_expert", None) is not None:
            _resize_gated_mlp(mlp.shared_expert, hidden, s, False)


_family("phi3", Phi3Config, Phi3ForCausalLM, _resize_phi3_layers)
_family("mixtral", MixtralConfig, MixtralForCausalLM, _resize_moe_layers, "decoder layers (and experts)")
_family("qwen2_moe", Qwen2MoeConfig, Qwen2MoeForCausalLM, _resize_moe_layers, "decoder layers (and experts)")
