"""The one orchestration: ``prune(model, calib, config) -> PruneResult``, read top to bottom.

    from structprune import load_model, prune, PruneConfig
    model, tok = load_model("smollm2-135m")
    result = prune(model, tokenizer=tok, config=PruneConfig(method="structprune", sparsity=0.3))
    result.report["sparsity_achieved"]
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .adapters import Adapter, LayerPlan, count_params, get_adapter, prunable_params, removable_cost
from .config import PruneConfig
from .engine import LayerStream, distributed
from .engine.stream import check_finite_weights
from .engine.activations import activation_budget, current_budget, explicit_budget
from .engine.budget import MemoryPlan, layer_sizes, parse_memory, plan_memory
from .engine.clock import breakdown, measuring, timed
from .engine.homes import MemoryHome
from .errors import CalibrationError, StructPruneError
from .memory import default_ram_budget, peak_gpu, peak_rss, reset_peak_gpu, reset_peak_rss
from .modelstate import ModelState
from .models.loading import check_tokenizer, model_context_length
from .provenance import calibration_sha256, library_versions, model_fingerprint
from .solvers import DATA_FREE_METHODS, METHODS
from .solvers.obs import precision
from .solvers.parts import path_block, path_min_keep
from .solvers.structprune import REFIT_DTYPE

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    """The CPU, or CUDA where there is one (a distributed run's rank: ``cuda:LOCAL_RANK``)."""
    if distributed.is_distributed():
        return distributed.default_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _min_channels(n: int, config: PruneConfig) -> int:
    """The fewest MLP channels a layer keeps: StructPrune's removal paths stop at r_min (rounded up to
    mlp_multiple); the width-based allocations (uniform, owl, threshold: allocation/widths.py) at one
    mlp_multiple."""
    if config.method == "structprune" and config.allocation != "uniform":
        return path_min_keep(n, config.r_min, config.mlp_multiple)
    return min(n, max(1, config.mlp_multiple))


def max_sparsity(adapter: Adapter, config: PruneConfig) -> float:
    """The largest sparsity ``config``'s method can reach on ``adapter``'s model: every layer keeps at
    least one KV group with one query head and its minimum MLP channels (output biases always stay)."""
    total = prunable_params(adapter)
    fixed = total - removable_cost(adapter)  # biases of o_proj/down_proj
    least = sum(adapter.attention_shape(l).cost(1, 1)
                + adapter.mlp_shape(l).cost(_min_channels(adapter.mlp_shape(l).channels, config))
                for l in adapter.layers())
    return 1 - (least + fixed) / total


def check_reachable(adapter: Adapter, config: PruneConfig) -> None:
    """Refuse a target the per-layer minimums cannot reach (it would quietly deliver less)."""
    limit = max_sparsity(adapter, config)
    if config.sparsity > limit:
        how = "lower r_min or mlp_multiple" if config.method == "structprune" else "lower mlp_multiple"
        raise StructPruneError(f"sparsity {config.sparsity} cannot be reached by {config.method}: every layer keeps "
                               f"at least one head and its minimum MLP channels, so the largest reachable sparsity "
                               f"is {limit:.4f}; ask for at most that, or {how}")


def removal_step(adapter: Adapter, config: PruneConfig) -> float:
    """How far (as a fraction of prunable parameters) a correct run may land from its target: the
    coarsest single structure (a KV group with its heads, an MLP block), or half an MLP step per layer
    of rounding where every layer rounds alike (uniform), plus the output biases that never go."""
    total = prunable_params(adapter)
    fixed = total - removable_cost(adapter)
    coarsest, rounding = 0, 0.0
    for l in adapter.layers():
        a, m = adapter.attention_shape(l), adapter.mlp_shape(l)
        # step_channels: the tied experts of an MoE layer move together
        block = path_block(m.channels, config.path_steps, config.mlp_multiple) if config.method == "structprune" else 1
        step = m.cost_per_channel * max(m.step_channels(config.mlp_multiple), block)
        coarsest = max(coarsest, a.cost(1, a.group_size), step)
        rounding += step / 2
    return (max(coarsest, rounding) + fixed) / total


def layer_widths(adapter: Adapter) -> list[dict]:
    return [adapter.layer_widths(l) for l in adapter.layers()]


@dataclass
class PruneRun:
    """Everything a solver needs: the model, its adapter, calibration windows, config, device,
    and the layers' home (in memory or on disk: :mod:`structprune.engine.homes`)."""

    model: torch.nn.Module
    adapter: Adapter
    calib: torch.Tensor | None  # [nsamples, seqlen] token ids; None for a data-free method
    config: PruneConfig
    device: torch.device
    progress: bool = True
    log: list[dict] = field(default_factory=list)  # solver iterations, for the report
    cache: dict | None = None  # dense-model computations reusable across runs (see prune())
    home: object = None  # MemoryHome or DiskHome; None: MemoryHome(config.swap_layers)
    timings: dict = field(default_factory=dict)  # pass -> seconds per layer, for the report
    operations: dict = field(default_factory=dict)  # pass -> operation -> seconds (engine/clock.py)
    _inputs: object = None  # first-layer inputs, captured once and shared by every pass
    # Content hashes of the dense model and the calibration (provenance.py), for the report and
    # the reuse cache's keys; computed here unless given (the disk path hashes the checkpoint).
    fingerprint: dict | None = None
    calib_sha256: str | None = None
    journal: object = None  # engine.journal.RunJournal of a resumable (disk-streamed) run, else None
    memory_plan: object = None  # engine.budget.MemoryPlan of a streamed run (its limit, need and budget)

    def __post_init__(self):
        if self.home is None:
            self.home = MemoryHome(swap=self.config.swap_layers)
        if self.fingerprint is None:
            self.fingerprint = model_fingerprint(self.model)
        if self.calib_sha256 is None and self.calib is not None:
            self.calib_sha256 = calibration_sha256(self.calib)

    def phase(self, name: str, compute):
        """``compute()``, or, in a resumed run that had finished phase ``name``, its journaled result
        (plain data: tensors, numbers, lists, dicts)."""
        if self.journal is None:
            return compute()
        done = self.journal.phase(name)
        from .engine.journal import JOURNALS_APART

        distributed.check_same(done is not None, f"whether phase {name!r} had finished", JOURNALS_APART)
        if done is not None:
            return done["value"]
        value = compute()
        self.journal.finish_phase(name, {"value": value})
        return value

    def layers(self, desc: str = "layers", cuts: bool = False, final: bool = True, start: int = 0,
               name: str | None = None):
        """Borrow each decoder layer in turn with no activations: ``(index, layer)`` (data-free methods).
        ``cuts``: the pass prunes the layers (see :meth:`stream`); ``start``: the first layer visited
        (a resumed pass)."""
        from tqdm.auto import tqdm

        with self.home.cutting(final, name) if cuts else contextlib.nullcontext():
            store = self.home(self.adapter.layers(), self.device)
            try:
                times = self.timings.setdefault(desc, [])
                for i in tqdm(range(start, len(store)), initial=start, total=len(store), desc=desc,
                              disable=not self.progress):
                    t = time.perf_counter()
                    with measuring(self.operations.setdefault(desc, {})):
                        with timed("layer io"):
                            layer = store.fetch(i)
                        check_finite_weights(layer, f"layer {i}")
                        yield i, layer
                        with timed("layer io"):
                            store.release(i)
                    times.append(time.perf_counter() - t)
            finally:
                store.finish()

    def stream(self, desc: str = "layers", track_dense: bool = False, cuts: bool = False,
               final: bool = True, start: int = 0, start_inputs=None, start_dense=None,
               name: str | None = None) -> LayerStream:
        """A streaming pass over all layers (first-layer inputs are captured once per run).

        ``cuts``: the pass leaves every layer pruned, so its home keeps what each released
        layer became (on disk: written out, to a scratch writer ``name`` unless ``final``);
        ``final=False`` when a later pass may supersede it. A resumed pass starts at layer
        ``start`` with that layer's ``start_inputs`` (and ``start_dense`` with ``track_dense``)."""
        s = LayerStream(self.model, self.adapter, self.calib, self.device, self.config.batch_size,
                        track_dense=track_dense, progress=self.progress, desc=desc, inputs=self._inputs,
                        store_factory=self.home, start=start, start_inputs=start_inputs, start_dense=start_dense)
        self._inputs = s.first_inputs()
        return _Pass(s, self.home if cuts else None, final, self.timings.setdefault(desc, []), name,
                     self.operations.setdefault(desc, {}))


class _Pass:
    """A :class:`LayerStream` timed per layer (into ``times``) and per operation (into
    ``operations``: engine/clock.py), and, for a cutting pass, run inside ``home.cutting(final)``."""

    def __init__(self, stream: LayerStream, home, final: bool, times: list, name: str | None = None,
                 operations: dict | None = None):
        self.stream, self.home, self.final, self.times, self.name = stream, home, final, times, name
        self.operations = {} if operations is None else operations

    def first_inputs(self):
        return self.stream.first_inputs()

    def __iter__(self):
        with self.home.cutting(self.final, self.name) if self.home is not None else contextlib.nullcontext():
            t = time.perf_counter()
            with measuring(self.operations):
                for ctx in self.stream:
                    yield ctx
                    now = time.perf_counter()
                    self.times.append(now - t)  # the layer's work in this pass, its forward included
                    t = now
                if self.times:  # the last layer's release (a disk write when streamed) and the stream's end
                    self.times[-1] += time.perf_counter() - t


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
    where it is (normally CPU). Whatever happens, error or success, the model is left where
    and how it was found: every tensor's device and dtype, every module's training mode,
    every parameter's ``requires_grad`` and ``.grad`` (:class:`~structprune.modelstate.ModelState`).

    ``cache``: pass the same dict to several runs on copies of the *same dense model* with
    the same calibration windows (sweeps, benchmark tables) and solvers reuse what depends
    only on those (StructPrune: sensitivities and dense removal paths).
    """
    config = _with_overrides(config, overrides)
    distributed.setup(device)
    progress = progress and distributed.is_main()
    adapter = get_adapter(model)

    def check():
        check_reachable(adapter, config)
        return _calibration(model, calib, config, tokenizer)
    calib = distributed.agree(check)  # a bad input is refused by every rank with the same line
    _check_same_calibration(calib, config)
    device = torch.device(device) if device is not None else default_device()
    state = ModelState.capture(model)
    model.eval()
    try:
        plans, report = _run(PruneRun(model, adapter, calib, config, device, progress=progress, cache=cache))
    finally:
        state.restore(model)
    return PruneResult(model=model, plans=plans, config=config, report=report)


def _with_overrides(config: PruneConfig | None, overrides: dict) -> PruneConfig:
    if "method" in overrides and "allocation" not in overrides:
        overrides["allocation"] = "auto"  # a new method brings its own default allocation
    return replace(config or PruneConfig(), **overrides) if overrides else (config or PruneConfig())


def _calibration(model, calib, config: PruneConfig, tokenizer):
    ctx = model_context_length(model)
    if ctx is not None and config.seqlen > ctx:
        raise StructPruneError(f"sequence length {config.seqlen} exceeds the model's context of {ctx} tokens")
    if tokenizer is not None:
        check_tokenizer(tokenizer, model.get_input_embeddings().num_embeddings)
    if not needs_calibration(config):
        return None  # magnitude scores read the weights only
    if calib is None:
        if tokenizer is None:
            raise StructPruneError("pass calibration token ids or a tokenizer to draw them with")
        calib = build_calibration(tokenizer, config)
    _check_calib(model, calib, config)
    return calib


def _check_same_calibration(calib, config: PruneConfig) -> None:
    """In a distributed run: every rank drew the same windows (a different tokenizer file or corpus on
    one node would silently prune on other data), and there is a chunk for every rank."""
    if calib is None or not distributed.is_distributed():
        return
    distributed.agree(lambda: distributed.check_chunks(int(calib.shape[0]), config.batch_size))
    distributed.check_same(calibration_sha256(calib), "the calibration windows")


def _run(run: PruneRun) -> tuple[list[LayerPlan], dict]:
    """Run the method on ``run`` and measure it: ``(plans, report)``."""
    model, adapter, config, device, calib = run.model, run.adapter, run.config, run.device, run.calib
    params_before = count_params([model])
    prunable_before = prunable_params(adapter)
    per_layer_before = [count_params(adapter.prunable_linears(l)) for l in adapter.layers()]
    widths_before = layer_widths(adapter)
    tolerance = removal_step(adapter, config)  # from the dense shapes
    reset_peak_gpu(device)
    rss_reset = reset_peak_rss()
    t0 = time.perf_counter()
    limit = config.activation_budget
    if limit is None and explicit_budget() is None:
        # The activations must not grow without bound in memory either (32x2048 windows with ADMM
        # hold ~18 GB of consensus and duals for a 135M model): by default a quarter of the memory
        # available now, the rest spilled (exact: spilled stores read back the same bytes).
        limit = default_ram_budget() // distributed.local_world_size()  # the ranks of a node share its RAM
    with activation_budget(limit, config.offload_dir) if limit is not None \
            else contextlib.nullcontext(current_budget()) as budget:
        plans = METHODS[config.method](run)
    peak = peak_gpu(device)
    seconds = time.perf_counter() - t0
    rss, rss_kind = peak_rss()
    reads = dict(run.home.factory.reads) if hasattr(run.home, "factory") else None
    per_rank = distributed.gather_objects({"peak_rss_bytes": rss, "peak_gpu_mem_bytes": peak, "device": str(device),
                                           "layer_reads": reads})

    prunable_after = prunable_params(adapter)
    per_layer_after = [count_params(adapter.prunable_linears(l)) for l in adapter.layers()]
    achieved = 1 - prunable_after / prunable_before
    report = {
        "method": config.method,
        "allocation": config.allocation,
        "sparsity_target": config.sparsity,
        "sparsity_achieved": achieved,
        "params_before": params_before,
        "params_after": count_params([model]),
        "prunable_params_before": prunable_before,
        "prunable_params_after": prunable_after,
        "all_layers_pruned": all(a < b for a, b in zip(per_layer_after, per_layer_before)),
        "layers_before": widths_before,
        "layers": layer_widths(adapter),
        "calibration": None if calib is None else {"source": config.calib, "nsamples": int(calib.shape[0]),
                                                   "seqlen": int(calib.shape[1]), "seed": config.seed,
                                                   "sha256": run.calib_sha256},
        "model_fingerprint": run.fingerprint,
        "versions": library_versions(),
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "residency": "disk" if not isinstance(run.home, MemoryHome) else "memory",
        "peak_gpu_mem_bytes": peak,
        "peak_rss_bytes": rss,  # of the whole process while pruning (model included)
        "peak_rss_kind": rss_kind if rss_reset else rss_kind + " (could not reset: includes what ran before)",
        "prune_seconds": seconds,
        # the ranks of a distributed run (torchrun): their number and each one's peak memory
        "world_size": distributed.world_size(),
        "ranks": per_rank if distributed.is_distributed() else None,
        "memory": _memory_breakdown(run, budget, widths_before),
        # per pass: seconds per layer, and per operation (exclusive of nested ones; the rest of a pass is
        # what no operation covers: surgery, menus, bookkeeping); engine/clock.py
        "timings": {desc: {"seconds": sum(t), "per_layer": t,
                           **({"operations": breakdown(run.operations[desc], sum(t))}
                              if run.operations.get(desc) else {})} for desc, t in run.timings.items()},
        # a streamed run's layer reads from disk (every pass), inside the passes' times: on a shared node
        # each rank reads its own copy, so this says what reading once and broadcasting could save
        "layer_reads": reads,
        # the dtype of each factorisation (StructPrune's removal paths run in float32, obs-local's in float64)
        "precision": precision(device, torch.float32, REFIT_DTYPE) if config.method == "structprune"
                     else precision(device, torch.float64),
        "config": config.to_dict(),
        "solver_log": run.log,
    }
    if abs(achieved - config.sparsity) > tolerance + 1e-9:
        raise StructPruneError(f"{config.method} missed its target: target {config.sparsity}, achieved {achieved:.4f}, "
                               f"more than one removal step ({tolerance:.4f}) apart; lower the sparsity or mlp_multiple, "
                               "or try another allocation (and report it if the sparsity is far from the limit)")
    model.config.structprune = {"method": config.method, "sparsity": report["sparsity_achieved"],
                                "layers": report["layers"]}
    log.info("pruned %.4f of prunable parameters in %.1fs", report["sparsity_achieved"], seconds)
    return plans, report


def _memory_breakdown(run: PruneRun, budget, widths_before: list[dict]) -> dict:
    """What one resident layer costs, by kind (bytes), next to the measured activation figures.

    Layer weights, statistics and solver workspace are the sizes of the tensors that exist
    at once for the largest layer (engine/budget.py: from its dense shapes); activations are the
    activation store's measured peak in RAM and what spilled to disk. A streamed run adds its
    memory plan: the limit it ran under, where the limit came from, and the budget chosen from it."""
    dtype_size = next(run.model.parameters()).element_size()
    cfg = run.config
    out = {**layer_sizes(run.adapter, widths_before, dtype_size, cfg.method, cfg.inner_iterations > 0,
                         cfg.method == "structprune" and cfg.value_iterations > 0, cfg.batch_size * cfg.seqlen),
           "activations_peak_ram_bytes": getattr(budget, "peak_resident", None),
           "activations_spilled_bytes": getattr(budget, "peak_spilled", None),
           "activation_budget": None if math.isinf(getattr(budget, "limit", math.inf)) else budget.limit,
           "basis": "layer/statistics/solver: sizes of the largest layer's tensors (one layer resident); "
                    "activations: measured"}
    if run.memory_plan is not None:
        out["plan"] = run.memory_plan.to_dict()
    return out


def memory_plan(adapter: Adapter, config: PruneConfig, dtype: torch.dtype, max_memory=None,
                eval_seqlen: int = 0) -> MemoryPlan:
    """The memory plan of a streamed run of ``config`` on the model ``adapter`` wraps (its meta skeleton
    is enough): the limit (``max_memory``, the cgroup, the machine), the estimated need of one layer
    (and of the LM head, with a streamed evaluation on windows of ``eval_seqlen`` if any), and the
    activation budget chosen from them unless ``config`` or an ``activation_budget`` block sets one.
    Raises StructPruneError when the limit cannot hold one layer's work."""
    given = config.activation_budget is not None or explicit_budget() is not None
    tokens = config.nsamples * config.seqlen if needs_calibration(config) else 0
    return plan_memory(adapter, layer_widths(adapter), torch.empty((), dtype=dtype).element_size(), config.method,
                       tokens, max_memory=parse_memory(max_memory), budget_given=given, eval_tokens=eval_seqlen,
                       inner=config.method == "structprune" and config.inner_iterations > 0,
                       values=config.method == "structprune" and config.value_iterations > 0,
                       chunk_tokens=config.batch_size * config.seqlen)


def checkpoint_memory_plan(folder: str | Path, config: PruneConfig, dtype: torch.dtype = torch.float32,
                           max_memory=None, eval_seqlen: int = 0) -> MemoryPlan:
    """:func:`memory_plan` for the checkpoint in ``folder``, from its meta skeleton (reads no weights)."""
    from .models.checkpoint import load_skeleton

    model, _ = load_skeleton(folder, dtype=dtype)
    return memory_plan(get_adapter(model), config, dtype, max_memory, eval_seqlen)


def _run_identity(config: PruneConfig, calib, fingerprint: dict, dtype, device, max_shard_size) -> dict:
    """What makes two streamed runs the same run (a journal is only continued by the same run).
    The activation budget and offload folder only move activations between RAM and disk."""
    from .export.shards import parse_size as shard_bytes
    from .provenance import calibration_sha256 as calib_hash

    cfg = {k: v for k, v in config.to_dict().items() if k not in ("activation_budget", "offload_dir")}
    identity = {"config": cfg, "calibration": None if calib is None else calib_hash(calib), "model": fingerprint,
                "dtype": str(dtype), "device": torch.device(device).type, "max_shard_size": shard_bytes(max_shard_size),
                "versions": library_versions()}
    if distributed.is_distributed():  # each rank's journal holds its own chunks: resumed by as many ranks
        identity["world_size"] = distributed.world_size()
    return identity


def prune_checkpoint(folder: str | Path, output: str | Path, calib: torch.Tensor | None = None,
                     config: PruneConfig | None = None, *, tokenizer=None, device=None,
                     dtype: torch.dtype = torch.float32, max_shard_size: str | int = "2GB", progress: bool = True,
                     overwrite: bool = False, atomic: bool = True, resume: bool = False, max_memory=None,
                     **overrides) -> PruneResult:
    """Prune the checkpoint in ``folder`` (config + safetensors, sharded or not) into ``output``
    with one decoder layer in memory at a time: the dense model is never loaded whole, and each
    layer is written to ``output``'s shards as soon as it is final, so the pruned model is never
    whole in memory either. Computes in ``dtype``; writes in the checkpoint's stored dtype.

    ``output`` receives the weights (shards + index), ``config.json`` (stock or per-layer, as
    :func:`~structprune.export.save_pruned`), the tokenizer when given, ``plan.json`` and
    ``report.json``; it is written to a temporary folder and moved into place at the end.
    ``atomic=False`` writes straight into ``output`` (a caller's own temporary folder).
    Returns a :class:`PruneResult` whose ``model`` is the (meta) skeleton with the pruned shapes.
    The O(N) ``global`` reference back-propagates through the whole model: it is refused here.

    Memory: the run may use the tightest of ``max_memory`` (bytes or ``"6GiB"``), this process's
    cgroup limit and the machine's memory; before any work it estimates one layer's need and
    refuses (StructPruneError) a limit that cannot hold it, and it sizes the activation budget from
    what is left unless ``config.activation_budget`` is set (engine/budget.py; the report's
    ``memory.plan`` says what was chosen). Shards are streamed to disk whatever ``max_shard_size``.

    Resumable: the run keeps a journal in ``.OUTPUT.partial/.resume`` (engine/journal.py); a run
    that was killed (SIGKILL, out of memory, power loss) continues with ``resume=True`` and the same
    arguments from its last checkpointed layer, and writes the same bytes as an uninterrupted run.
    A failure the run sees (an error, Ctrl-C) removes its partial folder instead.
    """
    from .engine.homes import DiskHome
    from .export import atomic_output_dir, export_config
    from .export.shards import ShardWriter
    from .engine.journal import RunJournal
    from .export.writer import RESUME_DIR, base_model_type, write_export_files
    from .models.checkpoint import load_skeleton
    from .provenance import checkpoint_fingerprint

    config = _with_overrides(config, overrides)
    # A distributed run (torchrun: WORLD_SIZE > 1, or a group the caller initialised): every rank
    # runs this whole function on its own chunks of the calibration (engine/distributed.py); rank 0
    # alone prints and writes the output, the other ranks keep their layers and journal in
    # ``.rank-R`` inside the partial folder. A restart by torchrun (--max-restarts) is a resume.
    distributed.setup(device)
    progress = progress and distributed.is_main()
    resume = resume or distributed.restarted()

    def prepare():
        """Everything checked before any work, refused by every rank with the same line."""
        if config.method == "global":
            raise StructPruneError("the 'global' reference needs the whole model in memory: load it with "
                                   "load_model() and call prune(), or choose a streamed method")
        model, reader = load_skeleton(folder, dtype=dtype)
        fingerprint = checkpoint_fingerprint(folder, reader.files)
        adapter = get_adapter(model)
        check_reachable(adapter, config)
        calib_ = _calibration(model, calib, config, tokenizer)
        # Before any work: what the run may use and what one layer needs; the activation budget follows
        # from the limit (a model larger than memory must not get its activations in RAM without bound).
        return model, reader, fingerprint, adapter, calib_, memory_plan(adapter, config, dtype, max_memory)
    model, reader, fingerprint, adapter, calib, plan = distributed.agree(prepare)
    _check_same_calibration(calib, config)
    distributed.check_same(fingerprint["sha256"], "the checkpoint")
    share = distributed.local_world_size()  # the ranks of a node share its memory
    if plan.activation_budget is not None:
        config = replace(config, activation_budget=plan.activation_budget // share)
    elif config.activation_budget is None and explicit_budget() is None:
        config = replace(config, activation_budget=default_ram_budget() // share)  # no limit could be read
    device = torch.device(device) if device is not None else default_device()
    place = (atomic_output_dir(output, overwrite=overwrite, resumable=True, resume=resume,
                               keep_unless_refused=distributed.is_distributed()) if atomic
             else contextlib.nullcontext(Path(output)))
    with distributed.main_only(place) as tmp:
        own = tmp if distributed.is_main() else tmp / f".rank-{distributed.rank()}"
        journal = RunJournal(own / RESUME_DIR, _run_identity(config, calib, fingerprint, dtype, device,
                                                              max_shard_size), resume=resume,
                             before_commit=distributed.barrier if distributed.is_distributed() else None)
        distributed.check_same(journal.resumed, "whether the run is resumed",
                               "a rank's journal is missing from the partial folder; start afresh with --overwrite")
        if journal.resumed:
            log.info("resuming the interrupted run in %s", tmp)
            writer = ShardWriter.resume(own, max_shard_size)
        else:
            writer = ShardWriter(own, max_shard_size, overwrite=resume or not distributed.is_main())
        home = DiskHome(model, adapter, reader, writer, dtype=dtype, out_dtype=reader.stored_dtype,
                        scratch=own / ".scratch", resume=journal.resumed)
        plans, report = _run(PruneRun(model, adapter, calib, config, device, progress=progress, home=home,
                                      fingerprint=fingerprint, journal=journal, memory_plan=plan))
        report["timings"]["resumed"] = journal.resumed
        export = export_config(model)
        export.config.dtype = reader.stored_dtype  # the skeleton computed in ``dtype``; weights keep theirs
        if distributed.is_main():
            home.assemble()
            for key, n in export.zero_biases.items():  # biases a stock layout implies
                writer.add(key, torch.zeros(n, dtype=reader.stored_dtype))
            writer.finalize()
            shutil.rmtree(tmp / ".scratch", ignore_errors=True)
            report["model"] = str(folder)
            report["export"] = export.to_dict()
            write_export_files(export, base_model_type(model), tmp, tokenizer, report=report, plans=plans)
        else:
            report["model"] = str(folder)
            report["export"] = export.to_dict()
        distributed.barrier()  # rank 0's files are complete; the other ranks' copies go now
        if not distributed.is_main():
            shutil.rmtree(own, ignore_errors=True)
        distributed.barrier()  # and are gone before rank 0 moves the folder into place
    return PruneResult(model=model, plans=plans, config=config, report=report)
