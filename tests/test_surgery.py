"""Physically pruned model == unpruned model with the same structures masked out."""

import copy
import random

import pytest
import torch
from tiny import FACTORIES, calib_ids

from structprune.adapters import LayerPlan, get_adapter
from structprune.surgery import apply_layer_plan, mask_layer_plan
from structprune.surgery.slicing import validate_plan


def random_plan(adapter, layer, rng: random.Random) -> LayerPlan:
    shape = adapter.attention_shape(layer)
    g = rng.randint(1, shape.num_kv_heads)
    m = rng.randint(1, shape.group_size)
    groups = sorted(rng.sample(range(shape.num_kv_heads), g))
    heads = sorted(k * shape.group_size + h for k in groups for h in rng.sample(range(shape.group_size), m))
    n = adapter.mlp_shape(layer).channels
    channels = sorted(rng.sample(range(n), rng.randint(1, n)))
    return LayerPlan(heads, groups, channels)


@pytest.mark.parametrize("family", sorted(FACTORIES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sliced_equals_masked(family, seed):
    model = FACTORIES[family]()
    masked = copy.deepcopy(model)
    adapter, madapter = get_adapter(model), get_adapter(masked)
    rng = random.Random(seed)
    for layer, mlayer in zip(adapter.layers(), madapter.layers()):
        plan = random_plan(adapter, layer, rng)
        apply_layer_plan(adapter, layer, plan)
        mask_layer_plan(madapter, mlayer, plan)
    ids = calib_ids(3, 20)
    with torch.no_grad():
        a, b = model(ids).logits, masked(ids).logits
    diff = (a - b).abs()
    assert diff.max() < 1e-4, f"max {diff.max():.3g} mean {diff.mean():.3g}"
    # The cut really removed parameters.
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in masked.parameters())


def test_opt_needs_head_count_update():
    """The pitfall: slicing OPT projections without updating num_heads silently breaks logits."""
    model = FACTORIES["opt"]()
    adapter = get_adapter(model)
    layer = adapter.layers()[0]
    masked = copy.deepcopy(model)
    plan = LayerPlan([0, 2], [0, 2], list(range(adapter.mlp_shape(layer).channels)))
    apply_layer_plan(adapter, layer, plan)
    mask_layer_plan(get_adapter(masked), get_adapter(masked).layers()[0], plan)
    assert layer.self_attn.num_heads == 2
    ids = calib_ids(2, 12)
    with torch.no_grad():
        assert (model(ids).logits - masked(ids).logits).abs().max() < 1e-4
        good = model(ids).logits
        layer.self_attn.num_heads = 4  # undo the bookkeeping: still runs, silently wrong
        assert (model(ids).logits - good).abs().max() > 1e-2


def test_invalid_plans_rejected():
    model = FACTORIES["llama-gqa"]()  # 6 heads in 2 groups of 3
    adapter = get_adapter(model)
    layer = adapter.layers()[0]
    ch = [0, 1]
    with pytest.raises(ValueError, match="same number"):
        validate_plan(adapter, layer, LayerPlan([0, 1, 3], [0, 1], ch))
    with pytest.raises(ValueError, match="KV group"):
        validate_plan(adapter, layer, LayerPlan([0, 3], [0], ch))
    with pytest.raises(ValueError):
        validate_plan(adapter, layer, LayerPlan([0], [0], []))
