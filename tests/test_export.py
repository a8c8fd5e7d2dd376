"""Export contract: a pruned model saved by StructPrune loads with plain transformers and equals itself.

Every family (LLaMA-GQA, Qwen2, OPT) is cut to random, different widths per layer
(with refitted o/down biases on some layers), saved, and reloaded three ways:
``AutoModelForCausalLM`` with ``trust_remote_code=True`` (the folder's own modeling
file), ``load_pruned`` (StructPrune's packaged copy) and ``load_pruned(...,
trust_remote_code=True)``. Logits must agree to 1e-5 in float32 and greedy generation
with the KV cache must give the same tokens. Uniform widths must give a stock config.
"""

from __future__ import annotations

import ast
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from structprune import load_pruned
from structprune.adapters import LayerPlan, get_adapter
from structprune.api import prune
from structprune.config import PruneConfig
from structprune.errors import StructPruneError
from structprune.export import export_config, is_structprune_export, save_pruned
from structprune.export.modeling.modeling_structprune import PER_LAYER_KEYS
from structprune.export.writer import MODELING_FILE
from structprune.surgery import apply_layer_plan, set_output_projection

from tiny import FACTORIES, VOCAB, calib_ids, _init

TOL = 1e-5


def random_plan(adapter, layer, rng: random.Random) -> LayerPlan:
    """A legal random cut: some KV groups, the same number of heads in each, some channels."""
    s = adapter.attention_shape(layer)
    g = s.group_size
    kv = sorted(rng.sample(range(s.num_kv_heads), rng.randint(1, s.num_kv_heads)))
    per_group = rng.randint(1, g)
    heads = sorted(k * g + h for k in kv for h in rng.sample(range(g), per_group))
    n = adapter.mlp_shape(layer).channels
    return LayerPlan(heads, kv, sorted(rng.sample(range(n), rng.randint(1, n))))


def add_refit_bias(adapter, layer, seed: int) -> None:
    """What a refit with bias compensation does: give o/down a bias (the stock config may have none)."""
    g = torch.Generator().manual_seed(seed)
    _, o = adapter.attn_linears(layer)
    _, down = adapter.mlp_linears(layer)
    for lin in (o, down):
        set_output_projection(lin, lin.weight, 0.1 * torch.randn(lin.out_features, generator=g))


def cut_nonuniform(model, seed: int = 0, biases: bool = True):
    adapter = get_adapter(model)
    rng = random.Random(seed)
    plans = []
    for i, layer in enumerate(adapter.layers()):
        plan = random_plan(adapter, layer, rng)
        apply_layer_plan(adapter, layer, plan)
        if biases and i % 2 == 0:
            add_refit_bias(adapter, layer, seed + i)
        plans.append(plan)
    widths = [adapter.layer_widths(l) for l in adapter.layers()]
    assert len({tuple(w.values()) for w in widths}) > 1, "test needs non-uniform widths"
    return plans


def cut_uniform(model, kv_keep: int = 1, channels_keep: int = 20, biases: bool = False):
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.layers()):
        s = adapter.attention_shape(layer)
        kv = list(range(kv_keep))
        heads = [k * s.group_size + h for k in kv for h in range(s.group_size)]
        apply_layer_plan(adapter, layer, LayerPlan(heads, kv, list(range(channels_keep))))
        if biases:
            add_refit_bias(adapter, layer, i)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def assert_same_model(ref, loaded, ids=None):
    ids = calib_ids(2, 12) if ids is None else ids
    diff = (logits(ref, ids) - logits(loaded, ids)).abs()
    assert diff.max() < TOL, f"max diff {diff.max():.3g} mean {diff.mean():.3g}"
    prompt = ids[:1, :6]
    want = ref.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    got = loaded.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert want.shape[1] == prompt.shape[1] + 5
    assert torch.equal(want, got), (want, got)


