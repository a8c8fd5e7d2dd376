"""Write a tiny model as a float32 GGUF file the way llama.cpp's converter lays it out, so tests
can check that transformers' GGUF reader (and StructPrune's ``load_model``) gives it back.

Only what transformers' reader maps back is written (``transformers.integrations.ggml.
GGUF_CONFIG_MAPPING``): shapes, rope base, norms' epsilon, sliding window. Config fields
GGUF does not carry (Gemma's ``query_pre_attn_scalar``, soft-capping, layer pattern; Qwen3's
``head_dim``; Qwen2-MoE's expert and shared-expert widths; Phi-3's and Mistral's sliding
window) come back as transformers' defaults, so the factories here use those defaults.

llama.cpp's layouts: Mistral is the ``llama`` architecture (q/k rows permuted) with "mistral"
in ``general.name`` (how transformers tells them apart); Phi-3 keeps its fused ``attn_qkv`` and
``ffn_up`` (gate rows then up rows); Qwen2-MoE stores each layer's experts as 3D tensors
``ffn_gate_exps`` / ``ffn_up_exps`` ``[E, n, d]`` and ``ffn_down_exps`` ``[E, d, n]`` (transformers'
in-memory ``gate_up_proj`` split in two), the shared expert as ``*_shexp``, and its gate as
``ffn_gate_inp_shexp``.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import torch
from tiny import VOCAB, _init
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

# model_type -> (GGUF architecture, llama.cpp permutes q/k rows, norms stored as 1 + weight)
LAYOUT = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True, False),
    "qwen3": (gguf.MODEL_ARCH.QWEN3, False, False),
    "gemma2": (gguf.MODEL_ARCH.GEMMA2, False, True),
    "gemma3_text": (gguf.MODEL_ARCH.GEMMA3, False, True),
    "mistral": (gguf.MODEL_ARCH.LLAMA, True, False),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False, False),
    "phi3": (gguf.MODEL_ARCH.PHI3, False, False),
    "qwen2_moe": (gguf.MODEL_ARCH.QWEN2MOE, False, False),
    # llama.cpp writes Mixtral as the llama architecture with expert tensors; transformers (5.17 to
    # 5.24) reads that as LlamaForCausalLM and leaves its MLPs unfilled: load_model must refuse it.
    "mixtral": (gguf.MODEL_ARCH.LLAMA, True, False),
}
TOKENS = 90  # a byte-free toy vocabulary, fewer tokens than the model's embedding rows


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    # llama.cpp interleaves the two rotary halves of each q/k head; transformers undoes it.
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: Path, name: str | None = None) -> Path:
    """Write ``model`` (one of :data:`LAYOUT`'s families) and a toy tokenizer to ``path``.

    ``name`` is the file's ``general.name`` (default ``tiny-<model_type>``, as a converted model's
    own name: transformers reads a llama-architecture file as Mistral only when it is exactly
    "mistral", see tests/test_families.py)."""
    c = model.config
    arch, permute, plus_one = LAYOUT[c.model_type]
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    # transformers reads a llama-architecture file as Mistral only if a general.name is "mistral"
    # (it tests `"mistral" in` the list of names); other names load as LLaMA.
    w.add_name(name or f"tiny-{c.model_type}")
    w.add_context_length(c.max_position_embeddings)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_embedding_length(c.hidden_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    if c.model_type == "mixtral":
        w.add_expert_count(c.num_local_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
    if c.model_type == "qwen2_moe":
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
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
    w.add_pad_token_id(0)
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    for key, t in _llama_cpp_tensors(model):
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


def _llama_cpp_tensors(model):
    """``(name, tensor)`` of the state dict with 3D experts split as llama.cpp stores them: the
    in-memory ``experts.gate_up_proj`` ``[E, 2n, d]`` becomes ``experts.gate_proj`` and
    ``experts.up_proj`` ``[E, n, d]`` (``down_proj`` ``[E, d, n]`` is stored as it is)."""
    for key, t in model.state_dict().items():
        if key.endswith("mlp.experts.gate_up_proj"):
            if getattr(model.get_submodule(key.rsplit(".", 1)[0]), "is_transposed", False):
                raise NotImplementedError("transposed experts")
            n = t.shape[1] // 2
            yield key.replace("gate_up_proj", "gate_proj.weight"), t[:, :n]
            yield key.replace("gate_up_proj", "up_proj.weight"), t[:, n:]
        elif key.endswith("mlp.experts.down_proj"):
            yield key + ".weight", t
        elif key.endswith("mlp.shared_expert_gate.weight"):
            yield key, t.reshape(-1)  # llama.cpp's ffn_gate_inp_shexp is one vector of the hidden size
        else:
            yield key, t


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


def gguf_mistral(seed: int = 0):
    torch.manual_seed(seed)  # sliding_window: MistralConfig's default (GGUF does not carry it), > the tests' windows
    return _init(MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=False)))


def gguf_qwen2(seed: int = 0):
    torch.manual_seed(seed)  # q/k/v biases; head_dim = hidden / heads (GGUF gives no other)
    return _init(Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, max_position_embeddings=128, tie_word_embeddings=False)))


def gguf_phi3(seed: int = 0):
    # Fused qkv (6 heads / 2 KV heads of 8) and gate_up (37 channels). 128 embeddings: transformers'
    # Phi-3 GGUF tokenizer converter adds Phi-3's dozen special tokens (<|assistant|>, ...) to the
    # file's vocabulary (5.17), as the real model's 32064 embeddings leave room for.
    torch.manual_seed(seed)
    return _init(Phi3ForCausalLM(Phi3Config(
        vocab_size=128, hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False)))


def gguf_qwen2_moe(seed: int = 0):
    """3 experts (2 per token) and a shared expert at Qwen2MoeConfig's default widths (1408 and 5632):
    transformers' GGUF reader does not map llama.cpp's expert widths, so only the defaults survive."""
    torch.manual_seed(seed)
    return _init(Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, max_position_embeddings=128, num_experts=3, num_experts_per_tok=2,
        tie_word_embeddings=False)))


GGUF_FAMILIES = {"llama": gguf_llama, "qwen3": gguf_qwen3, "gemma2": gguf_gemma2, "gemma3_text": gguf_gemma3_text,
                 "mistral": gguf_mistral, "qwen2": gguf_qwen2, "phi3": gguf_phi3, "qwen2_moe": gguf_qwen2_moe}
