"""Per-module sensitivities from a streamed backward pass (method.md, global coordination).

How much does a unit of distortion added to a module's output move the language-model
loss? With ``g`` the gradient of the loss with respect to the module's output, a small
distortion ``delta`` changes the loss to second order by about ``E[(g . delta)^2]``
(Fisher), i.e. ``E|g|^2 / d`` per unit of isotropic distortion. We get ``g`` for every
module without the whole model on the device:

1. forward, one layer at a time, keeping the residual stream at every ``k``-th layer
   boundary (checkpoints, ``k = ceil(sqrt(L))``) and the boundaries of the last segment;
2. the loss's gradient at the last boundary through the final norm and LM head;
3. backward, one layer at a time from the last, recomputing the layer's forward from its
   saved input and back-propagating the incoming gradient; hooks read the gradients at
   the attention and MLP outputs, the input gradient is passed to the layer before.
   Entering a segment from above, its boundaries are recomputed from its checkpoint.

Why checkpoints rather than every boundary on disk: keeping all ``L + 1`` boundaries makes
memory grow with depth (a 7B model, 128 x 2048 tokens, fp16: 33 x 2.1 GB), and spilling
them only moves that growth to the disk (70 GB, more than many machines have free). With
checkpoints at most ``ceil(L / k) + k + 2`` boundaries (gradients included) are alive at
once, ``O(sqrt(L))`` (14 instead of 35 for 32 layers), for one more forward of each
layer outside the last segment. The boundaries are activation stores, so the activation
budget still decides what of those stays in RAM and what goes to disk. Recomputation runs
the same layer on the same stored bits, so the sensitivities are exactly those obtained
with every boundary kept (``checkpoint_every=1``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..adapters import Adapter
from ..errors import StructPruneError
from .activations import ActivationStore
from .capture import LayerInputs, layer_kwargs, run_layer, to_device
from .residency import LayerStore, SwapLayerStore, moved_to


def _head_loss(adapter: Adapter, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    x = h
    for m in adapter.head_modules():
        x = m(x)
    logits = x[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def checkpoint_interval(num_layers: int) -> int:
    """``ceil(sqrt(L))``: minimises checkpoints plus one segment's boundaries, ``L/k + k``."""
    return math.isqrt(max(num_layers, 1) - 1) + 1


