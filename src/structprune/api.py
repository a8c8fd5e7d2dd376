"""The one orchestration: ``prune(model, calib, config) -> PruneResult``, read top to bottom.

    from structprune import load_model, prune, PruneConfig
    model, tok = load_model("smollm2-135m")
    result = prune(model, tokenizer=tok, config=PruneConfig(method="structprune", sparsity=0.3))
    result.report["sparsity_achieved"]
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch

from .adapters import Adapter, LayerPlan, count_params, get_adapter
from .config import PruneConfig
from .engine import LayerStream
from .errors import CalibrationError, StructPruneError
from .memory import peak_gpu, peak_rss, reset_peak_gpu, reset_peak_rss
from .models.loading import model_context_length
from .solvers import DATA_FREE_METHODS, METHODS

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prunable_params(adapter: Adapter) -> int:
    """Parameters of every layer's q, k, v, o and MLP projections (what sparsity is a fraction of)."""
    return sum(count_params(adapter.prunable_linears(l)) for l in adapter.layers())


def layer_widths(adapter: Adapter) -> list[dict]:
    return [adapter.layer_widths(l) for l in adapter.layers()]


@dataclass
class PruneRun:
    """Everything a solver needs: the model, its adapter, calibration windows, config, device."""

    model: torch.nn.Module
    adapter: Adapter
    calib: torch.Tensor | None  # [nsamples, seqlen] token ids; None for a data-free method
    config: PruneConfig
    device: torch.device
    progress: bool = True
    log: list[dict] = field(default_factory=list)  # solver iterations, for the report
    cache: dict | None = None  # dense-model computations reusable across runs (see prune())
    _inputs: object = None  # first-layer inputs, captured once and shared by every pass

    def layers(self, desc: str = "layers"):
        """Borrow each decoder layer in turn with no activations: ``(index, layer)`` (data-free methods)."""
        from tqdm.auto import tqdm

        from .engine import LayerStore

        store = LayerStore(self.adapter.layers(), self.device)
        for i in tqdm(range(len(store)), desc=desc, disable=not self.progress):
            layer = store.fetch(i)
            try:
                yield i, layer
            finally:
                store.release(i)

    def stream(self, desc: str = "layers", track_dense: bool = False) -> LayerStream:
        """A streaming pass over all layers (first-layer inputs are captured once per run)."""
        s = LayerStream(self.model, self.adapter, self.calib, self.device, self.config.batch_size,
                        track_dense=track_dense, swap=self.config.swap_layers, progress=self.progress,
                        desc=desc, inputs=self._inputs)
        self._inputs = s.first_inputs()
        return s


@dataclass
class PruneResult:
    model: torch.nn.Module
    plans: list[LayerPlan]
    config: PruneConfig
    report: dict


def _check_calib(model, calib: torch.Tensor, config: PruneConfig) -> None:
    if calib.dim() != 2:
        raise CalibrationError(f"calibration must be [nsamples, seqlen] token ids, got shape {tuple(calib.shape)}")
    ctx = model_context_length(model)
    if ctx is not None and calib.shape[1] > ctx:
        raise StructPruneError(f"sequence length {calib.shape[1]} exceeds the model's context of {ctx} tokens")
    vocab = model.get_input_embeddings().num_embeddings
    if calib.numel() and (calib.min() < 0 or calib.max() >= vocab):
        raise CalibrationError(f"calibration token ids must lie in [0, {vocab}); is it the model's tokenizer?")


def needs_calibration(config: PruneConfig) -> bool:
    """False for a method that scores from the weights alone with an allocation that needs no data."""
    return not (config.method in DATA_FREE_METHODS and config.allocation in ("uniform", "threshold"))


def build_calibration(tokenizer, config: PruneConfig) -> torch.Tensor:
    from .data import get_calibration

    return get_calibration(tokenizer, config.calib, nsamples=config.nsamples, seqlen=config.seqlen,
                           seed=config.seed)


def prune(model, calib: torch.Tensor | None = None, config: PruneConfig | None = None, *, tokenizer=None,
          device=None, progress: bool = True, cache: dict | None = None, **overrides) -> PruneResult:
    """Prune ``model`` in place to ``config.sparsity`` with ``config.method``.

    ``calib`` is ``[nsamples, seqlen]`` token ids; if omitted it is drawn from
    ``config.calib`` with ``tokenizer``. Keyword ``overrides`` replace config fields
    (overriding ``method`` alone also resets ``allocation`` to that method's default).
    Only one decoder layer is on ``device`` at a time; the rest of the model stays
    where it is (normally CPU).

    ``cache``: pass the same dict to several runs on copies of the *same dense model* with
    the same calibration windows (sweeps, benchmark tables) and solvers reuse what depends
    only on those (StructPrune: sensitivities and dense removal paths).
    """
    if "method" in overrides and "allocation" not in overrides:
        overrides["allocation"] = "auto"  # a new method brings its own default allocation
    config = replace(config or PruneConfig(), **overrides) if overrides else (config or PruneConfig())
    ctx = model_context_length(model)
    if ctx is not None and config.seqlen > ctx:
        raise StructPruneError(f"sequence length {config.seqlen} exceeds the model's context of {ctx} tokens")
    adapter = get_adapter(model)
    if not needs_calibration(config):
        calib = None  # magnitude scores read the weights only
    elif calib is None:
        if tokenizer is None:
            raise StructPruneError("pass calibration token ids or a tokenizer to draw them with")
        calib = build_calibration(tokenizer, config)
    if calib is not None:
        _check_calib(model, calib, config)
    device = torch.device(device) if device is not None else default_device()

    params_before = count_params([model])
    prunable_before = prunable_params(adapter)
    widths_before = layer_widths(adapter)
    was_training = model.training
    model.eval()
    reset_peak_gpu(device)
    rss_reset = reset_peak_rss()
    t0 = time.perf_counter()

    run = PruneRun(model, adapter, calib, config, device, progress=progress, cache=cache)
    plans = METHODS[config.method](run)

    peak = peak_gpu(device)
    seconds = time.perf_counter() - t0
    rss, rss_kind = peak_rss()
    model.train(was_training)

    prunable_after = prunable_params(adapter)
    report = {
        "method": config.method,
        "allocation": config.allocation,
        "sparsity_target": config.sparsity,
        "sparsity_achieved": 1 - prunable_after / prunable_before,
        "params_before": params_before,
        "params_after": count_params([model]),
        "prunable_params_before": prunable_before,
        "prunable_params_after": prunable_after,
        "all_layers_pruned": True,
        "layers_before": widths_before,
        "layers": layer_widths(adapter),
        "calibration": None if calib is None else {"source": config.calib, "nsamples": int(calib.shape[0]),
                                                   "seqlen": int(calib.shape[1]), "seed": config.seed},
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "peak_gpu_mem_bytes": peak,
        "peak_rss_bytes": rss,  # of the whole process while pruning (model included)
        "peak_rss_kind": rss_kind if rss_reset else rss_kind + " (could not reset: includes what ran before)",
        "prune_seconds": seconds,
        "config": config.to_dict(),
        "solver_log": run.log,
    }
    model.config.structprune = {"method": config.method, "sparsity": report["sparsity_achieved"],
                                "layers": report["layers"]}
    log.info("pruned %.4f of prunable parameters in %.1fs", report["sparsity_achieved"], seconds)
    return PruneResult(model=model, plans=plans, config=config, report=report)
