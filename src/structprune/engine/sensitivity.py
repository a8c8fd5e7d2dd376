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
with every boundary kept (``checkpoint_every=1``). Recomputing is not free (with ``k = sqrt(L)``
about three quarters of a float32 forward pass), so by default the interval is the smallest
whose boundaries fit the activation budget's free RAM plus half the scratch disk's free space
(:func:`fitting_interval`): every boundary when they fit (those beyond the RAM budget spill to
disk like any store), the square root when they do not. RAM stays within the budget either
way, and the bits are the same.

**Float32 whatever the model's dtype.** Every layer and the head run on float32 copies of
their weights (one layer's worth, made while the layer is resident; nothing for a float32
model), the boundaries and gradients are float32, and squared gradients are summed in
float64. A bfloat16 model's gradients back-propagated in bfloat16 carry 8 mantissa bits
through 30+ layers; the sensitivities then measured the rounding as much as the weights
(up to 70x between the fp32 and bf16 copies of SmolLM2, issue 11). Boundaries of a half
precision model take twice the memory of the model dtype (they are activation stores: the
budget spills them as usual).

**The estimator.** The gradient energy is kept per window and position
(:func:`gradient_energy`), then reduced by :func:`reduce_energy`: the first
``skip_positions`` positions of every window are left out (in one SmolLM2 calibration draw,
one window's first two positions carried 99% of its layer-0 attention-output energy, 300x
what each other window had in all, and that figure moved 29x when the weights were rounded
to bf16: the estimate depended on which token opened a window; with position 0 alone skipped,
position 1 still made fp32 and bf16 weights disagree 5.4x), the per-window means are combined
by a symmetric ``trim`` trimmed mean (one outlying window cannot decide a module's weight),
and the result is divided by the module's output width. The defaults (skip 4, trim 1/8) were
chosen by ``benchmarks/sensitivity_agreement.py`` (agreement between disjoint calibration
subsets and between fp32 and bf16 weights, ``benchmarks/results/sensitivity_agreement*.md``).
The loss is the sum over windows of each window's mean token NLL, so a token's gradient does
not depend on how many windows share a chunk.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from ..adapters import Adapter
from ..errors import StructPruneError
from . import distributed
from .activations import ActivationStore, current_budget
from .capture import LayerInputs, layer_kwargs, run_layer, to_device
from .stream import check_finite_weights
from .residency import LayerStore, SwapLayerStore, moved_to

log = logging.getLogger(__name__)

# Chosen by benchmarks/sensitivity_agreement.py on SmolLM2-135M (docs/experiments.md, issue 11): with
# two disjoint 8x512 C4 subsets the largest module ratio (common scale removed) fell from 31.2 (old
# estimator) to 1.11, and between fp32 and bf16 weights from 24.9 to 1.01. Skipping 4 positions alone
# fixes the dtype disagreement (1.00) but leaves 1.27 between subsets; trimming one window of eight at
# each end alone leaves 1.04 between dtypes; larger skips (16, 64) were no better.
SKIP_POSITIONS = 4
TRIM = 0.125
# Never skip more than this fraction of a window: short windows (tests, toy runs) keep most positions.
MAX_SKIP_FRACTION = 0.25
MODULES = ("attn", "mlp")


class Float32Module:
    """Calls ``module`` on float32 copies of its floating-point weights and buffers, with its
    floating inputs cast to float32; the module itself is not modified (hooks on its
    submodules still fire). For a float32 module the copies are the tensors themselves."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.tensors = {name: t.float() if t.is_floating_point() else t
                        for name, t in (*module.named_parameters(), *module.named_buffers())}

    def __call__(self, *args, **kwargs):
        return functional_call(self.module, self.tensors, float32_tensors(args), float32_tensors(kwargs))


def float32_tensors(obj):
    """``obj`` with every floating tensor inside nested tuples/lists/dicts cast to float32
    (an additive attention mask must match float32 queries in scaled-dot-product attention)."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(float32_tensors(o) for o in obj)
    if isinstance(obj, list):
        return [float32_tensors(o) for o in obj]
    if isinstance(obj, dict):
        return {k: float32_tensors(v) for k, v in obj.items()}
    return obj


def _head_loss(head: list[Float32Module], h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum over the windows of ``h`` of each window's mean next-token NLL, in float32."""
    x = h
    for m in head:
        x = m(x)
    logits = x[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    return nll / (ids.shape[1] - 1)


# Logits of one slice of positions at most this large: a 128k vocabulary at 2048 positions is 1 GiB
# of float32 logits per window, and the softmax and its gradient double or triple it.
HEAD_SLICE_BYTES = 64 * 2**20


def head_loss_backward(head: list[Float32Module], x: torch.Tensor, ids: torch.Tensor, vocab: int,
                       slice_bytes: int = HEAD_SLICE_BYTES) -> None:
    """Back-propagate :func:`_head_loss` of ``x`` (a leaf requiring grad) into ``x.grad``, over slices
    of positions whose logits stay under ``slice_bytes``. The final norm, soft-capping and LM head
    act on each position alone, so the slices' gradients are the whole loss's, exactly."""
    n, L = ids.shape
    step = max(1, slice_bytes // max(1, n * vocab * 4))
    for a in range(0, L - 1, step):
        b = min(a + step, L - 1)
        y = x[:, a:b]
        for m in head:
            y = m(y)
        nll = F.cross_entropy(y.float().reshape(-1, y.shape[-1]), ids[:, a + 1:b + 1].reshape(-1), reduction="sum")
        (nll / (L - 1)).backward()


def checkpoint_interval(num_layers: int) -> int:
    """``ceil(sqrt(L))``: minimises checkpoints plus one segment's boundaries, ``L/k + k``."""
    return math.isqrt(max(num_layers, 1) - 1) + 1


def boundaries_alive(num_layers: int, k: int) -> int:
    """Stores :func:`gradient_energy` holds at once besides its inputs with checkpoints every ``k``
    layers: the other checkpoints, one segment's boundaries, the last boundary, and two gradients."""
    return math.ceil(num_layers / k) - 1 + (k - 1) + 1 + 2


def recomputed_layers(num_layers: int, k: int) -> int:
    """Layer forwards the backward sweep runs again with checkpoints every ``k`` layers: each segment
    but the last (whose boundaries are still held), less its checkpointed first layer."""
    return (math.ceil(num_layers / k) - 1) * (k - 1)


def fitting_interval(num_layers: int, boundary_bytes: int, free_bytes: float) -> int:
    """The checkpoint interval that recomputes least while its boundaries fit ``free_bytes`` (the
    activation budget's :meth:`~structprune.engine.activations.ActivationBudget.room`: free RAM
    within the budget, then half the scratch disk's free space): the smallest ``k`` up to
    ``ceil(sqrt(L))`` (which holds fewest) whose :func:`boundaries_alive` fit; ``ceil(sqrt(L))`` when
    none does. Every boundary kept (``k = 1``) recomputes no forward: at 32 layers the square root
    interval recomputes 25 of them, three quarters of a forward pass in float32, while writing and
    reading the boundaries beyond the RAM budget is a sequential pass over a few GB of disk."""
    top = checkpoint_interval(num_layers)
    for k in range(1, top):
        if boundaries_alive(num_layers, k) * boundary_bytes <= free_bytes:
            return k
    return top


def effective_skip(skip_positions: int, seqlen: int) -> int:
    """Positions actually left out of windows of ``seqlen``: ``skip_positions``, at most a
    quarter of the window."""
    if skip_positions < 0:
        raise ValueError(f"skip_positions must be >= 0, got {skip_positions}")
    return min(int(skip_positions), int(MAX_SKIP_FRACTION * seqlen))


def trimmed_mean(values: torch.Tensor, trim: float) -> float:
    """Mean of ``values`` (1-D) without the ``floor(trim * n)`` smallest and as many largest."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    v = values.double().sort().values
    cut = int(math.floor(trim * v.numel()))
    kept = v[cut:v.numel() - cut]
    return float(kept.mean())


def reduce_energy(energy: torch.Tensor, width: int, skip_positions: int = SKIP_POSITIONS,
                  trim: float = TRIM) -> float:
    """Sensitivity of one module from its gradient energy ``[windows, seqlen]`` (the squared
    gradient norm at its output, summed over the ``width`` output features): the ``trim``
    trimmed mean over windows of the mean over positions ``>= skip`` (see
    :func:`effective_skip`), per output feature. ``skip_positions=0, trim=0`` is the plain
    mean over every token, the estimator used before issue 11."""
    skip = effective_skip(skip_positions, energy.shape[1])
    per_window = energy[:, skip:].double().mean(dim=1)
    return trimmed_mean(per_window, trim) / width


def module_sensitivities(model, adapter: Adapter, inputs: LayerInputs, calib: torch.Tensor, device,
                         swap: bool = False, progress: bool = True, checkpoint_every: int | None = None,
                         store_factory=None, skip_positions: int = SKIP_POSITIONS,
                         trim: float = TRIM, timings: dict | None = None,
                         windows: tuple[list[int], int] | None = None, details: dict | None = None,
                         recorded: BoundaryRecorder | None = None) -> list[dict[str, float]]:
    """``[{"attn": s, "mlp": s}, ...]`` per layer: the squared gradient norm per token and
    output feature at each module's output for the LM loss on the windows of ``inputs``,
    reduced by :func:`reduce_energy` (``skip_positions``, ``trim``). Raises
    :class:`StructPruneError` naming the layer and module when one is not finite and positive.

    ``checkpoint_every``: layers between kept boundaries (default :func:`fitting_interval`: every
    boundary when they fit the activation budget's room, its free RAM then half the scratch disk,
    else fewer, at most ``ceil(sqrt(L))`` layers apart; 1 keeps every boundary and recomputes
    nothing; the same bits either way);
    ``timings``, ``details``, ``recorded``: as in :func:`gradient_energy`.

    ``windows``: in a distributed run, ``(global indices of this rank's windows, total windows)``:
    each rank back-propagates its own windows (a window's energy does not depend on the others),
    then every rank gathers all windows' energies in window order and reduces them alike."""
    energy, widths = gradient_energy(model, adapter, inputs, calib, device, swap=swap, progress=progress,
                                     checkpoint_every=checkpoint_every, store_factory=store_factory,
                                     timings=timings, details=details, recorded=recorded)
    if windows is not None and distributed.is_distributed():
        index, total = windows
        energy = [{m: distributed.gather_rows(e[m], index, total) for m in MODULES} for e in energy]
        every = distributed.gather_objects(widths)  # a rank with no windows saw no widths
        widths = [next(w[i] for w in every if w[i]) for i in range(len(widths))]
    out = []
    for i, (e, w) in enumerate(zip(energy, widths)):
        sens = {m: reduce_energy(e[m], w[m], skip_positions, trim) for m in MODULES}
        check_sensitivity(sens, i)
        out.append(sens)
    return out


def check_sensitivity(sens: dict[str, float], layer: int) -> None:
    """A NaN/Inf or zero sensitivity would make the allocation keep (or cut) everything silently."""
    for module, v in sens.items():
        if not (math.isfinite(v) and v > 0):
            what = "not finite" if not math.isfinite(v) else "not positive"
            raise StructPruneError(f"sensitivity of layer {layer} {module} is {v} ({what}): the loss gradient "
                                   "reaching it is NaN/Inf or zero; check the model's weights (LM head, final norm, "
                                   "that layer) for NaN/Inf")


def default_interval(num_layers: int, inputs: LayerInputs) -> int:
    """The checkpoint interval :func:`gradient_energy` uses by default for ``inputs`` (the windows it
    back-propagates): :func:`fitting_interval` of their float32 boundaries in the activation
    budget's current room."""
    boundary = 4 * sum(h.numel() for h in inputs.hidden)  # float32, whatever the inputs' dtype
    k = fitting_interval(num_layers, boundary, current_budget().room(distributed.local_world_size()))
    log.info("sensitivities: a checkpoint every %d layers (%d boundaries of %.1f MiB alive at most)",
             k, boundaries_alive(num_layers, k), boundary / 2**20)
    return k


class BoundaryRecorder:
    """The dense boundaries the backward sweep starts from, recorded by a forward pass that runs
    anyway (StructPrune's profiling pass, over every calibration window) instead of the sweep's own
    forward: one forward of every layer fewer (11% of SmolLM2's prune at 8x512, about 8% of a layer's
    time at the 7B shape; docs/experiments.md).

    The sweep's forward runs each layer on float32 copies of its weights (:class:`Float32Module`);
    where the layer's floating tensors and the stored outputs already are float32, those copies are
    the tensors themselves and the two forwards are the same computation on the same bits. Anything
    else (a half-precision or mixed model, reduced-precision stores) discards the recording, and so
    does a layer seen out of order (a resumed pass starts late; one read back whole from the journal
    records nothing): :func:`gradient_energy` then runs its own forward, so the sensitivities are the
    same bits either way (tests/test_structprune.py: ``records_the_sensitivity_sweeps_forward``).

    ``record(i, layer, outputs)`` after layer ``i``'s forward over all chunks: the first ``chunks``
    (the windows back-propagated) are copied into the boundary ``i + 1``, kept by the rule of
    :func:`gradient_energy`'s forward (checkpoints every ``every`` layers, the current segment's other
    boundaries, the last one)."""

    def __init__(self, num_layers: int, every: int, chunks: int):
        if every < 1:
            raise ValueError(f"checkpoint_every must be a positive number of layers, got {every}")
        self.num, self.every, self.chunks = num_layers, every, chunks
        self.ckpt: dict[int, LayerInputs] = {}
        self.seg: dict[int, LayerInputs] = {}
        self.final: LayerInputs | None = None
        self.next = 0
        self.valid = True

    @staticmethod
    def same_as_float32(layer, outputs: LayerInputs) -> bool:
        """Whether :class:`Float32Module` would run ``layer`` on these very tensors and store alike."""
        floats = [t for t in (*layer.parameters(), *layer.buffers()) if t.is_floating_point()]
        stored = outputs.hidden.dtype or outputs.hidden.source_dtype  # a store without a dtype keeps the chunks'
        return (all(t.dtype == torch.float32 for t in floats) and stored == torch.float32
                and outputs.hidden.source_dtype in (None, torch.float32))

    def record(self, i: int, layer, outputs: LayerInputs) -> None:
        if not self.valid:
            return
        if i != self.next or not self.same_as_float32(layer, outputs):
            self.discard()
            return
        b = LayerInputs(outputs.hidden[:self.chunks].clone(), outputs.kwargs[:self.chunks])
        j = self.next = i + 1
        if j == self.num:
            self.final = b
        elif j % self.every == 0:
            _close_all(self.seg)  # the sweep recomputes a segment it enters from above
            self.ckpt[j] = b
        else:
            self.seg[j] = b

    @property
    def complete(self) -> bool:
        return self.valid and self.next == self.num

    def discard(self) -> None:
        """Release what was recorded; :func:`gradient_energy` will run its own forward."""
        self.valid = False
        self.close()

    def close(self) -> None:
        _close_all(self.ckpt)
        _close_all(self.seg)
        if self.final is not None:
            self.final.close()
            self.final = None


def gradient_energy(model, adapter: Adapter, inputs: LayerInputs, calib: torch.Tensor, device,
                    swap: bool = False, progress: bool = True, checkpoint_every: int | None = None,
                    store_factory=None, timings: dict | None = None, details: dict | None = None,
                    recorded: BoundaryRecorder | None = None
                    ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, int]]]:
    """``(energy, widths)``: per layer, ``{"attn": E, "mlp": E}`` with ``E[w, t]`` the squared
    norm (float64, summed over output features) of the loss gradient at the module's output
    for window ``w``, position ``t``; and each module's output width. Computed in float32
    whatever the model's dtype (module docstring). Non-finite gradients raise at once,
    naming the layer. ``timings`` (a report's ``pass -> seconds per layer``) gets the seconds of
    each layer's forward (``"sensitivity fwd"``) and backward, recomputation included
    (``"sensitivity bwd"``), both in layer order; ``details`` gets ``checkpoint_every`` (the interval
    used) and ``recomputed_layers`` (layer forwards run again in the backward sweep).

    ``recorded``: a complete :class:`BoundaryRecorder` of the same ``inputs`` (its interval is used, its
    boundaries are taken over and closed here): the forward sweep is skipped and no ``"sensitivity
    fwd"`` time is reported."""
    device = torch.device(device)
    layers = adapter.layers()
    num = len(layers)
    if recorded is not None and not (recorded.complete and recorded.num == num):
        raise ValueError("recorded boundaries must be complete and of this model's depth")
    if recorded is not None:
        k = recorded.every
    elif checkpoint_every is None:  # what the budget's RAM and scratch disk hold: recomputation costs forwards
        k = default_interval(num, inputs)
    else:
        k = checkpoint_every
    if k < 1:
        raise ValueError(f"checkpoint_every must be a positive number of layers, got {k}")
    if details is not None:
        details.update(checkpoint_every=k, recomputed_layers=recomputed_layers(num, k))
    # store_factory(layers, device) and its resident(modules, device): a model on disk (engine/homes.py).
    store = (store_factory or (SwapLayerStore if swap else LayerStore))(layers, device)
    resident = getattr(store_factory, "resident", None)
    grads_on = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    ckpt: dict[int, LayerInputs] = {0: inputs}  # boundary j (input of layer j) for j % k == 0
    seg: dict[int, LayerInputs] = {}  # the other boundaries of the segment at hand
    grads, final = None, inputs  # final: the last boundary (the inputs when there are no layers)
    if recorded is not None:  # taken over: closed by this function from here on
        ckpt.update(recorded.ckpt)
        seg.update(recorded.seg)
        final = recorded.final if recorded.final is not None else inputs
        recorded.ckpt, recorded.seg, recorded.final = {}, {}, None
    nwindows, seqlen = int(calib.shape[0]), int(calib.shape[1])
    timings = {} if timings is None else timings
    fwd_times = timings.setdefault("sensitivity fwd", []) if recorded is None else []
    bwd_times = [0.0] * num  # in layer order, like every other pass (the sweep runs from the top)

    def forward(i: int, h: LayerInputs) -> LayerInputs:
        layer = store.fetch(i)
        check_finite_weights(layer, f"layer {i}")  # before a NaN weight turns into a NaN gradient
        try:
            return run_layer(Float32Module(layer), h, device, dtype=torch.float32)
        finally:
            store.release(i)

    try:
        # 1. forward, keeping checkpoints and the current segment's boundaries (unless recorded).
        h = inputs
        sweep = range(0) if recorded is not None else tqdm(range(num), desc="sensitivity fwd", disable=not progress)
        for i in sweep:
            t0 = time.perf_counter()
            h = forward(i, h)
            fwd_times.append(time.perf_counter() - t0)
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
            head32 = [Float32Module(m) for m in head]
            out_emb = adapter.model.get_output_embeddings()
            vocab = out_emb.weight.shape[0] if out_emb is not None else adapter.model.config.get_text_config().vocab_size
            grads, start = ActivationStore(dtype=torch.float32), 0
            for x in final.hidden:
                ids = calib[start:start + x.shape[0]].to(device)
                start += x.shape[0]
                with torch.enable_grad():
                    x = x.to(device, torch.float32).detach().requires_grad_(True)
                    head_loss_backward(head32, x, ids, vocab)
                grads.append(x.grad)
            del head32
        if final is not inputs:
            final.close()
        final = None
        # 3. backward, one layer at a time.
        energy: list = [None] * num
        widths: list = [None] * num
        for i in tqdm(reversed(range(num)), total=num, desc="sensitivity bwd", disable=not progress):
            t0 = time.perf_counter()
            s = i - i % k
            if i > s and i not in seg:  # entering segment [s, s + k) from above: recompute it
                h = ckpt[s]
                for j in range(s, i):
                    h = seg[j + 1] = forward(j, h)
                h = None
            b = seg.pop(i) if i > s else ckpt.pop(s)
            layer = store.fetch(i)
            try:
                energy[i], widths[i], new_grads = _layer_backward(adapter, layer, b, grads, device,
                                                                   (nwindows, seqlen))
            finally:
                store.release(i)
            bad = [m for m in MODULES if not bool(torch.isfinite(energy[i][m]).all())]
            if bad:
                new_grads.close()
                raise StructPruneError(f"sensitivity of layer {i} {bad[0]} is not finite: the loss gradient reaching "
                                       "it is NaN/Inf; check the model's weights (LM head, final norm, that layer) "
                                       "for NaN/Inf")
            grads.close()
            grads = new_grads
            if b is not inputs:
                b.close()  # free it now, not at garbage collection
            bwd_times[i] = time.perf_counter() - t0
        timings.setdefault("sensitivity bwd", []).extend(bwd_times)
        return energy, widths
    finally:
        for b in (*ckpt.values(), *seg.values(), final):
            if b is not None and b is not inputs:
                b.close()
        if grads is not None:
            grads.close()
        store.finish()
        for p, g in zip(model.parameters(), grads_on):
            p.requires_grad_(g)


def _close_all(boundaries: dict[int, LayerInputs]) -> None:
    for b in boundaries.values():
        b.close()
    boundaries.clear()


def _layer_backward(adapter: Adapter, layer, inputs: LayerInputs, grads, device, shape: tuple[int, int]):
    """One layer's backward in float32: ``(energy, widths, input gradients)``."""
    _, o = adapter.attn_linears(layer)
    down = adapter.mlp_output_module(layer)  # down_proj, or an MoE block (every expert's output)
    energy = {m: torch.zeros(shape, dtype=torch.float64) for m in MODULES}
    widths = {}
    chunk = [0, 0]  # first window and number of windows of the chunk being back-propagated (read by the hooks)

    def keep(name):
        def hook(module, args, output):
            output = output[0] if isinstance(output, (tuple, list)) else output
            widths[name] = output.shape[-1]
            r, n = chunk

            def on_grad(g):
                # [windows, positions] whatever the module's layout (an MoE block may flatten the tokens)
                energy[name][r:r + n] += g.float().pow(2).sum(-1).reshape(n, -1).double().cpu()
            output.register_hook(on_grad)
        return hook

    handles = [o.register_forward_hook(keep("attn")), down.register_forward_hook(keep("mlp"))]
    new_grads = ActivationStore(dtype=torch.float32)
    layer32 = Float32Module(layer)
    try:
        for h, kw, g in zip(inputs.hidden, inputs.kwargs, grads):
            chunk[1] = h.shape[0]
            with torch.enable_grad():
                # detach: never flag (or attach a .grad to) the stored chunk itself
                x = h.to(device, torch.float32).detach().requires_grad_(True)
                y = layer32(x, **to_device(layer_kwargs(layer, kw), device))
                y = y[0] if isinstance(y, (tuple, list)) else y
                y.backward(g.to(device, torch.float32))
            new_grads.append(x.grad)
            chunk[0] += h.shape[0]
    except BaseException:
        new_grads.close()
        raise
    finally:
        for hd in handles:
            hd.remove()
    return energy, widths, new_grads