def module_sensitivities(model, adapter: Adapter, inputs: LayerInputs, calib: torch.Tensor, device,
                         swap: bool = False, progress: bool = True,
                         checkpoint_every: int | None = None, store_factory=None) -> list[dict[str, float]]:
    """``[{"attn": s, "mlp": s}, ...]`` per layer: mean squared gradient norm per token and
    feature at each module's output, for the LM loss on the windows of ``inputs``.

    ``checkpoint_every``: layers between kept boundaries (default ``ceil(sqrt(L))``; 1 keeps
    every boundary and recomputes nothing)."""
    device = torch.device(device)
    layers = adapter.layers()
    num = len(layers)
    k = checkpoint_every or checkpoint_interval(num)
    if k < 1:
        raise ValueError(f"checkpoint_every must be a positive number of layers, got {k}")
    # store_factory(layers, device) and its resident(modules, device): a model on disk (engine/homes.py).
    store = (store_factory or (SwapLayerStore if swap else LayerStore))(layers, device)
    resident = getattr(store_factory, "resident", None)
    grads_on = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    ckpt: dict[int, LayerInputs] = {0: inputs}  # boundary j (input of layer j) for j % k == 0
    seg: dict[int, LayerInputs] = {}  # the other boundaries of the segment at hand
    grads, final = None, inputs  # final: the last boundary (the inputs when there are no layers)

    def forward(i: int, h: LayerInputs) -> LayerInputs:
        layer = store.fetch(i)
        try:
            return run_layer(layer, h, device)
        finally:
            store.release(i)

    try:
        # 1. forward, keeping checkpoints and the current segment's boundaries.
        h = inputs
        for i in tqdm(range(num), desc="sensitivity fwd", disable=not progress):
            h = forward(i, h)
            if i + 1 == num:
                final = h
            elif (i + 1) % k == 0:
                _close_all(seg)  # recomputed in the backward sweep
                ckpt[i + 1] = h
            else:
                seg[i + 1] = h
        h = None
        # 2. gradient of the loss at the last boundary; head modules go to the device.
        head = adapter.head_modules()
        with resident(head, device) if resident else moved_to(head, device):
            grads, start = ActivationStore(), 0
            for x in final.hidden:
                ids = calib[start:start + x.shape[0]].to(device)
                start += x.shape[0]
                with torch.enable_grad():
                    x = x.to(device, final.hidden.source_dtype or x.dtype).detach().requires_grad_(True)
                    _head_loss(adapter, x, ids).backward()
                grads.append(x.grad)
        if final is not inputs:
            final.close()
        final = None
        # 3. backward, one layer at a time.
        out = [None] * num
        for i in tqdm(reversed(range(num)), total=num, desc="sensitivity bwd", disable=not progress):
            s = i - i % k
            if i > s and i not in seg:  # entering segment [s, s + k) from above: recompute it
                h = ckpt[s]
                for j in range(s, i):
                    h = seg[j + 1] = forward(j, h)
                h = None
            b = seg.pop(i) if i > s else ckpt.pop(s)
            layer = store.fetch(i)
            try:
                out[i], new_grads = _layer_backward(adapter, layer, b, grads, device)
            finally:
                store.release(i)
            _check_finite(out[i], i, new_grads)
            grads.close()
            grads = new_grads
            if b is not inputs:
                b.close()  # free it now, not at garbage collection
        return out
    finally:
        for b in (*ckpt.values(), *seg.values(), final):
            if b is not None and b is not inputs:
                b.close()
        if grads is not None:
            grads.close()
        store.finish()
        for p, g in zip(model.parameters(), grads_on):
            p.requires_grad_(g)


def _check_finite(sens: dict[str, float], i: int, new_grads) -> None:
    """A NaN/Inf or zero sensitivity would make the allocation keep (or cut) everything silently."""
    for module, v in sens.items():
        if not (math.isfinite(v) and v > 0):
            new_grads.close()
            what = "not finite" if not math.isfinite(v) else "not positive"
            raise StructPruneError(f"sensitivity of layer {i} {module} is {v} ({what}): the loss gradient reaching "
                                   "it is NaN/Inf or zero; check the model's weights (LM head, final norm, that "
                                   "layer) for NaN/Inf, or compute in float32/bfloat16 instead of float16")


def _close_all(boundaries: dict[int, LayerInputs]) -> None:
    for b in boundaries.values():
        b.close()
    boundaries.clear()


def _layer_backward(adapter: Adapter, layer, inputs: LayerInputs, grads: list[torch.Tensor], device):
    _, o = adapter.attn_linears(layer)
    down = adapter.mlp_output_module(layer)  # down_proj, or an MoE block (every expert's output)
    acc = {"attn": 0.0, "mlp": 0.0}
    count = 0
    captured = {}

    def keep(name):
        def hook(module, args, output):
            output.register_hook(lambda g: acc.__setitem__(name, acc[name] + float(g.float().pow(2).sum())))
            captured[name] = output.shape[-1]
        return hook

    handles = [o.register_forward_hook(keep("attn")), down.register_forward_hook(keep("mlp"))]
    new_grads = ActivationStore()
    try:
        for h, kw, g in zip(inputs.hidden, inputs.kwargs, grads):
            with torch.enable_grad():
                # detach: never flag (or attach a .grad to) the stored chunk itself
                x = h.to(device, inputs.hidden.source_dtype or h.dtype).detach().requires_grad_(True)
                y = layer(x, **to_device(layer_kwargs(layer, kw), device))
                y = y[0] if isinstance(y, (tuple, list)) else y
                y.backward(g.to(device, y.dtype))
            new_grads.append(x.grad)
            count += h.shape[0] * h.shape[1]
    except BaseException:
        new_grads.close()
        raise
    finally:
        for hd in handles:
            hd.remove()
    d = captured.get("attn", 1)
    return {k: v / (count * d) for k, v in acc.items()}, new_grads
