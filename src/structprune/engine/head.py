"""The LM head on streamed final hidden states: the calibration loss a user cares about.

StructPrune's passes end with the pruned model's final hidden states on the calibration windows
(and the dense model's, from the profile pass). Hidden-state distortion can move opposite to
held-out loss (docs/structprune.md), so iterates are judged by what the logits do: the KL
divergence of the pruned model's next-token distribution from the dense model's, and the
pruned model's next-token NLL, both per token over the calibration windows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import distributed
from .clock import timed_call
from .residency import moved_to

# Logits of one slice of positions at most this large (a 128k vocabulary at 2048 positions is
# 1 GiB of float32 logits per window; two models' logits are alive at once).
SLICE_BYTES = 64 * 2**20


@torch.no_grad()
@timed_call("objective")
def calibration_loss(adapter, pruned, dense, ids: torch.Tensor, device, resident=None) -> dict:
    """``{"kl", "nll", "dense_nll", "tokens"}`` per predicted token over the windows ``ids``
    (``[windows, seqlen]``: this rank's, in a distributed run), from the final hidden states
    ``pruned`` and ``dense`` (chunks of windows in order, as the streamed passes hold them); the
    sums are over every rank's tokens. ``resident(modules, device)``: the home's
    way to bring the final norm and LM head to ``device`` (a model on disk); default: moved."""
    head = adapter.head_modules()
    out_emb = adapter.model.get_output_embeddings()
    vocab = out_emb.weight.shape[0] if out_emb is not None else adapter.model.config.get_text_config().vocab_size
    kl, nll, dnll = [], [], []  # per slice: added exactly, so a split over ranks changes no bit
    tokens, start = 0, 0
    with (resident or moved_to)(head, device):
        for p, d in zip(pruned, dense):
            w = ids[start:start + p.shape[0]].to(device)
            start += p.shape[0]
            n, L = w.shape
            step = max(1, SLICE_BYTES // max(1, n * vocab * 4))
            for a in range(0, L - 1, step):
                b = min(a + step, L - 1)
                lp, ld = p[:, a:b].to(device), d[:, a:b].to(device)
                for m in head:
                    lp, ld = m(lp), m(ld)
                lp = F.log_softmax(lp.float(), -1).reshape(-1, vocab)
                ld = F.log_softmax(ld.float(), -1).reshape(-1, vocab)
                target = w[:, a + 1:b + 1].reshape(-1)
                kl.append(float((ld.exp() * (ld - lp)).sum()))
                nll.append(float(F.nll_loss(lp, target, reduction="sum")))
                dnll.append(float(F.nll_loss(ld, target, reduction="sum")))
                tokens += target.numel()
    tokens = sum(distributed.gather_objects(tokens))
    kl, nll, dnll = (distributed.fsum_parts(x) for x in (kl, nll, dnll))
    t = max(tokens, 1)
    return {"kl": kl / t, "nll": nll / t, "dense_nll": dnll / t, "ppl": math.exp(nll / t), "tokens": tokens}


__all__ = ["calibration_loss"]
