"""Perplexity with one decoder layer resident: the protocol of ``eval/perplexity.py``, streamed.

The evaluation windows go through the model boundary by boundary instead of window by
window: the first-layer inputs of a group of windows are captured, every layer is
fetched from a :class:`~structprune.engine.residency.LayerStore` once for the group and
released, and the final norm and LM head give the NLL. The same function measures a
dense checkpoint on disk, a pruned model whose layers were written to its output
folder, or an ordinary in-memory model (a plain ``LayerStore``).

Memory: the hidden states of a group of windows at two layer boundaries live on CPU at
once; ``ram_budget`` sizes the groups (a 7B model at seqlen 2048 in float32 needs 32 MiB
per window per boundary). Each group reads every layer again, so larger budgets read
less.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..adapters import Adapter, get_adapter
from ..engine import distributed
from ..engine.activations import current_budget, parse_size
from ..engine.capture import capture_first_layer_inputs, run_layer
from ..engine.disk import DiskLayerStore, module_prefixes
from ..engine.residency import LayerStore, moved_to
from ..memory import default_ram_budget
from ..models.loading import model_context_length
from .perplexity import PerplexityResult, protocol_windows

log = logging.getLogger(__name__)


def _model_dtype(model) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.float32


@contextlib.contextmanager
def _on_device(store, model, modules, device):
    """Modules resident on ``device`` for the block: read from disk by a disk store, else moved."""
    if isinstance(store, DiskLayerStore):
        with store.resident(modules, device, model):
            yield
        return
    with moved_to(modules, device):
        yield


def _close(inputs) -> None:
    """Free a boundary's activations now (spilled files included) where the store supports it."""
    close = getattr(inputs, "close", None)
    if close is not None:
        close()


def _make_store(model, adapter: Adapter, source, device, dtype) -> tuple[LayerStore, bool]:
    """``(store, built_here)`` from a store, a store factory or a checkpoint reader."""
    if isinstance(source, LayerStore):
        return source, False
    if hasattr(source, "get") and hasattr(source, "names_with_prefix"):  # a CheckpointReader
        prefixes = module_prefixes(model, adapter.layers())
        return DiskLayerStore(adapter.layers(), device, source, prefixes, dtype, model=model), True
    if callable(source):  # store_factory(layers, device)
        return source(adapter.layers(), device), True
    raise TypeError(f"expected a LayerStore, a store factory or a CheckpointReader, got {type(source).__name__}")


