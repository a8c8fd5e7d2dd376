"""One contract suite for every supported family (issue 13), over the registry ``tiny.FAMILIES``.

Each family's tiny, odd-sized random model (tests/tiny.py) must satisfy:

- keeping every structure changes nothing;
- the physically sliced model equals the unsliced one with the same structures masked;
- a forward pass streamed one layer at a time (in memory, and read from disk) equals the full one;
- every method reaches its target sparsity, and the checkpoint path (``prune_checkpoint``,
  streamed from disk) gives the in-memory path's model;
- save -> load gives the same logits and greedy generation: uniform widths through the
  family's stock config (no remote code), per-layer widths through the exported modeling
  code (``trust_remote_code``) and ``load_pruned``.

The checks are plain functions taking a model factory, so a family with extra structure
(fused projections, MoE experts) can call them from its own tests.
"""

from __future__ import annotations

import copy
import json
import random
import re

import pytest
import torch
from tiny import FAMILIES, calib_ids
from transformers import AutoModelForCausalLM

from structprune import PruneConfig, load_pruned, prune
from structprune.adapters import LayerPlan, count_params, get_adapter, supported_model_types
from structprune.api import prune_checkpoint, removal_step
from structprune.engine.capture import capture_first_layer_inputs, run_layer
from structprune.engine.disk import DiskStoreFactory
from structprune.errors import UnsupportedArchitectureError
from structprune.export import save_pruned
from structprune.models.checkpoint import load_skeleton
from structprune.surgery import apply_layer_plan, mask_layer_plan, set_output_projection

METHODS = ("structprune", "global", "obs-local", "flap", "wanda-sp", "magnitude-sp")
TOL = 1e-5


@pytest.fixture(autouse=True)
def _single_thread(one_torch_thread):
    """Tiny models on one torch thread (see conftest.one_torch_thread)."""


# -- helpers -----------------------------------------------------------------------------------

def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def max_diff(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = TOL) -> float:
    """Assert ``a`` and ``b`` agree within ``tol``; print and return the max difference."""
    d = (a - b).abs()
    print(f"{what}: max diff {d.max():.3g} mean {d.mean():.3g}")
    assert d.max() <= tol, f"{what}: max diff {d.max():.3g} mean {d.mean():.3g}"
    return float(d.max())


def random_plan(adapter, layer, rng: random.Random) -> LayerPlan:
    """A legal random cut: some KV groups (at least one), the same number of heads in each, some channels."""
    s = adapter.attention_shape(layer)
    g = s.group_size
    kv = sorted(rng.sample(range(s.num_kv_heads), rng.randint(1, s.num_kv_heads)))
    per_group = rng.randint(1, max(1, g - 1))  # at least one query head removed where a group has several
    heads = sorted(k * g + h for k in kv for h in rng.sample(range(g), per_group))
    m = adapter.mlp_shape(layer)
    if not m.tied:
        return LayerPlan(heads, kv, sorted(rng.sample(range(m.channels), rng.randint(1, m.channels - 1))))
    # MoE: the experts of a layer keep one width, a multiple of m.tied_multiple (adapters/moe.py)
    width = rng.randrange(m.tied_multiple, m.sizes[0], m.tied_multiple)
    channels, start = [], 0
    for i, n in enumerate(m.sizes):
        k = width if i < m.tied else rng.randint(1, n - 1)
        channels += [start + c for c in sorted(rng.sample(range(n), k))]
        start += n
    return LayerPlan(heads, kv, channels)


def full_plan(adapter, layer) -> LayerPlan:
    s = adapter.attention_shape(layer)
    return LayerPlan(list(range(s.num_heads)), list(range(s.num_kv_heads)),
                     list(range(adapter.mlp_shape(layer).channels)))


