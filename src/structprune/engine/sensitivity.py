"""Per-module sensitivities from a streamed backward pass (method.md, global coordination).

How much does a unit of distortion added to a module's output move the language-model
loss? With ``g`` the gradient of the loss with respect to the module's output, a small
distortion ``delta`` changes the loss to second order by about ``E[(g . delta)^2]``
(Fisher), i.e. ``E|g|^2 / d`` per unit of isotropic distortion. We get ``g`` for every
module without the whole model on the device:

1. forward, one layer at a time, saving the residual stream at each layer boundary on CPU;
2. the loss's gradient at the last boundary through the final norm and LM head;
3. backward, one layer at a time from the last, recomputing the layer's forward from its
   saved input and back-propagating the incoming gradient; hooks read the gradients at
   the attention and MLP outputs, the input gradient is passed to the layer before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..adapters import Adapter
from .capture import LayerInputs, run_layer, to_device
from .residency import LayerStore, SwapLayerStore


def _head_loss(adapter: Adapter, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    x = h
    for m in adapter.head_modules():
        x = m(x)
    logits = x[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def module_sensitivities(model, adapter: Adapter, inputs: LayerInputs, calib: torch.Tensor, device,
                         swap: bool = False, progress: bool = True) -> list[dict[str, float]]:
    """``[{"attn": s, "mlp": s}, ...]`` per layer: mean squared gradient norm per token and
    feature at each module's output, for the LM loss on the windows of ``inputs``."""
    device = torch.device(device)
    layers = adapter.layers()
    store = (SwapLayerStore if swap else LayerStore)(layers, device)
    grads_on = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        # 1. forward, saving the boundaries.
        boundaries = [inputs]
        for i in tqdm(range(len(layers)), desc="sensitivity fwd", disable=not progress):
            layer = store.fetch(i)
            boundaries.append(run_layer(layer, boundaries[-1], device))
            store.release(i)
        # 2. gradient of the loss at the last boundary; head modules go to the device.
        head = adapter.head_modules()
        head_dev = [next(m.parameters()).device for m in head]
        for m in head:
            m.to(device)
        grads, start = [], 0
        for h in boundaries[-1].hidden:
            ids = calib[start:start + h.shape[0]].to(device)
            start += h.shape[0]
            with torch.enable_grad():
                x = h.to(device).requires_grad_(True)
                _head_loss(adapter, x, ids).backward()
            grads.append(x.grad.cpu())
        for m, d in zip(head, head_dev):
            m.to(d)
        # 3. backward, one layer at a time.
        out = [None] * len(layers)
        for i in tqdm(reversed(range(len(layers))), total=len(layers), desc="sensitivity bwd",
                      disable=not progress):
            layer = store.fetch(i)
            out[i], grads = _layer_backward(adapter, layer, boundaries[i], grads, device)
            store.release(i)
            boundaries[i + 1] = None  # free CPU memory as we go
        return out
    finally:
        store.finish()
        for p, g in zip(model.parameters(), grads_on):
            p.requires_grad_(g)


def _layer_backward(adapter: Adapter, layer, inputs: LayerInputs, grads: list[torch.Tensor], device):
    _, o = adapter.attn_linears(layer)
    _, down = adapter.mlp_linears(layer)
    acc = {"attn": 0.0, "mlp": 0.0}
    count = 0
    captured = {}

    def keep(name):
        def hook(module, args, output):
            output.register_hook(lambda g: acc.__setitem__(name, acc[name] + float(g.float().pow(2).sum())))
            captured[name] = output.shape[-1]
        return hook

    handles = [o.register_forward_hook(keep("attn")), down.register_forward_hook(keep("mlp"))]
    new_grads = []
    try:
        for h, kw, g in zip(inputs.hidden, inputs.kwargs, grads):
            with torch.enable_grad():
                x = h.to(device).requires_grad_(True)
                y = layer(x, **to_device(kw, device))
                y = y[0] if isinstance(y, (tuple, list)) else y
                y.backward(g.to(device, y.dtype))
            new_grads.append(x.grad.cpu())
            count += h.shape[0] * h.shape[1]
    finally:
        for hd in handles:
            hd.remove()
    d = captured.get("attn", 1)
    return {k: v / (count * d) for k, v in acc.items()}, new_grads