@torch.no_grad()
def streamed_perplexity(
    model,
    source,
    adapter: Adapter | None,
    ids: torch.Tensor,
    seqlen: int,
    limit: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    ram_budget: int | str | None = None,
    dtype: torch.dtype | None = None,
    dataset: str = "ids",
    progress: bool = True,
) -> tuple[PerplexityResult, list[float]]:
    """``(result, window_nlls)``: perplexity of ``ids`` per ``perplexity_from_ids``, one layer resident.

    ``model`` is a meta skeleton (or an in-memory model); ``source`` its layers: a
    :class:`LayerStore` (a :class:`DiskLayerStore`, or a plain one for an in-memory
    model), a store factory ``(layers, device) -> LayerStore``, or a
    :class:`~structprune.models.checkpoint.CheckpointReader` (a disk store reading in
    ``dtype`` is built). Windows are the protocol's (non-overlapping, tail dropped, the
    first ``limit``), batched by ``batch_size``; ``ram_budget`` bytes (or ``"512MiB"``) bound the
    CPU hidden states of a group of windows (default: :func:`eval_ram_budget`). NLL is float32 cross-entropy summed in float64.
    ``window_nlls`` is each window's mean NLL over its ``seqlen - 1`` scored tokens.
    """
    adapter = adapter if adapter is not None else get_adapter(model)
    device = torch.device(device)
    windows = protocol_windows(ids, seqlen, limit, model_context_length(model), dataset)
    nwindows = windows.shape[0]

    store, built = _make_store(model, adapter, source, device, dtype)
    # Evaluation changes no layer: a sink writing final layers out must not see them again.
    sink = getattr(store, "on_release", None)
    if sink is not None:
        store.on_release = None
    act_dtype = getattr(store, "dtype", None) or dtype or _model_dtype(model)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    # The decoder's width (a multimodal config, Gemma 3's, nests it in text_config).
    per_window = seqlen * text.hidden_size * act_dtype.itemsize * 2  # two boundaries at once
    limit = None if ram_budget is None else parse_size(ram_budget)
    budget = eval_ram_budget() if limit is None or math.isinf(limit) else int(limit)  # inf: as with no budget
    group = max(batch_size, (budget // per_window) // batch_size * batch_size)
    layers = adapter.layers()
    # A distributed run's rank scores the windows of its chunks (engine/distributed.py); the NLLs are
    # gathered in window order at the end. Groups are whole chunks, so every chunk is the same batch.
    index = distributed.window_indices(nwindows, batch_size) if distributed.is_distributed() else None
    mine = windows if index is None else windows[index]
    ngroups = math.ceil(mine.shape[0] / group)
    bar = tqdm(total=ngroups * (len(layers) + 2), desc=f"ppl {dataset} (streamed)",
               disable=not (progress and distributed.is_main()))

    window_sums: list[float] = []
    try:
        for g0 in range(0, mine.shape[0], group):
            calib = mine[g0:g0 + group]
            with _on_device(store, model, adapter.pre_layer_modules(), device):
                boundary = capture_first_layer_inputs(model, adapter, calib, device, batch_size)
            bar.update(1)
            for i in range(len(layers)):
                layer = store.fetch(i)
                try:
                    nxt = run_layer(layer, boundary, device)
                finally:
                    store.release(i)
                _close(boundary)
                boundary = nxt
                bar.update(1)
            with _on_device(store, model, adapter.head_modules(), device):
                start = 0
                # Chunks kept in a reduced dtype go back to the dtype they were computed in.
                source_dtype = getattr(boundary.hidden, "source_dtype", None)
                for h in boundary.hidden:
                    x = h.to(device, source_dtype or h.dtype)
                    for m in adapter.head_modules():
                        x = m(x)
                    logits = x[:, :-1, :].float()
                    labels = calib[start:start + h.shape[0], 1:].to(device)
                    start += h.shape[0]
                    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                          reduction="none")
                    window_sums.extend(nll.double().view(h.shape[0], -1).sum(1).tolist())
                    del x, logits, nll
            _close(boundary)
            boundary = None
            bar.update(1)
    finally:
        bar.close()
        if sink is not None:
            store.on_release = sink
        if built:
            store.finish()

    if index is not None:
        window_sums = distributed.gather_rows(torch.tensor(window_sums, dtype=torch.float64), index, nwindows).tolist()
    count = nwindows * (seqlen - 1)
    mean_nll = math.fsum(window_sums) / count
    if not math.isfinite(mean_nll):
        log.warning("non-finite NLL on %s: the model produced NaN/inf logits", dataset)
    ppl = float("nan") if math.isnan(mean_nll) else (math.exp(mean_nll) if mean_nll < 709 else float("inf"))
    nlls = [s / (seqlen - 1) for s in window_sums]
    result = PerplexityResult(dataset=dataset, ppl=ppl, nwindows=nwindows, ntokens=count, seqlen=seqlen,
                              window_nlls=tuple(nlls))
    log.info("%s: ppl %.4f over %d windows of %d (%d tokens, streamed)", dataset, ppl, nwindows, seqlen, count)
    return result, nlls


def eval_ram_budget() -> int:
    """RAM for a streamed evaluation's hidden states: the activation budget in force (an
    :func:`~structprune.engine.activations.activation_budget` block or
    ``$STRUCTPRUNE_ACTIVATION_BUDGET``), else a quarter of the memory available now (cgroup-aware),
    as the streamed pruning path does: a model that does not fit must not be evaluated with
    activations sized for one that does."""
    limit = current_budget().limit
    if math.isfinite(limit):
        return int(limit)
    return default_ram_budget()


def evaluate_checkpoint(folder, tokenizer, datasets: list[str], seqlen: int = 2048,
                        limit: int | None | dict[str, int | None] = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        progress: bool = True, ram_budget: int | str | None = None) -> dict[str, dict]:
    """Perplexity of the checkpoint in ``folder`` on each dataset, one layer resident (the
    protocol's windows, C4 capped as :func:`~structprune.eval.perplexity.perplexity` does;
    ``limit`` one limit or ``{dataset: limit}``). Returns ``{dataset: PerplexityResult.to_dict()}``
    (per-window NLLs and the bootstrap interval included)."""
    from ..data.corpora import C4_EVAL_MAX_WINDOWS
    from ..models.checkpoint import load_skeleton
    from .perplexity import encode_corpus
    from .protocol import limit_for

    model, reader = load_skeleton(folder, dtype=dtype)
    out = {}
    try:
        for name in datasets:
            cap = limit_for(limit, name)
            if name.lower() == "c4":
                cap = C4_EVAL_MAX_WINDOWS if cap is None else min(cap, C4_EVAL_MAX_WINDOWS)
            res, _ = streamed_perplexity(model, reader, None, encode_corpus(tokenizer, name), seqlen, limit=cap,
                                         device=device, dtype=dtype, dataset=name, progress=progress,
                                         ram_budget=ram_budget)
            out[name] = res.to_dict()
    finally:
        reader.close()
    return out