def reload_all_ways(folder):
    auto = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    return [auto, load_pruned(folder), load_pruned(folder, trust_remote_code=True)]


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_nonuniform_roundtrip(family, tmp_path):
    model = FACTORIES[family]()
    plans = cut_nonuniform(model)
    export = save_pruned(model, None, tmp_path, report={"method": "test"}, plans=plans)
    assert export.format == "custom"
    cfg = json.loads((tmp_path / "config.json").read_text())
    base = "llama" if family == "llama-gqa" else family
    # Format 2: the base family as model_type (tokenizers read it locally), per-layer classes via auto_map.
    assert cfg["model_type"] == base and cfg["structprune"]["format"] == "custom"
    assert cfg["auto_map"]["AutoConfig"].startswith("modeling_structprune.StructPrune")
    adapter = get_adapter(model)
    layers = list(adapter.layers())
    assert cfg["layer_num_heads"] == [adapter.layer_widths(l)["heads"] for l in layers]
    assert cfg["layer_num_kv_heads"] == [adapter.layer_widths(l)["kv_heads"] for l in layers]
    assert cfg["layer_intermediate_size"] == [adapter.layer_widths(l)["mlp"] for l in layers]
    assert cfg["layer_o_bias"] == [i % 2 == 0 or family == "opt" for i in range(len(layers))]
    assert cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_structprune.")
    assert (tmp_path / MODELING_FILE.name).is_file()
    assert json.loads((tmp_path / "plan.json").read_text()) == [p.to_dict() for p in plans]
    assert json.loads((tmp_path / "report.json").read_text())["export"]["format"] == "custom"
    assert is_structprune_export(tmp_path)
    for loaded in reload_all_ways(tmp_path):
        assert_same_model(model, loaded)
    # A reloaded export can be adapted (and so re-pruned or re-exported) like the stock model.
    again = load_pruned(tmp_path)
    assert [get_adapter(again).layer_widths(l) for l in get_adapter(again).layers()] == \
        [adapter.layer_widths(l) for l in layers]


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_prune_then_export_roundtrip(family, tmp_path):
    model = FACTORIES[family]()
    result = prune(model, calib_ids(4, 16), device="cpu", progress=False, method="wanda-sp", allocation="uniform",
                   sparsity=0.4, seqlen=16, nsamples=4)
    export = save_pruned(model, None, tmp_path, report=result.report, plans=result.plans)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["structprune"]["layers"] == [
        {k: l[k] for k in ("heads", "kv_heads", "mlp")} | {"o_bias": l["o_bias"], "mlp_out_bias": l["mlp_out_bias"]}
        for l in cfg["structprune"]["layers"]]
    assert [{k: l[k] for k in ("heads", "kv_heads", "mlp")} for l in cfg["structprune"]["layers"]] == \
        result.report["layers"]
    if export.format == "stock":
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False).eval()
        assert_same_model(model, loaded)
    else:  # OPT: stock OPT sizes q/k/v to hidden_size and cannot hold removed heads
        assert family == "opt" and "heads" in export.reason
    assert_same_model(model, load_pruned(tmp_path))


@pytest.mark.parametrize("family,stock_type", [("llama-gqa", "llama"), ("qwen2", "qwen2")])
def test_uniform_widths_give_a_stock_config(family, stock_type, tmp_path):
    model = FACTORIES[family]()
    cut_uniform(model)
    export = save_pruned(model, None, tmp_path)
    assert export.format == "stock" and not export.zero_biases
    assert not (tmp_path / MODELING_FILE.name).exists()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in cfg and not any(k in cfg for k in PER_LAYER_KEYS)
    assert (cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["head_dim"]) == (1, 20, 8)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False).eval()
    assert loaded.config.model_type == stock_type
    assert_same_model(model, loaded)
    assert_same_model(model, load_pruned(tmp_path))


def tiny_mistral():
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=37, num_hidden_layers=2,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                        sliding_window=None, tie_word_embeddings=False)
    return _init(MistralForCausalLM(cfg))


