"""Energy-based (mean-field, Stirling) allocation with a temperature (method.md).

Each module offers a greedy removal path (``solvers.obs``): step ``s`` removes ``c_s``
parameters at a sensitivity-weighted error ``e_s``. A step's energy is
``eps_s = log(e_s / c_s)`` (importance per parameter), standardised over all steps of
the model so the temperature ``T`` is dimensionless. Minimising the free energy
``sum (1 - r) eps - T H(r) + lambda (cost - budget)`` gives the logistic occupation

    r_s = sigmoid((eps_s - lambda) / T)

(a softmax ``r ~ exp(eps / T)`` when retention is small), and a module keeps
``sum_s c_s r_s`` of its removable cost. ``lambda`` is found by bisection so the
budget holds; ``T = inf`` is uniform sparsity, ``T = 0`` the hard global threshold
``e_s > exp(lambda) c_s`` of the closed form. Kept costs are then rounded to points of
each module's path: attention first (coarse: whole heads), then the MLP paths with
the remaining budget, so the achieved sparsity lands within one MLP step of target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Menu:
    """A module's removal path: kept cost after removing the first ``k`` steps is ``kept[k]``."""

    layer: int
    module: str  # "attn" | "mlp"
    full_cost: float
    step_costs: list[float]
    step_errors: list[float]  # sensitivity-weighted

    @property
    def kept(self) -> list[float]:
        out = [self.full_cost]
        for c in self.step_costs:
            out.append(out[-1] - c)
        return out

    def to_dict(self) -> dict:
        """Plain data (menus travel between solver passes and into the reuse cache as dicts)."""
        return {"layer": self.layer, "module": self.module, "full_cost": self.full_cost,
                "step_costs": list(self.step_costs), "step_errors": list(self.step_errors)}

    @classmethod
    def from_dict(cls, d: dict) -> "Menu":
        return cls(int(d["layer"]), str(d["module"]), float(d["full_cost"]), [float(c) for c in d["step_costs"]],
                   [float(e) for e in d["step_errors"]])

    @classmethod
    def from_path(cls, layer: int, module: str, full_cost: float, costs, errors, weight: float = 1.0) -> "Menu":
        """A module's menu from its removal path's step ``costs`` and ``errors``, errors weighted by
        the module's sensitivity ``weight`` so that menus of different modules are comparable."""
        return cls(layer, module, float(full_cost), [float(c) for c in costs], [weight * e for e in errors])

    def nearest_prefix(self, target_kept: float) -> int:
        k = self.kept
        return min(range(len(k)), key=lambda i: abs(k[i] - target_kept))


def nearest_prefix_reached(full_cost: float, target_kept: float):
    """A removal path's ``stop`` (solvers/obs.py) for a pass that only cuts at
    :meth:`Menu.nearest_prefix` of ``target_kept``: True after the first step whose kept cost is at
    or below the target. Kept costs fall with every step and ties go to the earlier prefix, so no
    later step can be nearer: the truncated menu's nearest prefix is the full menu's, exactly (the
    kept cost is subtracted in :attr:`Menu.kept`'s order, so the same floats are compared)."""
    kept = [float(full_cost)]

    def stop(cost: float) -> bool:
        kept[0] = kept[0] - float(cost)
        return kept[0] <= target_kept
    return stop


#: energy standardisations (``PruneConfig.energy_scale``): ``std-split`` (each bisection standardises
#: its own menus by median and standard deviation: the MLP re-solve then runs at another effective
#: temperature), ``std`` (one median and standard deviation over every module's steps, shared by both
#: bisections) and ``robust`` (shared; step ratios floored at ``ENERGY_FLOOR`` times their median
#: before the log, scale from the median absolute deviation).
ENERGY_SCALES = ("std-split", "std", "robust")
#: ``robust``: a step whose error per parameter is below this fraction of the median step's is
#: treated as that small: near-zero errors (a channel that is dead on the calibration text) would
#: otherwise map to log(1e-30), stretch the scale and so raise the effective temperature.
ENERGY_FLOOR = 1e-4
_MAD_TO_SD = 1.4826  # the median absolute deviation of a normal sample times this estimates its sd


