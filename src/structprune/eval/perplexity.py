"""Perplexity exactly as ``docs/protocol.md`` (the SparseGPT / Wanda / SliceGPT protocol).

The corpus is tokenised once, cut into non-overlapping windows of ``seqlen`` tokens
(``nsamples = numel // seqlen``, tail dropped), and perplexity is exp of the mean
next-token NLL over all scored tokens (``seqlen - 1`` per window). Every result keeps each
window's mean NLL, from which ``eval/intervals.py`` computes the protocol's bootstrap
interval (and paired ratios between two models on the same windows).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.calibration import encode_text
from ..data.corpora import C4_EVAL_MAX_WINDOWS
from ..engine import distributed
from ..errors import StructPruneError
from ..models.loading import model_context_length
from .intervals import ppl_interval
from .protocol import Protocol, get_protocol, limit_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    """One perplexity figure and what it was measured on."""

    dataset: str
    ppl: float
    nwindows: int
    ntokens: int  # scored tokens: nwindows * (seqlen - 1)
    seqlen: int
    # Each window's mean NLL over its seqlen - 1 scored tokens, in window order (None: not kept).
    window_nlls: tuple[float, ...] | None = None

    def interval(self):
        """The perplexity's 95% bootstrap interval over windows (``eval/intervals.py``), or None
        without per-window NLLs or when one is not finite (a broken model has no interval)."""
        if not self.window_nlls or not all(math.isfinite(x) for x in self.window_nlls):
            return None
        return ppl_interval(self.window_nlls)

    def to_dict(self) -> dict:
        """Strict-JSON-ready fields, ``window_nlls`` as a list and ``ppl_interval`` ``[low, high]``
        (null when there is none)."""
        d = asdict(self)
        d["window_nlls"] = None if self.window_nlls is None else list(self.window_nlls)
        ci = self.interval()
        d["ppl_interval"] = None if ci is None else [ci.low, ci.high]
        return d


def encode_corpus(tokenizer, name: str) -> torch.Tensor:
    """Evaluation text of ``name`` (wikitext2, ptb, c4 or a file) as token ids ``[1, numel]``.

    For ``c4`` this is the C4 evaluation documents (disjoint from calibration) joined
    with a space. Cached in-process per tokenizer and corpus.
    """
    return encode_text(tokenizer, name, split="eval")


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def protocol_windows(ids: torch.Tensor, seqlen: int, limit: int | None, context: int, dataset: str = "ids"):
    """The protocol's windows ``[nwindows, seqlen]`` of ``ids``: non-overlapping, tail dropped,
    the first ``limit``; clear errors for a window beyond the context or a text too short."""
    ids = ids.reshape(-1)
    if seqlen > context:
        raise StructPruneError(
            f"seqlen {seqlen} exceeds the model's context length {context}; pass --seqlen {context} or less"
        )
    if seqlen < 2:
        raise StructPruneError(f"seqlen must be at least 2, got {seqlen}")
    nwindows = ids.numel() // seqlen
    if limit is not None:
        nwindows = min(nwindows, int(limit))
    if nwindows < 1:
        raise StructPruneError(
            f"'{dataset}' has {ids.numel()} tokens, fewer than one window of {seqlen} (or limit={limit}); "
            "use a shorter seqlen or a longer text"
        )
    return ids[: nwindows * seqlen].view(nwindows, seqlen)


@torch.inference_mode()
def perplexity_from_ids(
    model,
    ids: torch.Tensor,
    seqlen: int,
    limit: int | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 1,
    progress: bool = True,
    dataset: str = "ids",
) -> PerplexityResult:
    """Perplexity of pre-encoded ids ``[1, numel]`` (or 1-D) over non-overlapping windows.

    ``limit`` keeps the first ``limit`` windows. NLL is summed in float64 from
    float32 logits, so fp16/bf16 models neither overflow nor lose precision here.
    """
    windows = protocol_windows(ids, seqlen, limit, model_context_length(model), dataset)
    nwindows = windows.shape[0]
    device = torch.device(device) if device is not None else _model_device(model)
    # A distributed run's rank scores the windows of its chunks (engine/distributed.py); the NLLs are
    # gathered in window order below and summed as one process sums them.
    index = distributed.window_indices(nwindows, batch_size) if distributed.is_distributed() else None
    mine = windows if index is None else windows[index]

    window_sums: list[float] = []
    bar = tqdm(total=mine.shape[0], desc=f"ppl {dataset}", disable=not (progress and distributed.is_main()),
               unit="win")
    for start in range(0, mine.shape[0], batch_size):
        batch = mine[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        shift_logits = logits[:, :-1, :].float()
        labels = batch[:, 1:]
        nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), labels.reshape(-1), reduction="none")
        per_window = nll.double().view(batch.size(0), -1).sum(1)
        window_sums.extend(per_window.tolist())
        del logits, shift_logits, nll
        bar.update(batch.size(0))
    bar.close()
    if index is not None:
        window_sums = distributed.gather_rows(torch.tensor(window_sums, dtype=torch.float64), index, nwindows).tolist()
    count = nwindows * (seqlen - 1)
    nll_sum = 0.0  # Python float: float64 accumulation across windows, batch by batch
    for start in range(0, nwindows, batch_size):
        nll_sum += torch.tensor(window_sums[start:start + batch_size], dtype=torch.float64).sum().item()

    mean_nll = nll_sum / count
    if not math.isfinite(mean_nll):
        logger.warning("non-finite NLL on %s: the model produced NaN/inf logits", dataset)
    ppl = float("nan") if math.isnan(mean_nll) else (math.exp(mean_nll) if mean_nll < 709 else float("inf"))
    result = PerplexityResult(dataset=dataset, ppl=ppl, nwindows=nwindows, ntokens=count, seqlen=seqlen,
                              window_nlls=tuple(x / (seqlen - 1) for x in window_sums))
    logger.info("%s: ppl %.4f over %d windows of %d (%d tokens)", dataset, ppl, nwindows, seqlen, count)
    return result


def perplexity(
    model,
    tokenizer,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    limit: int | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``dataset`` (wikitext2, ptb, c4 or a text file) per the protocol.

    C4 is capped at its first ``C4_EVAL_MAX_WINDOWS`` (256) windows; our 400 C4
    evaluation documents may give fewer, and ``nwindows`` in the result says how many.
    """
    context = model_context_length(model)
    if seqlen > context:  # check before the slow tokenisation
        raise StructPruneError(
            f"seqlen {seqlen} exceeds the model's context length {context}; pass --seqlen {context} or less"
        )
    ids = encode_corpus(tokenizer, dataset)
    if dataset.lower() == "c4":
        limit = C4_EVAL_MAX_WINDOWS if limit is None else min(limit, C4_EVAL_MAX_WINDOWS)
    return perplexity_from_ids(
        model, ids, seqlen, limit=limit, device=device, batch_size=batch_size, progress=progress, dataset=dataset
    )


