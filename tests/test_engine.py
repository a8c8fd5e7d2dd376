"""The layer-streaming engine: streamed == full forward, one layer resident, statistics exact."""

import copy

import pytest
import torch
from tiny import FACTORIES, calib_ids

from structprune import api
from structprune.adapters import get_adapter
from structprune.engine import LayerStream, is_materialized


@pytest.mark.parametrize("family", sorted(FACTORIES))
@pytest.mark.parametrize("batch_size", [1, 3])
def test_streamed_equals_full_forward(family, batch_size):
    model = FACTORIES[family]()
    adapter = get_adapter(model)
    ids = calib_ids(5, 16)
    with torch.no_grad():
        full = model(ids, output_hidden_states=True).hidden_states
    inputs = None
    for ctx in LayerStream(model, adapter, ids, "cpu", batch_size=batch_size, progress=False):
        inputs = ctx.inputs
        got = torch.cat(inputs.hidden)
        assert (got - full[ctx.index]).abs().max() < 1e-5, f"layer {ctx.index} inputs differ"


def test_one_layer_resident_during_pruning():
    model = FACTORIES["llama-gqa"](layers=4)
    adapter = get_adapter(model)
    seen = []

    def spy(module, args, kwargs):
        seen.append(sum(is_materialized(l) for l in adapter.layers()))

    handles = [l.register_forward_pre_hook(spy, with_kwargs=True) for l in adapter.layers()]
    reference = copy.deepcopy(model)
    ids = calib_ids(4, 16)
    api.prune(model, ids, device="cpu", progress=False, sparsity=0.3, seqlen=16, swap_layers=True)
    for h in handles:
        h.remove()
    assert seen and max(seen) == 1, f"materialised layers seen during forwards: {sorted(set(seen))}"
    assert all(is_materialized(l) for l in adapter.layers())  # all back afterwards
    # Swapping layers in and out changes nothing in the result.
    api.prune(reference, ids, device="cpu", progress=False, sparsity=0.3, seqlen=16, swap_layers=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_statistics_match_batch_computation():
    model = FACTORIES["llama-gqa"]()
    adapter = get_adapter(model)
    ids = calib_ids(5, 16)
    z = {}
    layer0 = adapter.layers()[0]

    def grab(module, args):
        z["mlp"] = args[0].reshape(-1, args[0].shape[-1])

    h = layer0.mlp.down_proj.register_forward_pre_hook(grab)
    with torch.no_grad():
        model(ids)
    h.remove()
    for ctx in LayerStream(model, adapter, ids, "cpu", batch_size=2, progress=False):
        stats = ctx.collect()
        break
    zz = z["mlp"].double()
    s = stats["mlp"]
    assert s.count == zz.shape[0]
    assert torch.allclose(s.gram.double(), zz.T @ zz, rtol=1e-4, atol=1e-4)
    assert torch.allclose(s.zsum.double(), zz.sum(0), atol=1e-4)
    assert torch.allclose(s.variance.double(), zz.var(0), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_replayed_attention_gives_the_same_layer_outputs(family):
    """The cutting pass's last forward replays the attention's recorded outputs (ModuleReplay):
    the layer's outputs are bit for bit those of running it, and the attention does not run."""
    from structprune.engine.capture import LayerInputs, ModuleReplay, run_layer

    model = FACTORIES[family]()
    adapter = get_adapter(model)
    ctx = next(iter(LayerStream(model, adapter, calib_ids(5, 16), "cpu", batch_size=2, progress=False)))
    layer = ctx.layer
    replay = ModuleReplay(adapter.attention_module(layer))
    with replay.recording():
        want = run_layer(layer, ctx.inputs, "cpu")
    assert len(replay.store) == len(ctx.inputs.hidden) == 3
    calls = []
    (q, _, _), _ = adapter.attn_linears(layer)
    h = q.register_forward_hook(lambda *a: calls.append(1))
    try:
        with replay.replaying():
            got = run_layer(layer, ctx.inputs, "cpu")
    finally:
        h.remove()
    assert not calls, "the attention ran although its outputs were replayed"
    assert replay.store.closed and "forward" not in vars(adapter.attention_module(layer))  # its own forward is back
    for a, b in zip(want.hidden, got.hidden):
        assert torch.equal(a, b)
    h = q.register_forward_hook(lambda *a: calls.append(1))
    try:
        run_layer(layer, ctx.inputs, "cpu")  # and it runs again afterwards
    finally:
        h.remove()
    assert calls == [1, 1, 1]
    extra = ModuleReplay(adapter.attention_module(layer))
    with extra.recording():
        run_layer(layer, LayerInputs(ctx.inputs.hidden[:1], ctx.inputs.kwargs[:1]), "cpu")
    with pytest.raises(RuntimeError, match="1 outputs recorded"), extra.replaying():
        run_layer(layer, ctx.inputs, "cpu")  # three chunks against one recorded output
