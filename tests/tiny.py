"""Tiny, deliberately odd-sized random models of every supported family (transformers' habit)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM

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


def calib_ids(n: int = 4, seqlen: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (n, seqlen), generator=g)


def final_state_distortion(model, ids: torch.Tensor, ref: torch.Tensor | None = None) -> float | torch.Tensor:
    """``|h - ref|^2 / |ref|^2`` of the last hidden states on ``ids``; without ``ref``, the states themselves."""
    with torch.no_grad():
        h = model(ids, output_hidden_states=True).hidden_states[-1]
    return h if ref is None else float((h - ref).pow(2).sum() / ref.pow(2).sum())