@pytest.mark.parametrize("make", [FACTORIES["llama-gqa"], FACTORIES["qwen2"], tiny_mistral],
                         ids=["llama", "qwen2", "mistral"])
def test_uniform_widths_with_refit_biases_stay_stock(make, tmp_path):
    """o/down biases added by a refit: stock LLaMA holds them (zeros filled in for q/k/v, gate/up)."""
    model = make()
    cut_uniform(model, biases=True)
    export = save_pruned(model, None, tmp_path)
    assert export.format == "stock" and export.zero_biases
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False).eval()
    assert loaded.config.model_type == "llama"
    assert loaded.config.attention_bias and loaded.config.mlp_bias
    assert_same_model(model, loaded)
    assert_same_model(model, load_pruned(tmp_path))


def test_uniform_widths_a_stock_config_rejects_fall_back_to_custom(tmp_path):
    """transformers' LlamaConfig demands hidden % heads == 0 even with head_dim set: 5 heads of 48 fails."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = _init(LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=6, head_dim=8, max_position_embeddings=128, tie_word_embeddings=False)))
    adapter = get_adapter(model)
    for layer in adapter.layers():
        apply_layer_plan(adapter, layer, LayerPlan([0, 1, 2, 4, 5], [0, 1, 2, 4, 5], list(range(30))))
    export = save_pruned(model, None, tmp_path)
    assert export.format == "custom" and "rejects" in export.reason
    assert_same_model(model, load_pruned(tmp_path))


def test_opt_with_all_heads_kept_is_stock(tmp_path):
    model = FACTORIES["opt"]()
    adapter = get_adapter(model)
    for layer in adapter.layers():
        n = adapter.attention_shape(layer).num_heads
        apply_layer_plan(adapter, layer, LayerPlan(list(range(n)), list(range(n)), list(range(0, 37, 2))))
    assert save_pruned(model, None, tmp_path).format == "stock"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.model_type == "opt" and loaded.config.ffn_dim == 19
    assert_same_model(model, loaded)


def test_sharded_weights_and_tokenizer(tmp_path, byte_tokenizer):
    from transformers import AutoTokenizer

    model = FACTORIES["llama-gqa"]()
    cut_nonuniform(model, seed=3)
    save_pruned(model, byte_tokenizer, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert AutoTokenizer.from_pretrained(tmp_path)("hi")["input_ids"] == byte_tokenizer("hi")["input_ids"]
    assert_same_model(model, load_pruned(tmp_path))


def test_tied_embeddings_roundtrip(tmp_path):
    from tiny import tiny_llama

    model = tiny_llama()  # SmolLM2 ties lm_head to the embeddings; the tiny factory does not
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    cut_nonuniform(model, seed=5)
    save_pruned(model, None, tmp_path)
    loaded = load_pruned(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert_same_model(model, loaded)


def test_reexport_of_a_loaded_export(tmp_path):
    """A loaded per-layer export can be saved again (e.g. after further pruning) and still round-trips."""
    model = FACTORIES["qwen2"]()
    cut_nonuniform(model, seed=11)
    save_pruned(model, None, tmp_path / "a")
    loaded = load_pruned(tmp_path / "a")
    assert save_pruned(loaded, None, tmp_path / "b").format == "custom"
    assert_same_model(model, load_pruned(tmp_path / "b"))


def test_half_precision_export_keeps_its_dtype(tmp_path):
    model = FACTORIES["llama-gqa"]()
    cut_nonuniform(model, seed=2)
    model.to(torch.bfloat16)
    save_pruned(model, None, tmp_path)
    loaded = load_pruned(tmp_path)
    assert loaded.dtype == torch.bfloat16
    # Weights compare exactly; logits would not (model.to(bf16) also rounds the rotary
    # inv_freq buffer, which a freshly loaded model keeps in float32).
    ref = model.state_dict()
    assert all(torch.equal(t, ref[k]) for k, t in loaded.state_dict().items())
    assert load_pruned(tmp_path, dtype=torch.float32).dtype == torch.float32


def test_modeling_file_needs_only_torch_and_transformers():
    tree = ast.parse(MODELING_FILE.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports break when the file is copied into a folder"
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "torch", "transformers"}, roots
    assert "structprune." not in MODELING_FILE.read_text().replace("modeling_structprune", "")


def test_mlp_multiple_8_widths_are_multiples_of_8(tmp_path):
    model = FACTORIES["llama-gqa"]()
    prune(model, calib_ids(4, 16), device="cpu", progress=False, method="wanda-sp", allocation="uniform",
          sparsity=0.4, seqlen=16, nsamples=4, mlp_multiple=8)
    save_pruned(model, None, tmp_path)
    cfg = load_pruned(tmp_path).config
    widths = [l["mlp"] for l in cfg.structprune["layers"]]
    assert all(w % 8 == 0 for w in widths), widths


def test_mlp_multiple_8_keeps_sparsity_near_target_on_smollm2_shapes():
    """Rounding SmolLM2's 1536-channel MLPs to multiples of 8 moves sparsity by well under 1%."""
    from structprune.adapters.base import AttentionShape, MLPShape
    from structprune.allocation.widths import layer_cost, uniform_widths

    attn = AttentionShape(num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576, qkv_bias=False)
    mlp = MLPShape(channels=1536, hidden_size=576, gated=True, bias=False)
    full = attn.cost(3, 3) + mlp.cost(1536)
    for sparsity in (0.2, 0.3, 0.5, 0.7):
        (w,) = uniform_widths([(attn, mlp)], sparsity, multiple=8)
        assert w.channels % 8 == 0
        assert abs(1 - layer_cost(attn, mlp, w) / full - sparsity) < 0.01, (sparsity, w)


