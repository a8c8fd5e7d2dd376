"""GGUF export for llama.cpp / ollama (export/gguf.py, issue 26).

Without llama.cpp (the default suite): the file's metadata, tensor names, shapes, types and
permutations read back with ``gguf.GGUFReader``, the architecture chosen for each width
layout, the tokenizer keys, and the model card.

With llama-cpp-python (``pip install -e '.[gguf]'``): llama.cpp's logits equal transformers' within
float tolerance for tiny random LLaMA (GQA), Qwen2 (q/k/v biases), Mistral and Llama-3 (rope
scaling) models with odd per-layer widths and refit biases (F32 weights, F32 KV cache), greedy
generations are equal, llama.cpp's tokenizer gives transformers' ids, and on the real SmolLM2
(pruned per layer) the q8_0 file's top-1 disagrees with transformers on WikiText-2 only at near-ties.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from structprune import load_pruned
from structprune.adapters import LayerPlan, get_adapter
from structprune.export import save_pruned
from structprune.export.gguf import export_gguf, pre_tokenizer_name
from structprune.surgery import apply_layer_plan, set_output_projection

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 320  # the toy tokenizer's 300 tokens, then unused rows (written as [PADi] tokens)
TEXT = ["The quick brown fox jumps over the lazy dog. " * 3,
        "Pruning removes whole attention heads and MLP channels, 123 4567!",
        "llama.cpp runs GGUF files; ollama wraps it.\n\nNew paragraph with  two spaces."] * 20
SAMPLE = "The lazy fox prunes 42 heads; llama.cpp runs it.\n\n  Two spaces, then MLP channels!"


@pytest.fixture(scope="module")
def toy_tokenizer():
    """A 300-token byte-level BPE (GPT-2 pre-tokenizer: llama.cpp's ``gpt-2``) trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    return tok


def _init(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.1)
    return model.eval()


def tiny(family: str, layers: int = 4, seed: int = 0):
    """A tiny random model of ``family`` (odd MLP width; head_dim even for RoPE)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=99, num_hidden_layers=layers,
                  max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if family == "qwen2":
        return _init(Qwen2ForCausalLM(Qwen2Config(num_attention_heads=8, num_key_value_heads=2, **common)))
    if family == "mistral":
        return _init(MistralForCausalLM(MistralConfig(num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                                                      sliding_window=None, **common)))
    kw = {}
    if family == "llama3":  # Llama 3.1's rope scaling, with a short original context so that it matters here
        kw = dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 32})
        common["tie_word_embeddings"] = True
    return _init(LlamaForCausalLM(LlamaConfig(num_attention_heads=8, num_key_value_heads=4, head_dim=12, **common,
                                              **kw)))


# (KV groups kept, heads kept per group, MLP channels) per layer: layer 0 down to one head, odd widths.
PLANS = [([1], 1, 37), ([0, 1, 2, 3], None, 99), ([0, 2, 3], 1, 8), ([0, 1], 2, 72)]


def cut(model, plans=PLANS, biases=True):
    """Apply per-layer plans; refit-style o/down biases on layers 0 and 2."""
    adapter = get_adapter(model)
    for i, (layer, (kv, per_group, mlp)) in enumerate(zip(adapter.layers(), plans)):
        s = adapter.attention_shape(layer)
        g = s.group_size
        per_group = per_group or g
        kv = [k for k in kv if k < s.num_kv_heads]
        heads = [k * g + h for k in kv for h in range(per_group)]
        channels = sorted(random.Random(i).sample(range(adapter.mlp_shape(layer).channels), mlp))
        apply_layer_plan(adapter, layer, LayerPlan(heads, kv, channels))
        if biases and i % 2 == 0:
            gen = torch.Generator().manual_seed(i)
            _, o = adapter.attn_linears(layer)
            _, down = adapter.mlp_linears(layer)
            for lin in (o, down):
                set_output_projection(lin, lin.weight, 0.1 * torch.randn(lin.out_features, generator=gen))
    return [adapter.layer_widths(l) for l in adapter.layers()]


def pruned_folder(tmp_path, family, toy_tokenizer, plans=PLANS, biases=True, name="pruned"):
    model = tiny(family)
    widths = cut(model, plans, biases)
    folder = tmp_path / name
    save_pruned(model, toy_tokenizer, folder, report={"method": "test", "model": "toy"})
    return model, widths, folder


def _reader(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    fields = {}
    for k, f in r.fields.items():
        if not f.types:
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY and len(f.types) > 1 and f.types[1] != gguf.GGUFValueType.STRING:
            fields[k] = [int(f.parts[i][0]) if f.parts[i].dtype.kind in "iu" else float(f.parts[i][0]) for i in f.data]
        elif f.types[0] == gguf.GGUFValueType.STRING:
            fields[k] = bytes(f.parts[f.data[0]]).decode()
        elif f.types[0] != gguf.GGUFValueType.ARRAY:
            fields[k] = f.parts[f.data[0]][0].item()
        else:
            fields[k] = len(f.data)  # string arrays: their length
    tensors = {t.name: t for t in r.tensors}
    return fields, tensors


# -- without llama.cpp -------------------------------------------------------------------------------


def test_per_layer_widths_are_written_as_deci_arrays(tmp_path, toy_tokenizer):
    import gguf

    model, widths, folder = pruned_folder(tmp_path, "llama", toy_tokenizer)
    out = tmp_path / "m.gguf"
    r = export_gguf(folder, out, "f32", tokenizer_pre="gpt-2")
    assert r.arch == "deci"
    f, t = _reader(out)
    assert f["general.architecture"] == "deci"
    assert f["deci.attention.head_count"] == [w["heads"] for w in widths] == [1, 8, 3, 4]
    assert f["deci.attention.head_count_kv"] == [w["kv_heads"] for w in widths] == [1, 4, 3, 2]
    assert f["deci.feed_forward_length"] == [w["mlp"] for w in widths] == [37, 99, 8, 72]
    assert f["deci.attention.key_length"] == f["deci.attention.value_length"] == 12
    assert f["deci.rope.dimension_count"] == 12 and f["deci.block_count"] == 4
    assert f["general.file_type"] == 0
    # ggml shapes are the reverse of HF's [out, in]; q/k rows permuted per head with that layer's counts.
    sd = model.state_dict()
    for i, w in enumerate(widths):
        q = t[f"blk.{i}.attn_q.weight"]
        assert list(q.shape) == [64, w["heads"] * 12] and q.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t[f"blk.{i}.ffn_down.weight"].shape) == [w["mlp"], 64]
        want_q = sd[f"model.layers.{i}.self_attn.q_proj.weight"]
        want_q = want_q.reshape(w["heads"], 2, 6, 64).swapaxes(1, 2).reshape(-1, 64)
        assert np.array_equal(np.asarray(q.data).reshape(-1, 64), want_q.numpy())
        assert np.array_equal(np.asarray(t[f"blk.{i}.attn_v.weight"].data).reshape(-1, 64),
                              sd[f"model.layers.{i}.self_attn.v_proj.weight"].numpy())
        assert (f"blk.{i}.attn_output.bias" in t) == (i % 2 == 0) == (f"blk.{i}.ffn_down.bias" in t)
    assert "output.weight" in t and "rope_freqs.weight" not in t
    # tokenizer: gpt2 BPE, one token per embedding row, merges, special ids, chat template
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.tokens"] == VOCAB and f["tokenizer.ggml.merges"] > 0
    assert f["tokenizer.ggml.bos_token_id"] == toy_tokenizer.bos_token_id
    assert f["tokenizer.ggml.eos_token_id"] == toy_tokenizer.eos_token_id
    assert "<|im_start|>" in f["tokenizer.chat_template"]


def test_uniform_widths_keep_the_family_architecture(tmp_path, toy_tokenizer):
    uniform = [([0, 1], 1, 40)] * 4
    _, _, folder = pruned_folder(tmp_path, "llama", toy_tokenizer, uniform, biases=False, name="ll")
    assert export_gguf(folder, tmp_path / "ll.gguf", "f16", tokenizer_pre="gpt-2").arch == "llama"
    f, t = _reader(tmp_path / "ll.gguf")
    assert f["llama.attention.head_count"] == 2 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.feed_forward_length"] == 40 and f["general.file_type"] == 1
    # a dense Qwen2 is qwen2; one with heads removed (q narrower than hidden) is the equivalent llama
    dense = tiny("qwen2")
    save_pruned(dense, toy_tokenizer, tmp_path / "qd")
    assert export_gguf(tmp_path / "qd", tmp_path / "qd.gguf", "f16", tokenizer_pre="gpt-2").arch == "qwen2"
    _, _, qu = pruned_folder(tmp_path, "qwen2", toy_tokenizer, [([0], 2, 40)] * 4, biases=False, name="qu")
    assert export_gguf(qu, tmp_path / "qu.gguf", "f16", tokenizer_pre="gpt-2").arch == "llama"


def test_llama3_rope_scaling_is_the_rope_freqs_tensor(tmp_path, toy_tokenizer):
    _, _, folder = pruned_folder(tmp_path, "llama3", toy_tokenizer)
    export_gguf(folder, tmp_path / "l3.gguf", "f32", tokenizer_pre="gpt-2")
    f, t = _reader(tmp_path / "l3.gguf")
    freqs = np.asarray(t["rope_freqs.weight"].data)
    assert freqs.shape == (6,) and freqs[0] == 1.0 and freqs[-1] == 8.0  # high frequencies kept, low ones x factor
    assert "output.weight" not in t  # tied: llama.cpp reuses token_embd
    assert f["deci.rope.freq_base"] == 500000.0


def test_q8_0_quantizes_rows_of_32_and_keeps_the_rest_f16(tmp_path, toy_tokenizer, caplog):
    import gguf

    _, widths, folder = pruned_folder(tmp_path, "llama", toy_tokenizer)
    with caplog.at_level("WARNING"):
        r = export_gguf(folder, tmp_path / "q.gguf", "q8_0", tokenizer_pre="gpt-2")
    assert "--mlp-multiple 32" in caplog.text
    _, t = _reader(tmp_path / "q.gguf")
    Q = gguf.GGMLQuantizationType
    assert t["blk.0.attn_q.weight"].tensor_type == Q.Q8_0  # rows of 64
    # ffn_down rows are the layer's MLP width: 37, 99 and 8 are not multiples of 32; 72 is not either
    assert {t[f"blk.{i}.ffn_down.weight"].tensor_type for i in range(4)} == {Q.F16}
    assert t["blk.0.attn_norm.weight"].tensor_type == Q.F32
    # and the attention output's rows are heads x head_dim 12: 12, 96, 36, 48 values
    want = {f"blk.{i}.ffn_down.weight" for i in range(4)} | {f"blk.{i}.attn_output.weight" for i in (0, 2, 3)}
    assert set(r.fallbacks) == want
    assert {t[n].tensor_type for n in want} == {Q.F16}
    # dequantized Q8_0 is within the block scale of the original weights
    w = load_pruned(folder).state_dict()["model.layers.1.self_attn.v_proj.weight"].numpy()
    deq = gguf.quants.dequantize(t["blk.1.attn_v.weight"].data, Q.Q8_0).reshape(w.shape)
    assert np.abs(deq - w).max() <= np.abs(w).max() / 127 + 1e-6


def test_pre_tokenizer_hash_of_the_real_smollm2(smollm2_path):
    from transformers import AutoTokenizer

    assert pre_tokenizer_name(AutoTokenizer.from_pretrained(smollm2_path)) == "smollm"


def test_cli_export_writes_the_file_and_names_it(tmp_path, toy_tokenizer, capsys):
    from structprune.cli import main

    _, _, folder = pruned_folder(tmp_path, "qwen2", toy_tokenizer)
    out = tmp_path / "x.gguf"
    assert main(["export", str(folder), "--format", "gguf", "--type", "bf16", "--output", str(out),
                 "--tokenizer-pre", "gpt-2"]) == 0
    said = capsys.readouterr().out
    assert "llama.cpp architecture deci" in said and "0:1h/1kv/37" in said
    f, t = _reader(out)
    assert f["general.file_type"] == 32 and "blk.0.attn_q.bias" in t and "blk.0.attn_output.bias" in t


def test_model_card_in_every_output_folder(tmp_path, toy_tokenizer):
    _, widths, folder = pruned_folder(tmp_path, "llama", toy_tokenizer)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: text-generation" in card and "- structprune" in card
    assert "| 2 | 3 | 3 | 8 |" in card  # layer 2's widths
    assert "trust_remote_code=True" in card and "structprune export" in card


# -- with llama.cpp ----------------------------------------------------------------------------------


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[gguf]')")


def _llama(path, n_ctx=256, **kw):
    llama_cpp = _llama_cpp()
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, n_threads=1,
                           type_k=0, type_v=0, verbose=False, seed=0, **kw)


def _llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "llama3"])
@pytest.mark.parametrize("layout", ["per-layer", "uniform"])
def test_llama_cpp_logits_equal_transformers(family, layout, tmp_path, toy_tokenizer):
    _llama_cpp()
    plans = PLANS if layout == "per-layer" else [([0, 1], 1, 40)] * 4
    _, _, folder = pruned_folder(tmp_path, family, toy_tokenizer, plans, biases=layout == "per-layer")
    r = export_gguf(folder, tmp_path / "m.gguf", "f32", tokenizer_pre="gpt-2")
    assert r.arch == ("deci" if layout == "per-layer" else "llama")
    ref = load_pruned(folder).float().eval()
    ids = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 300, (200,), generator=ids).tolist()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    llm = _llama(tmp_path / "m.gguf")
    got = _llama_cpp_logits(llm, ids)
    diff = np.abs(got - want).max()
    assert diff < 1e-3, f"max |dlogit| {diff:.3g} (logits up to {np.abs(want).max():.3g})"
    assert (got.argmax(-1) == want.argmax(-1)).all()
    # greedy generation: 12 tokens, the same
    prompt = ids[:8]
    hf = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 8:].tolist()
    llm.reset()
    gen = []
    for tok in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        gen.append(tok)
        if len(gen) == 12:
            break
    assert gen == hf


def test_llama_cpp_tokenizer_gives_transformers_ids(tmp_path, toy_tokenizer):
    _llama_cpp()
    _, _, folder = pruned_folder(tmp_path, "llama", toy_tokenizer)
    export_gguf(folder, tmp_path / "m.gguf", "f16", tokenizer_pre="gpt-2")
    llm = _llama(tmp_path / "m.gguf", vocab_only=True)
    for text in [SAMPLE, TEXT[2], " leading space", "<|im_start|>hi<|im_end|>"]:
        want = toy_tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text


def test_q4_k_m_goes_through_llama_cpps_quantizer(tmp_path, toy_tokenizer):
    import gguf

    _llama_cpp()
    _, _, folder = pruned_folder(tmp_path, "llama", toy_tokenizer)
    r = export_gguf(folder, tmp_path / "q4.gguf", "q4_k_m", tokenizer_pre="gpt-2")
    f, t = _reader(tmp_path / "q4.gguf")
    assert f["general.file_type"] == 15 and r.arch == "deci"
    assert f["deci.feed_forward_length"] == [37, 99, 8, 72]
    # rows of 64 or fewer values cannot hold a 256-value K-quant block: llama.cpp's own fallbacks apply
    assert {t.tensor_type for t in t.values()} - {gguf.GGMLQuantizationType.F32} <= {
        gguf.GGMLQuantizationType[n] for n in ("Q4_K", "Q5_0", "Q5_1", "Q6_K", "Q8_0", "Q4_0", "F16", "Q4_1")}
    llm = _llama(tmp_path / "q4.gguf")
    assert np.isfinite(_llama_cpp_logits(llm, list(range(3, 40)))).all()


def test_real_smollm2_pruned_per_layer_agrees_with_transformers_on_wikitext(tmp_path, smollm2_path):
    """The real SmolLM2 cut to per-layer widths (the shapes StructPrune gives it: 4-9 heads, 2-3 KV groups,
    MLP widths off the 32 grid), on 512 WikiText-2 tokens against transformers (float32):

    * llama.cpp's tokenizer gives transformers' ids (20,000 characters);
    * F32 GGUF, F32 KV cache: the same function (max |dlogit| < 5e-3, every top-1 equal);
    * q8_0: top-1 agreement at least the dense model's at q8_0 minus 0.02, and every disagreement (dense and
      pruned) at a position where transformers' own top-2 margin is below 1 logit: q8_0 changes the argmax
      only where the reference hardly prefers it. Not an agreement of 0.98: on SmolLM2 even the dense model
      agrees on 0.959 of these tokens at q8_0, and no variant tried (token embedding / output tensor at F16
      or F32, ffn_down at F16) reached 0.98 for both the dense and the pruned model
      (benchmarks/results/gguf_agreement_smollm2_*.md, docs/loading.md)."""
    _llama_cpp()
    from structprune.models import load_model

    from structprune.data.corpora import load_text

    text = load_text("wikitext2")[:20000]  # WikiText-2 test (shipped with the package)

    def top1(model, folder, gguf_type, ids):
        out = tmp_path / f"{folder.name}-{gguf_type}.gguf"
        assert export_gguf(folder, out, gguf_type).arch == ("deci" if folder.name == "smol" else "llama")
        llm = _llama(out, n_ctx=512)
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].numpy()
        got = _llama_cpp_logits(llm, ids)
        top2 = np.sort(want, axis=-1)[:, -2:]
        margins = (top2[:, 1] - top2[:, 0])[got.argmax(-1) != want.argmax(-1)]
        worst = float(margins.max()) if margins.size else 0.0  # the reference's largest margin overruled
        return float((got.argmax(-1) == want.argmax(-1)).mean()), float(np.abs(got - want).max()), worst, llm

    model, tok = load_model(str(smollm2_path), dtype=torch.float32)
    ids = tok(text)["input_ids"]
    window = ids[:512]
    dense_q8, _, dense_worst, _ = top1(model, Path(smollm2_path), "q8_0", window)
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.layers()):
        kv = [0, 2] if i % 5 == 4 else [0, 1, 2]
        heads = [k * 3 + h for k in kv for h in range(2 if i % 3 == 1 else 3)]
        apply_layer_plan(adapter, layer, LayerPlan(heads, kv, list(range(1536 - 72 * (i % 7)))))
    folder = tmp_path / "smol"
    save_pruned(model, tok, folder)
    agree, diff, _, llm = top1(model, folder, "f32", window)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    assert agree == 1.0 and diff < 5e-3, (agree, diff)
    agree, _, worst, _ = top1(model, folder, "q8_0", window)
    print(f"q8_0 top-1 agreement: dense {dense_q8:.3f} (largest reference margin overruled {dense_worst:.3f}), "
          f"pruned {agree:.3f} ({worst:.3f})")
    assert agree >= dense_q8 - 0.02, (agree, dense_q8)
    assert dense_q8 > 0.93, dense_q8
    assert dense_worst < 1.0 and worst < 1.0, (dense_worst, worst)


def test_prune_with_gguf_writes_them_next_to_the_safetensors_and_the_card_names_them(tmp_path, toy_tokenizer):
    from structprune.cli import main

    src = tmp_path / "src"
    model = tiny("llama")
    model.save_pretrained(src)
    toy_tokenizer.save_pretrained(src)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(TEXT))
    out = tmp_path / "pruned-30"
    assert main(["prune", str(src), "--sparsity", "0.3", "--method", "wanda-sp", "--allocation", "threshold",
                 "--calib", str(calib), "--nsamples", "2", "--seqlen", "32", "--eval", "wikitext2",
                 "--eval-limit", "1", "--eval-seqlen", "64", "--gguf", "f16,q8_0", "--tokenizer-pre", "gpt-2",
                 "--output", str(out), "-q"]) == 0
    files = sorted(p.name for p in out.glob("*.gguf"))
    assert files == ["pruned-30-F16.gguf", "pruned-30-Q8_0.gguf"]
    report = json.loads((out / "report.json").read_text())
    assert [g["path"] for g in report["gguf"]] == files and report["gguf"][0]["architecture"] == "deci"
    card = (out / "README.md").read_text()
    ppl = report["ppl"]["wikitext2"]
    assert f"| wikitext2 | 1 × 64 | {ppl['dense']:.2f}" in card and f"{ppl['pruned']:.2f}" in card
    assert report["command"] in card and "# pruned-30" in card
    assert "`pruned-30-F16.gguf`" in card and "- gguf" in card
    assert "method: `wanda-sp` (allocation `threshold`)" in card
