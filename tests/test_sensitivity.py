"""Sensitivities (engine/sensitivity.py): per-position gradient energy equal to whole-model
back-propagation, float32 whatever the model's dtype, the estimator's reductions on hand-built
energies, batching independence, and clear errors for NaN or zero sensitivities."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import calib_ids, tiny_llama

from structprune.adapters import get_adapter
from structprune.engine import capture_first_layer_inputs
from structprune.engine.sensitivity import (
    Float32Module,
    effective_skip,
    gradient_energy,
    module_sensitivities,
    reduce_energy,
    trimmed_mean,
)
from structprune.errors import StructPruneError

CPU = torch.device("cpu")


def _energy(model, ids, batch_size=2, **kw):
    adapter = get_adapter(model)
    inputs = capture_first_layer_inputs(model, adapter, ids, CPU, batch_size=batch_size)
    return gradient_energy(model, adapter, inputs, ids, CPU, progress=False, **kw)


def _reference_energy(model, ids):
    """Whole model, autograd, loss = sum over windows of each window's mean token NLL: the
    squared gradient norm at every attention and MLP output, per window and position."""
    adapter = get_adapter(model)
    out = {}
    hooks = []
    for i, layer in enumerate(adapter.layers()):
        for key, mod in (("attn", adapter.attn_linears(layer)[1]), ("mlp", adapter.mlp_linears(layer)[1])):
            def fw(m, a, y, key=(i, key)):
                y.register_hook(lambda g: out.__setitem__(key, g.double().pow(2).sum(-1)))
            hooks.append(mod.register_forward_hook(fw))
    try:
        logits = model(ids).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        (nll / (ids.shape[1] - 1)).backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    return out


def test_per_position_energy_equals_whole_model_backward(one_torch_thread):
    model = tiny_llama(layers=3)
    ids = calib_ids(4, 16)
    energy, widths = _energy(model, ids, checkpoint_every=2)
    ref = _reference_energy(model, ids)
    for i in range(3):
        for m in ("attn", "mlp"):
            assert energy[i][m].shape == (4, 16) and energy[i][m].dtype == torch.float64
            torch.testing.assert_close(energy[i][m], ref[(i, m)], rtol=1e-4, atol=1e-12)
            assert widths[i][m] == model.config.hidden_size
    # The last position's output feeds no loss term: its gradient is exactly zero.
    assert all(float(energy[i][m][:, -1].abs().max()) == 0.0 for i in range(3) for m in ("attn", "mlp"))


def test_a_tokens_gradient_does_not_depend_on_the_chunking(one_torch_thread):
    model = tiny_llama(layers=2)
    ids = calib_ids(4, 16)
    one, _ = _energy(model, ids, batch_size=1)
    four, _ = _energy(model, ids, batch_size=4)
    for a, b in zip(one, four):
        for m in ("attn", "mlp"):
            torch.testing.assert_close(a[m], b[m], rtol=1e-4, atol=1e-12)


def test_reduce_energy_known_answers():
    # Window w, position t: energy = 1 everywhere except position 0 (1000) and one outlying window.
    e = torch.ones(8, 16, dtype=torch.float64)
    e[:, 0] = 1000.0
    e[3] = 50.0
    width = 4
    plain = reduce_energy(e, width, skip_positions=0, trim=0.0)
    assert plain == pytest.approx(float(e.mean()) / width)
    # Skipping position 0 removes the sink; the outlying window still counts without trimming.
    assert reduce_energy(e, width, skip_positions=1, trim=0.0) == pytest.approx((7 * 1 + 50) / 8 / width)
    # Trimming 1/8 of the windows at each end drops it (and one ordinary window from below).
    assert reduce_energy(e, width, skip_positions=1, trim=0.125) == pytest.approx(1.0 / width)
    assert trimmed_mean(torch.tensor([5.0, 1.0, 2.0, 100.0]), 0.25) == pytest.approx(3.5)
    assert trimmed_mean(torch.tensor([5.0, 1.0, 2.0]), 0.25) == pytest.approx(8 / 3)  # floor(0.75) = 0 trimmed
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean(torch.ones(4), 0.5)


def test_skip_is_capped_at_a_quarter_of_the_window():
    assert effective_skip(16, 2048) == 16 and effective_skip(16, 512) == 16
    assert effective_skip(16, 24) == 6 and effective_skip(0, 24) == 0
    with pytest.raises(ValueError):
        effective_skip(-1, 64)


def test_sensitivities_are_the_reduced_energies(one_torch_thread):
    model = tiny_llama(layers=2)
    ids = calib_ids(8, 32)
    adapter = get_adapter(model)
    inputs = capture_first_layer_inputs(model, adapter, ids, CPU, batch_size=2)
    sens = module_sensitivities(model, adapter, inputs, ids, CPU, progress=False, skip_positions=4, trim=0.125)
    energy, widths = _energy(model, ids)
    for i in range(2):
        for m in ("attn", "mlp"):
            assert sens[i][m] == pytest.approx(reduce_energy(energy[i][m], widths[i][m], 4, 0.125), rel=1e-12)
            assert math.isfinite(sens[i][m]) and sens[i][m] > 0


def test_half_precision_weights_are_differentiated_in_float32(one_torch_thread):
    """A bf16 model's sensitivities equal those of a float32 model holding the same (rounded)
    weights: the pass runs on float32 copies, so only the weights' values matter."""
    bf16 = tiny_llama(layers=3).to(torch.bfloat16)
    fp32 = tiny_llama(layers=3)
    fp32.load_state_dict({k: v.float() for k, v in bf16.state_dict().items()})
    ids = calib_ids(4, 32)
    e16, _ = _energy(bf16, ids)
    e32, _ = _energy(fp32, ids)
    for a, b in zip(e16, e32):
        for m in ("attn", "mlp"):
            # The first-layer inputs and rotary tables of the bf16 model are bf16 (captured before the pass).
            torch.testing.assert_close(a[m], b[m], rtol=2e-2, atol=1e-10)
    # And the model itself is left as it was: bf16 weights, gradient flags restored.
    assert all(p.dtype == torch.bfloat16 and p.requires_grad for p in bf16.parameters())