def test_uniform_widths_needs_uniform_allocation():
    with pytest.raises(StructPruneError, match="uniform"):
        PruneConfig(uniform_widths=True, allocation="owl")
    assert PruneConfig(uniform_widths=True, allocation="uniform").uniform_widths


# -- bad input ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "model"
    model = FACTORIES["llama-gqa"]()
    cut_nonuniform(model, seed=7)
    save_pruned(model, None, folder)
    return folder


def copy_of(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def test_not_a_model_folder(tmp_path):
    with pytest.raises(StructPruneError, match="not a folder"):
        load_pruned(tmp_path / "nope")
    with pytest.raises(StructPruneError, match="no config.json"):
        load_pruned(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(StructPruneError, match="not valid JSON"):
        load_pruned(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(StructPruneError, match="model_type"):
        load_pruned(tmp_path)


def test_unknown_model_type(exported, tmp_path):
    folder = copy_of(exported, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "not_a_model"}))
    with pytest.raises(StructPruneError, match="not_a_model"):
        load_pruned(folder)


def test_missing_weights(exported, tmp_path):
    folder = copy_of(exported, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(StructPruneError, match="no safetensors"):
        load_pruned(folder)


def test_truncated_safetensors(exported, tmp_path):
    folder = copy_of(exported, tmp_path)
    f = folder / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 64)
    with pytest.raises(StructPruneError, match="truncated or corrupt"):
        load_pruned(folder)


def test_missing_shard(tmp_path):
    model = FACTORIES["opt"]()
    cut_nonuniform(model, seed=1)
    save_pruned(model, None, tmp_path / "m", max_shard_size="20KB")
    next((tmp_path / "m").glob("model-*.safetensors")).unlink()
    with pytest.raises(StructPruneError, match="missing"):
        load_pruned(tmp_path / "m")


@pytest.mark.parametrize("key,bump", [("layer_intermediate_size", 1), ("layer_num_heads", 0)])
def test_config_widths_disagree_with_weights(exported, tmp_path, key, bump):
    folder = copy_of(exported, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    if key == "layer_num_heads":  # one more KV group and its heads than the weights hold
        cfg["layer_num_kv_heads"][0] += 1
        cfg["layer_num_heads"][0] += cfg["layer_num_heads"][0] // (cfg["layer_num_kv_heads"][0] - 1)
    else:
        cfg[key][0] += bump
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StructPruneError, match="disagree"):
        load_pruned(folder)


def test_config_bias_flag_disagrees_with_weights(exported, tmp_path):
    folder = copy_of(exported, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["layer_o_bias"] = [not b for b in cfg["layer_o_bias"]]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StructPruneError, match="do not match|disagree"):
        load_pruned(folder)


def test_stock_config_widths_disagree_with_weights(tmp_path):
    model = FACTORIES["llama-gqa"]()
    cut_uniform(model)
    save_pruned(model, None, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 21}))
    with pytest.raises(StructPruneError, match="disagree"):
        load_pruned(tmp_path)