def evaluate_datasets(
    model,
    tokenizer,
    datasets: list[str] | None = None,
    seqlen: int = 2048,
    limit: int | None | dict[str, int | None] = None,
    device: str | torch.device | None = None,
    batch_size: int = 1,
    progress: bool = True,
    protocol: str | Protocol | None = None,
) -> dict[str, PerplexityResult]:
    """:func:`perplexity` on each dataset, same settings; keyed by dataset name. ``limit`` is
    one window limit for every dataset or a mapping ``{dataset: limit}``. ``protocol``
    (``"cpu"``, ``"gpu"`` or a :class:`Protocol`) sets the datasets (unless given: those of its
    sets that can be read here, with a warning for a set left out, such as PTB), the window
    length and the windows of docs/protocol.md; each result keeps its per-window NLLs, so
    ``result.interval()`` and :func:`~structprune.eval.paired_ratio` compare models."""
    if protocol is not None:
        proto = get_protocol(protocol) if isinstance(protocol, str) else protocol
        if datasets is None:
            datasets, notes = proto.readable_datasets()
            for note in notes:
                logger.warning("%s", note)
        seqlen, limit = proto.eval_seqlen, proto.eval_limits
    if not datasets:
        raise StructPruneError("evaluate_datasets needs datasets or a protocol")
    return {
        name: perplexity(
            model, tokenizer, name, seqlen=seqlen, limit=limit_for(limit, name), device=device, batch_size=batch_size,
            progress=progress,
        )
        for name in datasets
    }