def test_float32_module_leaves_the_module_untouched():
    layer = torch.nn.Linear(4, 3).to(torch.bfloat16)
    wrapped = Float32Module(layer)
    y = wrapped(torch.ones(2, 4, dtype=torch.bfloat16))
    assert y.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    ref = torch.ones(2, 4) @ layer.weight.float().T + layer.bias.float()
    torch.testing.assert_close(y, ref)


def test_nan_weights_name_the_layer_and_tensor(one_torch_thread):
    """A NaN weight is refused when its layer is read, naming it, before it can turn into a NaN
    gradient further down (the gradient guard stays for what the weights check cannot see)."""
    model = tiny_llama(layers=3)
    with torch.no_grad():
        adapter = get_adapter(model)
        adapter.mlp_linears(adapter.layers()[1])[1].weight[0, 0] = float("nan")
    ids = calib_ids(2, 16)
    inputs = capture_first_layer_inputs(model, adapter, ids, CPU)
    with pytest.raises(StructPruneError, match=r"layer 1: mlp\.down_proj\.weight holds NaN or Inf weights"):
        module_sensitivities(model, adapter, inputs, ids, CPU, progress=False)


def test_nonfinite_gradient_names_the_layer_and_module(one_torch_thread):
    model = tiny_llama(layers=3)
    with torch.no_grad():
        model.get_output_embeddings().weight[0, 0] = float("inf")  # finite layers, infinite LM head
    adapter = get_adapter(model)
    ids = calib_ids(2, 16)
    inputs = capture_first_layer_inputs(model, adapter, ids, CPU)
    with pytest.raises(StructPruneError, match=r"sensitivity of layer \d (attn|mlp) is not finite"):
        module_sensitivities(model, adapter, inputs, ids, CPU, progress=False)


def test_zero_gradient_is_an_error_not_a_weight(one_torch_thread):
    model = tiny_llama(layers=2)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # constant logits: no gradient reaches any module
    adapter = get_adapter(model)
    ids = calib_ids(2, 16)
    inputs = capture_first_layer_inputs(model, adapter, ids, CPU)
    with pytest.raises(StructPruneError, match=r"sensitivity of layer 0 attn is 0.0 \(not positive\)"):
        module_sensitivities(model, adapter, inputs, ids, CPU, progress=False)


def test_head_loss_in_position_slices_gives_the_whole_losss_gradient(one_torch_thread):
    """The LM-head loss is back-propagated over slices of positions (a 128k vocabulary would
    otherwise hold GiBs of logits): the gradient at the last boundary is the unsliced one."""
    from structprune.engine.sensitivity import Float32Module, _head_loss, head_loss_backward

    model = tiny_llama(layers=1)
    adapter = get_adapter(model)
    head = [Float32Module(m) for m in adapter.head_modules()]
    ids = calib_ids(3, 20)
    h = torch.randn(3, 20, model.config.hidden_size)
    whole = h.clone().requires_grad_(True)
    _head_loss(head, whole, ids).backward()
    sliced = h.clone().requires_grad_(True)
    vocab = model.config.vocab_size
    head_loss_backward(head, sliced, ids, vocab, slice_bytes=3 * vocab * 4 * 3)  # 3 positions per slice
    torch.testing.assert_close(sliced.grad, whole.grad, rtol=1e-5, atol=1e-8)
    assert sliced.grad[:, -1].abs().max() == 0  # the last position predicts nothing