def test_per_layer_lists_of_the_wrong_length(exported, tmp_path):
    folder = copy_of(exported, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["layer_num_heads"] = cfg["layer_num_heads"][:-1]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StructPruneError, match="layer_num_heads"):
        load_pruned(folder)


def test_export_config_of_an_unpruned_model_is_stock():
    model = FACTORIES["qwen2"]()
    export = export_config(model)
    assert export.format == "stock" and export.config.model_type == "qwen2"


# -- the real model -----------------------------------------------------------------------


def test_sliced_smollm2_roundtrip(smollm2_path, tmp_path):
    """Real SmolLM2 weights (first 2 layers, tied embeddings), pruned non-uniformly and uniformly."""
    from structprune import load_model

    model, tok = load_model(str(smollm2_path))
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    prune(model, ids, device="cpu", progress=False, method="wanda-sp", allocation="uniform", sparsity=0.3,
          seqlen=16, nsamples=2, mlp_multiple=8)
    uniform = tmp_path / "uniform"
    assert save_pruned(model, tok, uniform).format == "stock"
    loaded = AutoModelForCausalLM.from_pretrained(uniform).eval()
    assert loaded.config.model_type == "llama" and loaded.config.tie_word_embeddings
    assert_same_model(model, loaded, ids[:, :10])

    # One more cut of layer 1 only: the widths now differ, so the custom format.
    adapter = get_adapter(model)
    layer = adapter.layers()[1]
    apply_layer_plan(adapter, layer, random_plan(adapter, layer, random.Random(0)))
    add_refit_bias(adapter, layer, 0)
    custom = tmp_path / "custom"
    assert save_pruned(model, tok, custom).format == "custom"
    for reloaded in reload_all_ways(custom):
        assert_same_model(model, reloaded, ids[:, :10])


def test_tokenizer_of_a_per_layer_export_loads_without_asking_to_run_code(tmp_path, byte_tokenizer, monkeypatch):
    """AutoTokenizer reads config.json; a per-layer export must not make it ask about remote code."""
    import builtins

    from transformers import AutoConfig, AutoTokenizer

    model = FACTORIES["llama-gqa"]()
    cut_nonuniform(model, seed=5)
    save_pruned(model, byte_tokenizer, tmp_path)

    def asked(*args, **kwargs):
        raise AssertionError("transformers asked whether to run the folder's code")

    monkeypatch.setattr(builtins, "input", asked)
    assert AutoTokenizer.from_pretrained(tmp_path)("hi")["input_ids"] == byte_tokenizer("hi")["input_ids"]
    assert AutoConfig.from_pretrained(tmp_path).model_type == "llama"  # read locally, no remote code
    # The model itself still comes from the shipped modeling code, at its per-layer widths.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert loaded.config.model_type == "structprune_llama"
    assert_same_model(model, loaded)