def uniform_plan(adapter, layer, channels: int = 20) -> LayerPlan:
    """The same cut in every layer, with a head count the stock configs accept (it divides hidden)."""
    s = adapter.attention_shape(layer)
    kv = max(1, s.num_kv_heads // 2)
    per_group = next(p for p in range(s.group_size - 1 or 1, 0, -1) if s.hidden_size % (kv * p) == 0)
    heads = [k * s.group_size + h for k in range(kv) for h in range(per_group)]
    m = adapter.mlp_shape(layer)
    if m.tied:  # MoE: every expert (and a shared expert) keeps its first channels, experts a multiple of 8
        starts = [sum(m.sizes[:i]) for i in range(len(m.sizes))]
        keep = [channels // m.tied_multiple * m.tied_multiple if i < m.tied else channels for i in range(len(m.sizes))]
        return LayerPlan(heads, list(range(kv)), [s0 + c for s0, k in zip(starts, keep) for c in range(k)])
    return LayerPlan(heads, list(range(kv)), list(range(channels)))


def add_refit_biases(adapter, layer, seed: int) -> None:
    """What a refit with bias compensation does: o and down get a bias the family may not have."""
    g = torch.Generator().manual_seed(seed)
    _, o = adapter.attn_linears(layer)
    set_output_projection(o, o.weight, 0.1 * torch.randn(o.out_features, generator=g))
    for part in adapter.mlp_parts(layer):  # experts cannot hold a bias (adapters/moe.py)
        if part.bias_ok:
            part.set_output(part.out_weight(), 0.1 * torch.randn(part.out_weight().shape[0], generator=g))


def streamed_logits(model, ids: torch.Tensor, factory=None) -> torch.Tensor:
    """Logits computed one decoder layer at a time (layers lent by ``factory``'s stores when given)."""
    adapter = get_adapter(model)
    store = factory(adapter.layers(), "cpu") if factory is not None else None
    resident = factory.resident if factory is not None else None
    with resident(adapter.pre_layer_modules(), "cpu") if resident else torch.no_grad():
        inputs = capture_first_layer_inputs(model, adapter, ids, "cpu", batch_size=2)
    try:
        for i, layer in enumerate(adapter.layers()):
            layer = store.fetch(i) if store is not None else layer
            inputs = run_layer(layer, inputs, "cpu")
            if store is not None:
                store.release(i)
    finally:
        if store is not None:
            store.finish()
    x = torch.cat(list(inputs.hidden))
    with resident(adapter.head_modules(), "cpu") if resident else torch.no_grad(), torch.no_grad():
        for m in adapter.head_modules():
            x = m(x)
    return x


def assert_same_model(ref, loaded, what: str) -> None:
    """Same logits and the same greedy generation (with the KV cache) from ``loaded`` as from ``ref``."""
    ids = calib_ids(2, 12)
    max_diff(logits(ref, ids), logits(loaded, ids), what)
    prompt = ids[:1, :6]
    want = ref.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = loaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert want.shape[1] == prompt.shape[1] + 6
    assert torch.equal(want, got), f"{what}: greedy generation differs: {want.tolist()} vs {got.tolist()}"


# -- the contract, as plain functions of a factory ---------------------------------------------

def check_keep_everything(make) -> None:
    model = make()
    ids = calib_ids(3, 16)
    before = logits(model, ids)
    adapter = get_adapter(model)
    n = count_params([model])
    for layer in adapter.layers():
        apply_layer_plan(adapter, layer, full_plan(adapter, layer))
    assert count_params([model]) == n
    max_diff(before, logits(model, ids), "keep everything", tol=0.0)


def check_sliced_equals_masked(make, seed: int) -> None:
    model = make()
    masked = copy.deepcopy(model)
    adapter, madapter = get_adapter(model), get_adapter(masked)
    rng = random.Random(seed)
    for layer, mlayer in zip(adapter.layers(), madapter.layers()):
        plan = random_plan(adapter, layer, rng)
        apply_layer_plan(adapter, layer, plan)
        mask_layer_plan(madapter, mlayer, plan)
    assert count_params([model]) < count_params([masked])
    ids = calib_ids(3, 20)  # longer than the Gemma sliding windows
    max_diff(logits(model, ids), logits(masked, ids), "sliced vs masked", tol=1e-4)


def check_streamed_equals_full(make, tmp_path) -> None:
    model = make()
    ids = calib_ids(4, 16)
    full = logits(model, ids)
    max_diff(full, streamed_logits(model, ids), "streamed in memory vs full", tol=1e-5)
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    skeleton, reader = load_skeleton(tmp_path, torch.float32)
    factory = DiskStoreFactory.from_model(skeleton, get_adapter(skeleton), reader, torch.float32)
    max_diff(full, streamed_logits(skeleton, ids, factory), "streamed from disk vs full", tol=1e-5)


def config_for(method: str, sparsity: float = 0.3) -> PruneConfig:
    return PruneConfig(method=method, sparsity=sparsity, nsamples=4, seqlen=16, mlp_multiple=1)


def check_method_reaches_target(make, method: str, sparsity: float = 0.3) -> None:
    model = make()
    adapter = get_adapter(model)
    before = sum(count_params(adapter.prunable_linears(l)) for l in adapter.layers())
    config = config_for(method, sparsity)
    step = removal_step(adapter, config)
    result = prune(model, calib_ids(4, 16), config, device="cpu", progress=False)
    after = sum(count_params(adapter.prunable_linears(l)) for l in adapter.layers())
    achieved = 1 - after / before
    assert achieved == pytest.approx(result.report["sparsity_achieved"])
    assert abs(achieved - sparsity) <= step + 1e-9, f"{method}: achieved {achieved:.4f}, target {sparsity}, step {step:.4f}"
    assert torch.isfinite(logits(model, calib_ids(2, 16))).all()


def check_checkpoint_path_equals_in_memory(make, method: str, tmp_path) -> None:
    folder = tmp_path / "dense"
    make().save_pretrained(folder, max_shard_size="50KB")
    calib = calib_ids(4, 16)
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    want = prune(ref, calib, config_for(method), device="cpu", progress=False)
    got = prune_checkpoint(folder, tmp_path / "pruned", calib, config_for(method), device="cpu", progress=False)
    assert got.report["residency"] == "disk"
    assert [p.to_dict() for p in got.plans] == [p.to_dict() for p in want.plans]
    assert_same_model(ref, load_pruned(tmp_path / "pruned"), f"prune_checkpoint {method}")


def check_uniform_export_is_stock(make, tmp_path) -> None:
    model = make()
    adapter = get_adapter(model)
    for layer in adapter.layers():
        apply_layer_plan(adapter, layer, uniform_plan(adapter, layer))
    export = save_pruned(model, None, tmp_path)
    assert export.format == "stock", export.reason
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in cfg and cfg["model_type"] == model.config.model_type
    assert not list(tmp_path.glob("*.py"))
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False).eval()
    assert type(stock) is type(model)
    assert_same_model(model, stock, "stock from_pretrained")
    assert_same_model(model, load_pruned(tmp_path), "load_pruned (stock)")


def check_per_layer_export(make, tmp_path, biases: bool = True) -> None:
    model = make()
    adapter = get_adapter(model)
    rng = random.Random(3)
    for i, layer in enumerate(adapter.layers()):
        apply_layer_plan(adapter, layer, random_plan(adapter, layer, rng))
        if biases and i % 2 == 0:
            add_refit_biases(adapter, layer, i)
    assert len({json.dumps(adapter.layer_widths(l)) for l in adapter.layers()}) > 1
    export = save_pruned(model, None, tmp_path)
    assert export.format == "custom"
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_structprune.")
    remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert_same_model(model, remote, "trust_remote_code from_pretrained")
    assert_same_model(model, load_pruned(tmp_path), "load_pruned (per-layer)")


# -- the suite over the registry ---------------------------------------------------------------

FAMILY_NAMES = sorted(FAMILIES)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_keep_everything_changes_nothing(family):
    check_keep_everything(FAMILIES[family])


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_sliced_equals_masked(family, seed):
    check_sliced_equals_masked(FAMILIES[family], seed)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_streamed_equals_full(family, tmp_path):
    check_streamed_equals_full(FAMILIES[family], tmp_path)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_method_reaches_its_target(family, method):
    check_method_reaches_target(FAMILIES[family], method)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_checkpoint_path_equals_in_memory(family, tmp_path):
    # One method per family, in turn, so every streamed method is run from disk across the
    # registry (each is run on every family in memory above; `global` is O(N) by design and
    # refuses the disk path).
    disk_methods = [m for m in METHODS if m != "global"]
    method = disk_methods[FAMILY_NAMES.index(family) % len(disk_methods)]
    check_checkpoint_path_equals_in_memory(FAMILIES[family], method, tmp_path)


@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if f != "opt"])  # stock OPT cannot drop heads
def test_uniform_widths_export_a_stock_config(family, tmp_path):
    check_uniform_export_is_stock(FAMILIES[family], tmp_path)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_per_layer_widths_export_modeling_code(family, tmp_path):
    check_per_layer_export(FAMILIES[family], tmp_path)