@dataclass(frozen=True)
class EnergyScale:
    """How step energies ``log(e / c)`` are standardised: ``(max(log(e / c), floor) - center) / scale``."""

    center: float
    scale: float
    floor: float = -math.inf

    def apply(self, menu: Menu) -> torch.Tensor:
        raw = torch.tensor([math.log(max(e, 1e-30) / c) for e, c in zip(menu.step_errors, menu.step_costs)],
                           dtype=torch.float64)
        return (raw.clamp_min(self.floor) - self.center) / self.scale

    @classmethod
    def of(cls, menus: list[Menu], kind: str = "std") -> "EnergyScale":
        """The standardisation of ``menus``' steps: ``std`` (median, standard deviation) or ``robust``
        (floored at ``ENERGY_FLOOR`` times the median ratio, median, 1.4826 x median absolute deviation)."""
        raw = [math.log(max(e, 1e-30) / c) for m in menus for e, c in zip(m.step_errors, m.step_costs)]
        if not raw:
            return cls(0.0, 1.0)
        flat = torch.tensor(raw, dtype=torch.float64)
        if kind == "robust":
            floor = float(flat.median()) + math.log(ENERGY_FLOOR)
            flat = flat.clamp_min(floor)
            mu = flat.median()
            sd = _MAD_TO_SD * float((flat - mu).abs().median())
            if sd <= 1e-12:  # more than half the steps tie: fall back to the spread of all of them
                sd = float(flat.std()) if flat.numel() > 1 else 1.0
            return cls(float(mu), max(sd, 1e-12), floor)
        sd = float(flat.std()) if flat.numel() > 1 else 1.0
        return cls(float(flat.median()), max(sd, 1e-12))


def _energies(menus: list[Menu], scale: EnergyScale | None = None) -> list[torch.Tensor]:
    scale = scale or EnergyScale.of(menus)
    return [scale.apply(m) for m in menus]


def _expected_kept(menus, eps, lam: float, T: float) -> list[float]:
    out = []
    for m, e in zip(menus, eps):
        c = torch.tensor(m.step_costs, dtype=torch.float64)
        if not c.numel():
            out.append(m.full_cost)
            continue
        r = (e > lam).double() if T == 0 else torch.sigmoid((e - lam) / T)
        out.append(float(m.full_cost - (c * (1 - r)).sum()))
    return out


def _uniform_kept(menus, frac: float) -> list[float]:
    return [max(m.kept[-1], frac * m.full_cost) for m in menus]


def _bisect(fn, budget: float, lo: float, hi: float, decreasing: bool, iters: int = 100) -> float:
    """Root of ``sum(fn(x)) = budget`` for a monotone ``fn``."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        total = sum(fn(mid))
        if (total > budget) == decreasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def allocate_kept(menus: list[Menu], budget: float, temperature: float,
                  scale: EnergyScale | None = None) -> tuple[list[float], float]:
    """Continuous kept cost per module meeting ``budget``; returns ``(kept, lambda)``. ``scale``:
    the energies' standardisation (default: ``EnergyScale.of(menus)``, median and sd of these menus)."""
    if math.isinf(temperature):
        frac = _bisect(lambda f: _uniform_kept(menus, f), budget, 0.0, 1.0, decreasing=False)
        return _uniform_kept(menus, frac), frac
    eps = _energies(menus, scale)
    span = 50.0 * max(temperature, 1e-3) + 50.0
    lam = _bisect(lambda x: _expected_kept(menus, eps, x, temperature), budget, -span, span, decreasing=True)
    return _expected_kept(menus, eps, lam, temperature), lam


def allocate_prefixes(menus: list[Menu], budget: float, temperature: float,
                      energy_scale: str = "std-split") -> tuple[list[int], float]:
    """Number of path steps each module removes so that total kept cost ~= ``budget``.

    Attention paths move in whole heads; they are rounded first, then the MLP paths
    share the remaining budget (re-solved with the same rule) and are rounded.
    ``energy_scale`` (one of ``ENERGY_SCALES``): with ``std`` and ``robust`` both bisections
    standardise the energies the same way (over every module), so ``T`` means one thing;
    ``std-split`` re-standardises over the MLP menus alone for the second.
    """
    if energy_scale not in ENERGY_SCALES:
        raise ValueError(f"unknown energy_scale {energy_scale!r}: choose one of {', '.join(ENERGY_SCALES)}")
    shared = None if energy_scale == "std-split" else EnergyScale.of(menus, energy_scale)
    kept, lam = allocate_kept(menus, budget, temperature, shared)
    prefixes = [0] * len(menus)
    attn = [i for i, m in enumerate(menus) if m.module == "attn"]
    mlp = [i for i, m in enumerate(menus) if m.module != "attn"]
    for i in attn:
        prefixes[i] = menus[i].nearest_prefix(kept[i])
    rest = budget - sum(menus[i].kept[prefixes[i]] for i in attn)
    if mlp:
        sub = [menus[i] for i in mlp]
        sub_kept, _ = allocate_kept(sub, rest, temperature, shared)
        carry = 0.0  # keep the running total on budget while rounding
        for i, k in zip(mlp, sub_kept):
            prefixes[i] = menus[i].nearest_prefix(k + carry)
            carry += k - menus[i].kept[prefixes[i]]
    return prefixes, lam
