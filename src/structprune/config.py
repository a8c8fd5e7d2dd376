"""The pruning configuration: one frozen dataclass, validated on construction, JSON round-trip."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import MISSING, asdict, dataclass, fields

from .errors import StructPruneError

DTYPES = ("float32", "float16", "bfloat16")
ALLOCATIONS = ("uniform", "owl", "threshold", "softmax")
# What allocation "auto" means per method (methods not listed: uniform).
DEFAULT_ALLOCATION = {"structprune": "softmax", "flap": "threshold", "global": "threshold"}
GLOBAL_SCORES = ("taylor", "fisher")
TARGETS = ("dense", "own")
# StructPrune's result among its ADMM iterates: the lowest calibration objective, or the last one.
SELECTS = ("best", "last")
# How StructPrune's softmax allocation standardises step energies (allocation/softmax.py ENERGY_SCALES).
ENERGY_SCALES = ("std-split", "std", "robust")
# Which removal paths StructPrune's cutting pass cuts along (docs/structprune.md, "Cost").
CUT_PATHS = ("pruned", "dense")

# What each method reads (solvers/): the allocations it runs and the knobs it uses. A knob
# set away from its default on a method that ignores it is refused, not silently dropped.
METHOD_OPTIONS = {
    "magnitude-sp": {"allocations": ("uniform", "owl", "threshold"), "knobs": ()},
    "wanda-sp": {"allocations": ("uniform", "owl", "threshold"), "knobs": ()},
    "flap": {"allocations": ("threshold", "uniform", "owl"), "knobs": ()},
    "obs-local": {"allocations": ("uniform",), "knobs": ("damp", "refit_bias")},
    "global": {"allocations": ("threshold",), "knobs": ("global_score", "damp", "refit_bias")},
    "structprune": {"allocations": ("softmax", "threshold", "uniform"),
                    "knobs": ("temperature", "r_min", "sens_nsamples", "rho", "target", "iterations", "path_steps",
                              "damp", "refit_bias", "tol_abs", "tol_rel", "select", "energy_scale", "inner_iterations",
                              "value_iterations", "input_damp", "cut_paths")},
}
# Knobs read only under some allocations (StructPrune's uniform limit needs no menus or sensitivities).
ALLOCATION_KNOBS = {"owl_lambda": ("owl",), "owl_m": ("owl",), "temperature": ("softmax",), "energy_scale": ("softmax",),
                    "r_min": ("softmax", "threshold"), "sens_nsamples": ("softmax", "threshold"),
                    "cut_paths": ("softmax", "threshold")}
def reads(method: str, allocation: str, knob: str) -> bool:
    """Whether ``method`` with ``allocation`` uses ``knob``."""
    if knob in ("owl_lambda", "owl_m"):
        return allocation == "owl" and allocation in METHOD_OPTIONS[method]["allocations"]
    return knob in METHOD_OPTIONS[method]["knobs"] and allocation in ALLOCATION_KNOBS.get(knob, (allocation,))


# Knobs StructPrune reads only for ADMM iterations (iterations > 1); the one-shot pass logs them.
ADMM_KNOBS = ("rho", "tol_abs", "tol_rel", "select")
# Knobs added after results were stored, with the value that reproduces what those results ran:
# a stored config without them reads as having that value.
LATER_KNOBS = {"select": "best", "energy_scale": "std-split", "inner_iterations": 0, "value_iterations": 0,
               "input_damp": None, "cut_paths": "pruned"}
# Knobs StructPrune reads only when it refits input projections (inner or value iterations > 0).
INPUT_REFIT_KNOBS = ("input_damp",)


def refits_inputs(config_dict: dict) -> bool:
    """Whether a StructPrune config refits input projections (the MLP's or the attention's value rows)."""
    return config_dict.get("inner_iterations", 0) > 0 or config_dict.get("value_iterations", 0) > 0


def field_value(text: str):
    """A config field's value written as text (a benchmark's sweep or row spec): ``inf`` and
    ``-inf``, ``true``/``false`` (any case, so ``str(True)`` reads back), an int, a float, else
    the string itself (method, target, allocation)."""
    if text in ("inf", "-inf"):
        return float(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def resolved_allocation(method: str, allocation: str, uniform_widths: bool = False) -> str:
    """``allocation`` with ``auto`` replaced by what it means for ``method``."""
    if allocation != "auto":
        return allocation
    return "uniform" if uniform_widths else DEFAULT_ALLOCATION.get(method, "uniform")


def _drop_unread_knobs(config_dict: dict, admm_only_when_iterating: bool) -> dict:
    """``config_dict`` without the knobs its method and allocation ignore (with the flag: also
    ADMM's knobs of a one-shot run), allocation resolved; as given for an unknown method."""
    method = config_dict.get("method", "structprune")
    if method not in METHOD_OPTIONS:  # the constructor names the unknown method
        return dict(config_dict)
    allocation = resolved_allocation(method, config_dict.get("allocation", "auto"),
                                     bool(config_dict.get("uniform_widths", False)))
    one_shot = admm_only_when_iterating and config_dict.get("iterations", 1) == 1
    no_input_refit = not refits_inputs(config_dict)
    return {**{k: v for k, v in config_dict.items() if k not in KNOBS or (
        reads(method, allocation, k) and not (one_shot and k in ADMM_KNOBS)
        and not (no_input_refit and k in INPUT_REFIT_KNOBS))}, "allocation": allocation}


def effective_fields(config_dict: dict) -> dict:
    """A config's dict (``PruneConfig.to_dict()``) without the knobs its method and allocation
    ignore, allocation resolved: two configs with the same effective fields prune identically.
    Not validated, so a stored config written under other defaults still reads."""
    return _drop_unread_knobs({**LATER_KNOBS, **config_dict}, admm_only_when_iterating=True)


KNOBS = ("temperature", "r_min", "sens_nsamples", "rho", "target", "iterations", "path_steps", "damp", "refit_bias",
         "global_score", "owl_lambda", "owl_m", "tol_abs", "tol_rel", "select", "energy_scale", "inner_iterations",
         "value_iterations", "input_damp", "cut_paths")


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how.

    ``sparsity`` is the fraction of prunable decoder parameters (q, k, v, o and MLP
    projections of every layer) to remove; embeddings and the LM head are never pruned.
    """

    method: str = "structprune"
    sparsity: float = 0.3
    allocation: str = "auto"  # auto: the method's own default (softmax for structprune, else uniform)
    calib: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 1  # calibration windows per chunk streamed through a layer
    mlp_multiple: int = 1  # round kept MLP widths to a multiple (8 suits fast kernels)
    uniform_widths: bool = False  # same kept widths in every layer (stock-config export)
    # Allocation and solver knobs (used by the methods that read them).
    temperature: float = 0.03125  # softmax allocation T (docs/structprune.md: how chosen)
    energy_scale: str = "std-split"  # softmax: how step energies are standardised (allocation/softmax.py)
    r_min: float = 0.05
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    iterations: int = 1  # StructPrune ADMM iterations at most; 1 = the one-shot pass (docs/structprune.md: how chosen)
    rho: float = 1.0  # StructPrune ADMM penalty at the first iteration (doubled while the kept sets change)
    tol_abs: float = 1e-4  # StructPrune ADMM stopping: absolute tolerance per output entry
    tol_rel: float = 1e-2  # StructPrune ADMM stopping: tolerance relative to the outputs / duals
    path_steps: int = 32  # StructPrune: MLP removal-path steps per module (block = channels // path_steps)
    # StructPrune: alternating closed-form refits of the MLP's kept input rows with its output
    # projection (auxiliary variables, solvers/inner.py) per layer; 0: the output projection only
    inner_iterations: int = 0
    # StructPrune: alternating closed-form refits of the kept heads' value rows with the output
    # projection, the attention probabilities frozen (solvers/values.py); 0: the output projection only
    value_iterations: int = 0
    # StructPrune: the ridge of those input-row refits, toward the current rows, as a fraction of the
    # Gram's mean diagonal (the output projections' refits keep ``damp``); None: ``damp``
    input_damp: float | None = None
    # StructPrune's cutting pass: each module's removal path re-solved on the pruned model's inputs
    # ("pruned"), or the dense profile's path cut at the allocated prefix ("dense": no second
    # factorisation or path per module; the refit is on the pruned inputs either way)
    cut_paths: str = "pruned"
    select: str = "best"  # StructPrune's result: the ADMM iterate with the lowest calibration objective, or the last
    target: str = "own"  # StructPrune refit anchor: own output on the pruned inputs, or the dense module's
    damp: float = 0.01
    refit_bias: bool = True
    global_score: str = "fisher"  # method global: fisher sum (g*W)^2, or taylor |sum g*W|, per window
    sens_nsamples: int = 16  # calibration chunks (of batch_size windows; windows at the default 1) for the sensitivities (0: all)
    swap_layers: bool = False  # keep released layers' tensors outside the modules (memory tests)
    # Calibration activations kept in RAM at most (bytes, or "4GiB"); beyond it they spill to
    # memory-mapped files under offload_dir. None: $STRUCTPRUNE_ACTIVATION_BUDGET, else a quarter
    # of the memory available at the start ("inf": no limit).
    activation_budget: str | int | None = None
    offload_dir: str | None = None

    def __post_init__(self):
        # The method names live here (METHOD_OPTIONS), the solvers' functions in solvers.METHODS
        # (tests check they name the same methods): config never imports the solvers.
        if self.method not in METHOD_OPTIONS:
            raise StructPruneError(f"unknown method {self.method!r}: choose one of {', '.join(sorted(METHOD_OPTIONS))}")
        if not (isinstance(self.sparsity, (int, float)) and 0 <= self.sparsity < 1):
            raise StructPruneError(f"sparsity must be in [0, 1), got {self.sparsity}")
        # Uniform widths mean the uniform allocation; otherwise "auto" is the method's own default.
        object.__setattr__(self, "allocation", resolved_allocation(self.method, self.allocation, self.uniform_widths))
        if self.allocation not in ALLOCATIONS:
            raise StructPruneError(f"unknown allocation {self.allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
        for name in ("nsamples", "seqlen", "batch_size", "mlp_multiple", "iterations", "path_steps", "sens_nsamples",
                     "inner_iterations", "value_iterations"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool):
                raise StructPruneError(f"{name} must be an integer, got {v!r}")
        for name in ("nsamples", "batch_size", "mlp_multiple", "iterations", "path_steps"):
            if getattr(self, name) < 1:
                raise StructPruneError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.seqlen < 2:  # the LM loss needs a next token: one-token windows give all-zero sensitivities
            raise StructPruneError(f"seqlen must be at least 2, got {self.seqlen}")
        if self.inner_iterations < 0:
            raise StructPruneError(f"inner_iterations must be >= 0 (0: off), got {self.inner_iterations}")
        if self.value_iterations < 0:
            raise StructPruneError(f"value_iterations must be >= 0 (0: off), got {self.value_iterations}")
        if self.sens_nsamples < 0:
            raise StructPruneError(f"sens_nsamples must be >= 0 (0: all calibration windows), got {self.sens_nsamples}")
        if not self.temperature >= 0:  # NaN and -inf fail this; +inf (uniform limit) passes
            raise StructPruneError(f"temperature must be >= 0 (inf allowed), got {self.temperature}")
        if self.global_score not in GLOBAL_SCORES:
            raise StructPruneError(f"unknown global_score {self.global_score!r}: choose one of {', '.join(GLOBAL_SCORES)}")
        if self.energy_scale not in ENERGY_SCALES:
            raise StructPruneError(f"unknown energy_scale {self.energy_scale!r}: choose one of {', '.join(ENERGY_SCALES)}")
        if self.cut_paths not in CUT_PATHS:
            raise StructPruneError(f"unknown cut_paths {self.cut_paths!r}: choose one of {', '.join(CUT_PATHS)}")
        if self.cut_paths == "dense" and math.isinf(self.temperature) and self.allocation == "softmax":
            raise StructPruneError("cut_paths='dense' cuts the profile's paths; temperature=inf is the uniform "
                                   "allocation, which has no profile")
        if self.cut_paths == "dense" and self.iterations > 1:  # ADMM's later W-steps re-solve against u - y
            raise StructPruneError("cut_paths='dense' is the one-shot pass's (iterations=1): ADMM iterations "
                                   "re-solve every path against their consensus targets")
        if self.select not in SELECTS:
            raise StructPruneError(f"unknown select {self.select!r}: choose one of {', '.join(SELECTS)}")
        if self.target not in TARGETS:
            raise StructPruneError(f"unknown target {self.target!r}: choose one of {', '.join(TARGETS)}")
        if not (self.rho >= 0 and math.isfinite(self.rho)):
            raise StructPruneError(f"rho must be finite and >= 0, got {self.rho}")
        if self.rho == 0 and self.iterations > 1:  # the scaled dual is w / rho: ADMM needs a positive penalty
            raise StructPruneError("rho must be > 0 for ADMM iterations (iterations > 1); iterations=1 is the one-shot pass")
        for name in ("tol_abs", "tol_rel"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise StructPruneError(f"{name} must be finite and >= 0, got {v!r}")
        if not 0 <= self.r_min < 1:
            raise StructPruneError(f"r_min must be in [0, 1), got {self.r_min}")
        if not (self.damp > 0 and math.isfinite(self.damp)):  # 0 leaves singular Gram matrices unsolvable
            raise StructPruneError(f"damp must be finite and > 0 (e.g. 0.01), got {self.damp}")
        if self.input_damp is not None and not (isinstance(self.input_damp, (int, float)) and not isinstance(
                self.input_damp, bool) and self.input_damp > 0 and math.isfinite(self.input_damp)):
            raise StructPruneError(f"input_damp must be finite and > 0 (or None: damp), got {self.input_damp!r}")
        if not (self.owl_lambda >= 0 and math.isfinite(self.owl_lambda)):
            raise StructPruneError(f"owl_lambda must be finite and >= 0, got {self.owl_lambda}")
        if not (self.owl_m > 0 and math.isfinite(self.owl_m)):
            raise StructPruneError(f"owl_m must be finite and > 0, got {self.owl_m}")
        if self.activation_budget is not None:
            from .engine.activations import parse_size

            try:
                if parse_size(self.activation_budget) < 0:
                    raise ValueError
            except (TypeError, ValueError):
                raise StructPruneError(f"activation_budget must be a size such as 4GiB, 512M or inf, "
                                       f"got {self.activation_budget!r}") from None
        if self.uniform_widths and self.allocation != "uniform":
            # Same kept widths in every layer is what the uniform allocation does (and what a stock export needs).
            raise StructPruneError(f"uniform_widths needs allocation 'uniform', got {self.allocation!r}; "
                                   "drop --uniform-widths or use --allocation uniform")
        self._check_method_options()

    def _check_method_options(self):
        """Refuse an allocation the method does not run and knobs it would ignore (non-default only)."""
        opts = METHOD_OPTIONS[self.method]
        if self.allocation not in opts["allocations"]:
            raise StructPruneError(f"allocation {self.allocation!r} is not available for method {self.method!r}: "
                                   f"it supports {', '.join(opts['allocations'])}")
        defaults = {f.name: f.default for f in fields(self) if f.default is not MISSING}
        for knob in KNOBS:
            v = getattr(self, knob)
            if v == defaults[knob]:
                continue
            if reads(self.method, self.allocation, knob):
                if knob in INPUT_REFIT_KNOBS and not refits_inputs(asdict(self)):
                    raise StructPruneError(f"{knob}={v!r} is read only by the input-row refits: set inner_iterations "
                                           "or value_iterations above 0, or leave it at its default None")
                continue
            where = "; ".join(f"{m} ({'/'.join(a for a in o['allocations'] if reads(m, a, knob))})"
                              for m, o in METHOD_OPTIONS.items() if any(reads(m, a, knob) for a in o["allocations"]))
            raise StructPruneError(f"{knob}={v!r} is ignored by method {self.method!r} with allocation "
                                   f"{self.allocation!r} (read by: {where}); leave it at its default {defaults[knob]!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if math.isinf(d["temperature"]):
            d["temperature"] = "inf"
        return d

    def effective_dict(self) -> dict:
        """``to_dict()`` without the knobs this method and allocation ignore: two configs with the
        same effective dict prune identically (a table row stays valid when an unread default changes)."""
        return effective_fields(self.to_dict())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "PruneConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise StructPruneError(f"unknown config keys: {', '.join(sorted(unknown))}")
        d = dict(d)
        if d.get("temperature") == "inf":
            d["temperature"] = math.inf
        # A stored config lists every knob, read or not; those its method ignores take today's
        # defaults, so a config written before a default changed still loads.
        return cls(**_drop_unread_knobs(d, admm_only_when_iterating=False))