# -- family specifics --------------------------------------------------------------------------

def test_unknown_family_error_lists_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError) as err:
        get_adapter(model)
    for t in ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "opt"):
        assert t in str(err.value)
    assert {"qwen3", "gemma2", "gemma3_text", "gemma3"} <= set(supported_model_types())


def test_single_kv_head_keeps_its_group_and_prunes_query_heads():
    """Gemma 3 with one KV head: the group always stays, query heads go, at least one is kept."""
    model = FAMILIES["gemma3_text"]()
    adapter = get_adapter(model)
    shape = adapter.attention_shape(adapter.layers()[0])
    assert shape.num_kv_heads == 1 and all(kv == 1 for kv, _ in shape.options())
    prune(model, calib_ids(4, 16), config_for("wanda-sp", 0.5), device="cpu", progress=False)
    for layer in adapter.layers():
        w = adapter.layer_widths(layer)
        assert w["kv_heads"] == 1 and 1 <= w["heads"] < shape.num_heads, w
        assert layer.self_attn.num_key_value_groups == w["heads"]


def test_gemma_sliding_layers_get_their_own_mask():
    """The windows are longer than Gemma's sliding window, so a layer run with the other type's
    mask (or Gemma 3's other rotary tables) would differ: capture keeps one set per type."""
    from structprune.engine.capture import attention_type, layer_kwargs

    for family in ("gemma2", "gemma3_text"):
        model = FAMILIES[family]()
        adapter = get_adapter(model)
        inputs = capture_first_layer_inputs(model, adapter, calib_ids(2, 16), "cpu", batch_size=2)
        sliding, full = adapter.layers()[0], adapter.layers()[1]
        assert (attention_type(sliding), attention_type(full)) == ("sliding_attention", "full_attention")
        kw = inputs.kwargs[0]
        h = next(iter(inputs.hidden))
        with torch.no_grad():
            right = full(h, **layer_kwargs(full, kw))
            wrong = full(h, **layer_kwargs(sliding, kw))
        assert (right - wrong).abs().max() > 1e-3, family


