"""Tiny, deliberately odd-sized random models of every supported family (transformers' habit)."""

from __future__ import annotations

import torch
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

VOCAB = 101


def tiny_llama(layers: int = 3, seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=37, num_hidden_layers=layers,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                      tie_word_embeddings=False, **kw)
    return _init(LlamaForCausalLM(cfg))


def tiny_qwen2(layers: int = 3, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=37, num_hidden_layers=layers,
                      num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return _init(Qwen2ForCausalLM(cfg))


def tiny_opt(layers: int = 3, seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=37, num_hidden_layers=layers,
                    num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                    pad_token_id=1)
    return _init(OPTForCausalLM(cfg))


def _init(model):
    # Larger-than-default random weights (and random biases/norms) so that every structure
    # matters and a wrong cut shows up as a large logit difference.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.15)
    return model.eval()


FACTORIES = {"llama-gqa": tiny_llama, "qwen2": tiny_qwen2, "opt": tiny_opt}

# -- the family registry of tests/test_families.py --------------------------------------------
# Each factory takes ``layers`` and ``seed`` and returns an eval-mode model with random,
# larger-than-default weights; sizes are odd on purpose (hidden 48, intermediate 37, head_dim
# not hidden / heads) so a cut that confuses two dimensions fails.
LLAMA3_VOCAB = 128256  # Llama 3's real vocabulary: 128k rows of embeddings (tied) and logits


def tiny_mistral(layers: int = 3, seed: int = 0) -> MistralForCausalLM:
    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=37, num_hidden_layers=layers,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                        sliding_window=None, tie_word_embeddings=False)
    return _init(MistralForCausalLM(cfg))


def _llama3_rope(original: int = 32) -> dict:
    """Llama 3.1's rope scaling with a short original context, so that it changes the tiny model's rotary."""
    return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": original}


def tiny_llama3(layers: int = 3, seed: int = 0, tied: bool = False, vocab: int = VOCAB) -> LlamaForCausalLM:
    """Llama 3.x: rope scaling ``llama3``, 8 heads / 2 KV heads, untied (3.1 8B) or tied (3.2 1B/3B)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=37, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=6, max_position_embeddings=128,
                      rope_parameters=_llama3_rope(), tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    return _init(LlamaForCausalLM(cfg))


def tiny_llama3_tied(layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    """Llama 3.2-style: the 128k vocabulary and the LM head tied to the embeddings."""
    return tiny_llama3(layers, seed, tied=True, vocab=LLAMA3_VOCAB)


def tiny_qwen3(layers: int = 3, seed: int = 0) -> Qwen3ForCausalLM:
    """Qwen3: explicit head_dim (6 heads x 16 = 96, not the hidden 48), per-head q/k RMSNorm."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=37, num_hidden_layers=layers,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return _init(Qwen3ForCausalLM(cfg))


def _alternating(layers: int) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]


def tiny_gemma2(layers: int = 3, seed: int = 0) -> Gemma2ForCausalLM:
    """Gemma 2: tied, attention and final soft-capping, sliding window 5 (< the tests' windows),
    query_pre_attn_scalar unlike head_dim, GeGLU, 6 heads / 2 KV heads."""
    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=37, num_hidden_layers=layers,
                       num_attention_heads=6, num_key_value_heads=2, head_dim=12, max_position_embeddings=128,
                       sliding_window=5, layer_types=_alternating(layers), query_pre_attn_scalar=20,
                       final_logit_softcapping=3.0, attn_logit_softcapping=5.0, pad_token_id=0)
    return _init(Gemma2ForCausalLM(cfg))


def tiny_gemma3_text(layers: int = 3, seed: int = 0) -> Gemma3ForCausalLM:
    """Gemma 3 text (1B-style): one KV head (only query heads prunable), q/k norms, per-type rotary."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=37, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                           sliding_window=5, layer_types=_alternating(layers), query_pre_attn_scalar=24,
                           pad_token_id=0)
    return _init(Gemma3ForCausalLM(cfg))


def tiny_gemma3(layers: int = 3, seed: int = 0):
    """Gemma 3 multimodal (``Gemma3ForConditionalGeneration``, ``model_type`` gemma3) whose text part
    is :func:`tiny_gemma3_text`'s model, weight for weight (one KV head, q/k norms, alternating
    layers), nested under ``model.language_model`` with ``text_config``; a one-layer SigLIP tower
    (16x16 images, 8x8 patches) and the projector (4 tokens per image) are random and kept. The
    image token ids are the config's defaults, outside the tiny vocabulary, so text ids never
    stand for an image."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text_model = tiny_gemma3_text(layers, seed)
    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    cfg = Gemma3Config(text_config=text_model.config.to_dict(), vision_config=vision, mm_tokens_per_image=4)
    torch.manual_seed(seed)
    model = _init(Gemma3ForConditionalGeneration(cfg))
    model.model.language_model.load_state_dict(text_model.model.state_dict())
    model.lm_head.load_state_dict(text_model.lm_head.state_dict())
    return model.eval()


def tiny_phi3(layers: int = 3, seed: int = 0):
    """Phi-3: fused qkv_proj (6 heads / 2 KV heads of 8) and gate_up_proj (intermediate 37)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    cfg = Phi3Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=37, num_hidden_layers=layers,
                     num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                     original_max_position_embeddings=128, sliding_window=None, tie_word_embeddings=False,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _init(Phi3ForCausalLM(cfg))


def tiny_mixtral(layers: int = 3, seed: int = 0):
    """Mixtral: 3 experts of 40 channels (grouped_mm needs 16-byte rows), 2 per token; Mistral
    attention 6 heads / 2 KV heads."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=layers,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                        num_local_experts=3, num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False)
    return _init(MixtralForCausalLM(cfg))


def tiny_qwen2_moe(layers: int = 3, seed: int = 0):
    """Qwen2-MoE: 3 experts of 40 channels (2 per token, unnormalised weights) and a gated shared
    expert of 29; Qwen2 attention (q/k/v biases) 6 heads / 3 KV heads."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=41, moe_intermediate_size=40,
                         shared_expert_intermediate_size=29, num_hidden_layers=layers, num_attention_heads=6,
                         num_key_value_heads=3, max_position_embeddings=128, num_experts=3, num_experts_per_tok=2,
                         norm_topk_prob=False, tie_word_embeddings=False)
    return _init(Qwen2MoeForCausalLM(cfg))


# name -> factory. Another family registers here with one line (its factory beside the others).
FAMILIES = {
    "llama": tiny_llama,
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
    "opt": tiny_opt,
    "llama3": tiny_llama3,
    "llama3-tied-128k": tiny_llama3_tied,
    "qwen3": tiny_qwen3,
    "gemma2": tiny_gemma2,
    "gemma3_text": tiny_gemma3_text,
    "gemma3": tiny_gemma3,
    "phi3": tiny_phi3,
    "mixtral": tiny_mixtral,
    "qwen2_moe": tiny_qwen2_moe,
}


def calib_ids(n: int = 4, seqlen: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (n, seqlen), generator=g)


def final_state_distortion(model, ids: torch.Tensor, ref: torch.Tensor | None = None) -> float | torch.Tensor:
    """``|h - ref|^2 / |ref|^2`` of the last hidden states on ``ids``; without ``ref``, the states themselves."""
    with torch.no_grad():
        h = model(ids, output_hidden_states=True).hidden_states[-1]
    return h if ref is None else float((h - ref).pow(2).sum() / ref.pow(2).sum())
