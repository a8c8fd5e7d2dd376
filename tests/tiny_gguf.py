"""Write a tiny model as a float32 GGUF file the way llama.cpp's converter lays it out, so tests
can check that transformers' GGUF reader (and StructPrune's ``load_model``) gives it back.

Only what transformers' reader maps back is written (``transformers.integrations.ggml.
GGUF_CONFIG_MAPPING``): shapes, rope base, norms' epsilon, sliding window. Config fields
GGUF does not carry (Gemma's ``query_pre_attn_scalar``, soft-capping, layer pattern; Qwen3's
``head_dim``) come back as transformers' defaults, so the factories here use those defaults.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import torch
from tiny import VOCAB, _init
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM)

# model_type -> (GGUF architecture, llama.cpp permutes q/k rows, norms stored as 1 + weight)
LAYOUT = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True, False),
    "qwen3": (gguf.MODEL_ARCH.QWEN3, False, False),
    "gemma2": (gguf.MODEL_ARCH.GEMMA2, False, True),
    "gemma3_text": (gguf.MODEL_ARCH.GEMMA3, False, True),
}
TOKENS = 90  # a byte-free toy vocabulary, fewer tokens than the model's embedding rows


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    # llama.cpp interleaves the two rotary halves of each q/k head; transformers undoes it.
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: Path) -> Path:
    """Write ``model`` (one of :data:`LAYOUT`'s families) and a toy tokenizer to ``path``."""
    c = model.config
    arch, permute, plus_one = LAYOUT[c.model_type]
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_context_length(c.max_position_embeddings)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_embedding_length(c.hidden_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    theta = (c.rope_parameters.get("full_attention", c.rope_parameters) if c.rope_parameters else {})
    w.add_rope_freq_base(float(theta.get("rope_theta", 10000.0)))
    if getattr(c, "sliding_window", None):
        w.add_sliding_window(c.sliding_window)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    # Two merges: transformers 5.17's BPE converters need a merge table, and its GGUF reader
    # turns a one-element array into a plain string.
    w.add_token_list(["a", "b", "ab", "abb"] + [f"<t{i}>" for i in range(4, TOKENS)])
    w.add_token_scores([0.0] * TOKENS)
    w.add_token_types([1] * TOKENS)
    w.add_token_merges(["a b", "ab b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue  # tied: GGUF stores the embeddings once
        base, suffix = key.rsplit(".", 1)
        name = names.get_name(base)
        if name is None:
            raise KeyError(f"no GGUF name for {key}")
        t = t.detach().float().clone()
        if permute and base.endswith("q_proj"):
            t = _permute(t, c.num_attention_heads)
        elif permute and base.endswith("k_proj"):
            t = _permute(t, c.num_key_value_heads)
        if plus_one and base.endswith("norm"):
            t = t + 1
        w.add_tensor(f"{name}.{suffix}", t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# Tiny models whose every config field survives GGUF (transformers' defaults where GGUF is silent).
def gguf_llama(seed: int = 0):
    torch.manual_seed(seed)
    return _init(LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=False)))


def gguf_qwen3(seed: int = 0):
    torch.manual_seed(seed)  # head_dim 128: Qwen3Config's default, which GGUF cannot override
    return _init(Qwen3ForCausalLM(Qwen3Config(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True)))


def gguf_gemma2(seed: int = 0):
    torch.manual_seed(seed)
    return _init(Gemma2ForCausalLM(Gemma2Config(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=5, pad_token_id=0)))


def gguf_gemma3_text(seed: int = 0):
    torch.manual_seed(seed)
    return _init(Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=128, sliding_window=5, pad_token_id=0)))


GGUF_FAMILIES = {"llama": gguf_llama, "qwen3": gguf_qwen3, "gemma2": gguf_gemma2, "gemma3_text": gguf_gemma3_text}