def test_gemma2_final_softcap_is_part_of_the_head():
    model = FAMILIES["gemma2"]()
    ids = calib_ids(2, 16)
    out = logits(model, ids)
    assert out.abs().max() <= model.config.final_logit_softcapping
    max_diff(out, streamed_logits(model, ids), "gemma2 streamed with soft-capping")


# What transformers' GGUF reader builds from llama.cpp's layout of each family: Mistral is stored
# as the llama architecture and read as LLaMA (the same model without a sliding window).
GGUF_LOADS_AS = {"mistral": "llama"}


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3_text", "mistral", "qwen2", "phi3",
                                    "qwen2_moe"])
def test_gguf_checkpoints_load_prune_and_export(family, tmp_path):
    """A GGUF file (llama.cpp's layout, float32) of the family loads through ``load_model`` equal to
    the model it was written from, prunes, and exports (the GGUF quantization record dropped)."""
    from tiny_gguf import GGUF_FAMILIES, write_gguf

    from structprune import load_model

    dense = GGUF_FAMILIES[family]()
    path = write_gguf(dense, tmp_path / f"{family}.gguf")
    model, tokenizer = load_model(str(path))
    assert model.config.model_type == GGUF_LOADS_AS.get(family, family)
    assert len(tokenizer) <= dense.config.vocab_size
    ids = calib_ids(4, 16)
    max_diff(logits(dense, ids), logits(model, ids), f"{family} GGUF vs source")
    prune(model, ids, config_for("wanda-sp"), device="cpu", progress=False)
    assert save_pruned(model, tokenizer, tmp_path / "out").format == "stock"
    assert_same_model(model, load_pruned(tmp_path / "out"), f"{family} from GGUF, pruned, reloaded")


