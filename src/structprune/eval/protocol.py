"""The measurement protocols of ``docs/protocol.md`` as data: calibration and evaluation sizes.

``cpu`` is sized for the 2-core machine yet able to separate methods (issue 11): 32 C4
calibration windows of 2048 tokens; evaluation on windows of 2048, the first 40 of
WikiText-2 and 20 each of PTB and C4, with per-window NLLs, bootstrap intervals and paired
ratios. ``gpu`` is the literature's protocol (SparseGPT, Wanda, SliceGPT): 128 x 2048
calibration and every evaluation window (C4: its first 256, as always).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.corpora import corpus_missing
from ..errors import StructPruneError

TITLES = {"wikitext2": "WikiText-2", "ptb": "PTB", "c4": "C4"}


@dataclass(frozen=True)
class Protocol:
    """Calibration and evaluation sizes of one protocol."""

    name: str
    calib_nsamples: int
    calib_seqlen: int
    eval_seqlen: int
    # Windows scored per dataset (the first ones, in order); None: every window.
    eval_limits: dict[str, int | None] = field(default_factory=dict)

    @property
    def datasets(self) -> list[str]:
        return list(self.eval_limits)

    def readable_datasets(self) -> tuple[list[str], list[str]]:
        """The protocol's evaluation sets that can be read here, and one line for each set left
        out (PTB, which does not ship, where no assets folder or hub provides it): a default
        evaluation runs on what it has and says what it skipped; naming a set still requires it."""
        have, notes = [], []
        for d in self.datasets:
            why = corpus_missing(d)
            if why is None:
                have.append(d)
            else:
                notes.append(f"{TITLES.get(d, d)} left out of the {self.name} protocol's evaluation: {why}")
        return have, notes

    def limit(self, dataset: str) -> int | None:
        """Windows of ``dataset`` the protocol scores (a file not named here: every window)."""
        return self.eval_limits.get(dataset.lower())

    def to_dict(self) -> dict:
        return {"name": self.name, "calibration": {"source": "c4", "nsamples": self.calib_nsamples,
                                                   "seqlen": self.calib_seqlen, "seed": 0},
                "eval_seqlen": self.eval_seqlen, "eval_windows": dict(self.eval_limits),
                "intervals": "95% percentile bootstrap over windows; comparisons as paired ratios on the same windows"}


PROTOCOLS = {
    "cpu": Protocol("cpu", 32, 2048, 2048, {"wikitext2": 40, "ptb": 20, "c4": 20}),
    "gpu": Protocol("gpu", 128, 2048, 2048, {"wikitext2": None, "ptb": None, "c4": None}),
}


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name`` (``cpu`` or ``gpu``)."""
    try:
        return PROTOCOLS[name.lower()]
    except KeyError:
        raise StructPruneError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}") from None


def limit_for(limit, dataset: str) -> int | None:
    """The window limit for ``dataset`` from one limit for all datasets (an int or None) or a
    mapping ``{dataset: limit}`` (a dataset it does not name gets every window)."""
    if isinstance(limit, dict):
        return limit.get(dataset.lower(), limit.get(dataset))
    return limit