def _image_batch(model, seed: int = 5):
    """Token ids with one image's placeholder tokens in the middle, and that image's pixels."""
    c = model.config
    ids = calib_ids(1, 10, seed=seed)
    image = torch.full((1, c.mm_tokens_per_image), c.image_token_index)
    size = c.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return torch.cat([ids[:, :3], image, ids[:, 3:]], 1), pixels


def _vision_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))}


def _same_with_image(ref, loaded, what: str) -> None:
    ids, pixels = _image_batch(ref)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixels).logits
        got = loaded(input_ids=ids, pixel_values=pixels).logits
    max_diff(want, got, what)


@pytest.mark.parametrize("uniform", [True, False])
def test_gemma3_multimodal_prunes_the_language_model_and_keeps_vision(uniform, tmp_path):
    """Gemma3ForConditionalGeneration: only the language model is cut; the vision tower and projector
    come back from the export bit for bit and images still reach the pruned language model. Uniform
    widths write a stock ``gemma3`` config whose nested ``text_config`` has the kept widths."""
    model = FAMILIES["gemma3"]()
    vision = _vision_state(model)
    adapter = get_adapter(model)
    assert adapter.layers() is model.model.language_model.layers
    rng = random.Random(7)
    for layer in adapter.layers():
        apply_layer_plan(adapter, layer, uniform_plan(adapter, layer) if uniform else random_plan(adapter, layer, rng))
    export = save_pruned(model, None, tmp_path)
    assert export.format == ("stock" if uniform else "custom"), export.reason
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "gemma3" and "vision_config" in cfg
    widths = adapter.layer_widths(adapter.layers()[0])
    if uniform:
        text = cfg["text_config"]
        assert (text["num_attention_heads"], text["num_key_value_heads"], text["intermediate_size"]) == (
            widths["heads"], widths["kv_heads"], widths["mlp"])
        assert not any(k.startswith("layer_") for k in cfg)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    else:
        assert cfg["layer_num_heads"] == [adapter.layer_widths(l)["heads"] for l in adapter.layers()]
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    for m in (loaded, load_pruned(tmp_path)):
        assert type(m).__name__.endswith("Gemma3ForConditionalGeneration")
        got = _vision_state(m)
        assert got.keys() == vision.keys() and all(torch.equal(got[k], vision[k]) for k in vision)
        _same_with_image(model, m, f"gemma3 with an image, {export.format} export")


def test_gemma3_checkpoint_path_keeps_vision(tmp_path):
    """prune_checkpoint on a Gemma 3 multimodal checkpoint in transformers' saved layout
    (``language_model.model.*``, as Hub checkpoints are): the vision weights are copied through."""
    folder = tmp_path / "dense"
    dense = FAMILIES["gemma3"]()
    dense.save_pretrained(folder)
    vision = _vision_state(dense)
    prune_checkpoint(folder, tmp_path / "pruned", calib_ids(4, 16), config_for("wanda-sp", 0.4), device="cpu",
                     progress=False)
    pruned = load_pruned(tmp_path / "pruned")
    got = _vision_state(pruned)
    assert got.keys() == vision.keys() and all(torch.equal(got[k], vision[k]) for k in vision)
    adapter = get_adapter(pruned)
    assert count_params(adapter.prunable_linears(adapter.layers()[0])) < count_params(
        get_adapter(dense).prunable_linears(get_adapter(dense).layers()[0]))


@pytest.mark.parametrize("family,error", [("mixtral", "could not fill .* weight"),
                                          ("qwen2_moe", "do not fit the config")])
def test_gguf_files_transformers_reads_in_part_are_refused(family, error, tmp_path):
    """llama.cpp's Mixtral layout (the llama architecture with ``ffn_*_exps`` experts) is read by
    transformers as a LlamaForCausalLM whose MLPs stay random (a warning only): refused, not pruned.
    A Qwen2-MoE whose expert widths are not transformers' defaults (GGUF does not carry them to the
    config): transformers 5.24 refuses the shapes, which must be a StructPruneError saying so, not
    transformers' RuntimeError; 5.17 loads the file's shapes (the weights right, the config's widths
    the defaults), which must then be the source model."""
    from tiny_gguf import write_gguf

    from structprune import load_model
    from structprune.errors import StructPruneError

    dense = FAMILIES[family](layers=2)
    path = write_gguf(dense, tmp_path / f"{family}.gguf")
    if family == "mixtral":
        with pytest.raises(StructPruneError, match=error):
            load_model(str(path))
        return
    try:
        model, _ = load_model(str(path))
    except StructPruneError as exc:
        assert re.search(error, str(exc)), exc
        return
    ids = calib_ids(2, 12)
    max_diff(logits(dense, ids), logits(model, ids), f"{family} GGUF with non-default widths vs source")


def test_gguf_named_mistral_is_a_clear_error_or_mistral(tmp_path):
    """A llama-architecture GGUF whose ``general.name`` is exactly "mistral" makes transformers look
    for a "mistral" architecture in gguf-py, which has none (transformers 5.17 to 5.24, gguf 0.19):
    a StructPruneError, not a raw NotImplementedError; a reader that handles it must give Mistral."""
    from tiny_gguf import GGUF_FAMILIES, write_gguf

    from structprune import load_model
    from structprune.errors import StructPruneError

    dense = GGUF_FAMILIES["mistral"]()
    path = write_gguf(dense, tmp_path / "mistral.gguf", name="mistral")
    try:
        model, _ = load_model(str(path))
    except StructPruneError as exc:
        assert "GGUF reader cannot read" in str(exc)
        return
    assert model.config.model_type == "mistral"
    ids = calib_ids(2, 12)
    max_diff(logits(dense, ids), logits(model, ids), "mistral-named GGUF vs source")


def test_gemma3_streamed_perplexity_from_disk_equals_in_memory(tmp_path):
    """Perplexity of a Gemma 3 multimodal checkpoint streamed from disk one layer at a time (the
    evaluation of `prune` and `evaluate_checkpoint`) equals the in-memory model's; the hidden size it
    budgets windows by comes from the nested text config."""
    from structprune.eval.perplexity import perplexity_from_ids
    from structprune.eval.streamed import streamed_perplexity

    dense = FAMILIES["gemma3"]()
    dense.save_pretrained(tmp_path, max_shard_size="50KB")
    ids = calib_ids(7, 16, seed=3).reshape(-1)
    want = perplexity_from_ids(dense, ids, 16, limit=6, batch_size=2, progress=False)
    skeleton, reader = load_skeleton(tmp_path)
    got, _ = streamed_perplexity(skeleton, reader, get_adapter(skeleton), ids, 16, limit=6, batch_size=2,
                                 progress=False, ram_budget=2 * 2 * 16 * 48 * 4)
    assert got.nwindows == want.nwindows and got.ppl == pytest.approx(want.ppl, rel=1e-5)
