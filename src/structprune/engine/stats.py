"""Per-module calibration statistics, accumulated with forward pre-hooks while streaming.

For a module whose output is ``W @ z`` (attention: ``z`` the concatenated per-head
outputs entering ``o_proj``; MLP: the channel activations entering ``down_proj``/``fc2``)
we keep the Gram matrix ``H = sum z z^T``, the sum of ``z`` and the token count: every
scorer and solver of the project is a function of these (method.md). We also keep the
squared norm of each feature of the module's input ``x`` (Wanda-style input norms).

Solvers that refit a module to an external target ``t`` (StructPrune's ADMM: consensus minus
dual) also keep the cross term ``C = sum t [z; 1]^T`` and ``sum |t|^2``; the one accumulator
(:class:`StatsAccumulator`) does both, so every statistic of the project is summed the same way.

Sums are exact in practice and independent of the order of the chunks: each chunk's products are
formed in float32 (the compute dtype's GEMMs) and added into float64 accumulators, and scalar
sums (``yy``) are kept per chunk and added with ``math.fsum``. A distributed run, whose ranks sum
different chunks (engine/distributed.py), then reduces to the same bits as one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..adapters import Adapter
from ..errors import CalibrationError
from . import distributed
from .capture import LayerInputs, run_layer
from .clock import timed_call

MODULES = ("attn", "mlp")


@dataclass
class ModuleStats:
    """Statistics of one module's inner activations ``z`` ([tokens, n]) and inputs ``x``."""

    gram: torch.Tensor | None  # [n, n] float64, sum over tokens of z z^T
    zsum: torch.Tensor  # [n]
    zsq: torch.Tensor  # [n] sum of z^2 (diag of gram, kept even when gram is off)
    xsq: torch.Tensor  # [d] sum of x^2 over tokens
    count: int = 0
    #: per MLP part (experts), when the module has more than one; the fields above then hold the
    #: concatenation over parts (``gram`` None: solvers use each part's)
    parts: list["ModuleStats"] | None = None
    #: against an external target ``t`` ([tokens, d]): ``C = sum t [z; 1]^T`` ([d, n + 1]) and
    #: ``sum |t|^2``; None when the module's own output is the target
    C: torch.Tensor | None = None
    yy: float = 0.0

    @classmethod
    def concat(cls, parts: list["ModuleStats"]) -> "ModuleStats":
        """One module's view of several parts: per-channel vectors concatenated in part order.

        Every part counts every token (zeros where an expert was not routed), so counts agree;
        ``xsq`` is the first part's (each part's own inputs are in ``parts``)."""
        return cls(gram=None, zsum=torch.cat([p.zsum for p in parts]), zsq=torch.cat([p.zsq for p in parts]),
                   xsq=parts[0].xsq, count=parts[0].count, parts=parts)

    @property
    def mean(self) -> torch.Tensor:
        return self.zsum / self.count

    @property
    def norm(self) -> torch.Tensor:
        """L2 norm of each inner activation over the calibration tokens."""
        return self.zsq.sqrt()

    @property
    def variance(self) -> torch.Tensor:
        """Per-channel variance over tokens (FLAP's fluctuation), unbiased."""
        n = self.count
        return ((self.zsq - self.zsum ** 2 / n) / max(n - 1, 1)).clamp_min(0)

    @property
    def xnorm(self) -> torch.Tensor:
        return self.xsq.sqrt()

    def check_finite(self, where: str) -> None:
        for name in ("gram", "zsum", "zsq", "xsq", "C"):
            t = getattr(self, name)
            if t is not None and not torch.isfinite(t).all():
                raise CalibrationError(
                    f"NaN or Inf in calibration statistics ({name}) of {where}: check the calibration "
                    "text and the model weights; in float16 try --dtype bfloat16 or float32")


@dataclass
class StatsAccumulator:
    """Sums :class:`ModuleStats` per module name over the chunks a forward pass sees: ``add_z``
    (inner activations, optionally with a target), ``add_x`` (inputs); ``*_hook`` and
    :meth:`part_emitter` wrap them as module hooks. ``gram=False`` skips the ``n x n`` Gram."""

    gram: bool
    stats: dict[str, ModuleStats] = field(default_factory=dict)
    yy_parts: dict[str, list[float]] = field(default_factory=dict)  # per chunk, for math.fsum

    def _get(self, name: str, n: int, d: int, device) -> ModuleStats:
        if name not in self.stats:
            f = dict(dtype=torch.float64, device=device)
            self.stats[name] = ModuleStats(
                gram=torch.zeros(n, n, **f) if self.gram else None,
                zsum=torch.zeros(n, **f), zsq=torch.zeros(n, **f), xsq=torch.zeros(d, **f))
        return self.stats[name]

    @timed_call("statistics")
    def add_z(self, name: str, z: torch.Tensor, d: int, count: int | None = None,
              target: torch.Tensor | None = None) -> None:
        """Add inner activations ``z``; ``count`` tokens (default: ``z``'s rows; more when the rows
        left out are zeros, e.g. tokens not routed to an expert). ``target``: the output ``z``
        should be mapped to on these tokens ([..., d], same tokens), accumulated into ``C``/``yy``."""
        z = z.detach().reshape(-1, z.shape[-1]).float()  # [tokens, n]
        s = self._get(name, z.shape[1], d, z.device)
        if s.gram is not None:
            # float32 products of a row block at a time added into float64: the sum is exact in
            # practice, so any order or split of the chunks gives the same bits (module docstring),
            # and the float32 temporary is at most a sixteenth of the Gram. Only the blocks on and
            # above the diagonal are formed (half the GEMM work; finish() mirrors them): measured
            # 100 ms against 150 ms per 2048-token chunk at n = 1536 for the float32 addmm_ it replaced.
            for i, j in row_blocks(z.shape[1]):
                s.gram[i:j, i:] += z[:, i:j].T @ z[:, i:]
        s.zsum += z.sum(0)
        s.zsq += (z * z).sum(0)
        s.count += z.shape[0] if count is None else count
        if target is not None:
            t = target.detach().reshape(-1, target.shape[-1]).float()
            if s.C is None:
                s.C = torch.zeros(t.shape[1], z.shape[1] + 1, dtype=torch.float64, device=z.device)
            s.C[:, :-1] += t.T @ z
            s.C[:, -1] += t.sum(0)
            self.yy_parts.setdefault(name, []).append(float((t * t).sum()))

    @timed_call("statistics")
    def finish(self) -> dict[str, ModuleStats]:
        """The totals over every chunk this pass saw (the Gram made whole from its upper blocks), on
        every rank of a distributed run: each module's Gram in one collective and its other sums in
        another (module names in sorted order, the same on every rank); ``yy`` the correctly rounded
        sum of the per-chunk values. Call once."""
        for name in sorted(self.stats):
            s = self.stats[name]
            if s.gram is not None:
                for i, j in row_blocks(s.gram.shape[0]):  # the lower blocks from the upper: exactly symmetric
                    s.gram[j:, i:j] = s.gram[i:j, j:].T
                distributed.sum_tensors([s.gram])
            if distributed.is_distributed():
                count = torch.tensor([float(s.count)], dtype=torch.float64, device=s.zsum.device)  # exact to 2^53
                distributed.sum_tensors([s.zsum, s.zsq, s.xsq] + ([s.C] if s.C is not None else []) + [count])
                s.count = int(count.item())
            if s.C is not None:
                s.yy = distributed.fsum_parts(self.yy_parts.get(name, []))
        return self.stats

    @timed_call("statistics")
    def add_x(self, name: str, x: torch.Tensor, n: int) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        s = self._get(name, n, x.shape[1], x.device)
        s.xsq += (x * x).sum(0)

    def z_hook(self, name: str, d: int):
        def hook(module, args):
            self.add_z(name, args[0], d)
        return hook

    def x_hook(self, name: str, n: int):
        def hook(module, args):
            self.add_x(name, args[0], n)
        return hook

    def part_emitter(self, sizes: list[int], d: int):
        """``emit(part, z=, x=, count=)`` for :meth:`Adapter.register_mlp_capture`: stats under
        ``"mlp"`` for one part, ``"mlp.<i>"`` for several."""
        def emit(i, z=None, x=None, count=None):
            name = "mlp" if len(sizes) == 1 else f"mlp.{i}"
            if z is not None:
                self.add_z(name, z, d, count)
            if x is not None:
                self.add_x(name, x, sizes[i])
        return emit


def row_blocks(n: int, blocks: int = 16):
    """``(start, end)`` of ``blocks`` row blocks covering ``range(n)``."""
    step = max(1, -(-n // blocks))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def collect_stats(adapter: Adapter, layer, inputs: LayerInputs, device, modules=MODULES,
                  gram: bool = True, where: str = "layer", return_outputs: bool = False):
    """Run ``layer`` over ``inputs`` and return ``{module: ModuleStats}`` (and the outputs)."""
    acc = StatsAccumulator(gram=gram)
    handles = []
    sizes = []
    for name in modules:
        if name == "attn":
            ins, out = adapter.attn_linears(layer)
            handles.append(out.register_forward_pre_hook(acc.z_hook(name, ins[0].in_features)))
            handles.append(ins[0].register_forward_pre_hook(acc.x_hook(name, out.in_features)))
        else:  # one or more MLP parts (experts), captured by the adapter
            parts = adapter.mlp_parts(layer)
            sizes = [p.size for p in parts]
            d = parts[0].in_weights()[0].shape[1]
            handles += adapter.register_mlp_capture(layer, acc.part_emitter(sizes, d))
    try:
        outputs = run_layer(layer, inputs, device)
    finally:
        for h in handles:
            h.remove()
    acc.finish()
    for name, s in acc.stats.items():
        s.check_finite(f"{where} {name}")
    stats = acc.stats
    if len(sizes) > 1:  # the adapter emits every part on every chunk (an unrouted expert: zero rows)
        stats["mlp"] = ModuleStats.concat([stats.pop(f"mlp.{i}") for i in range(len(sizes))])
    return (stats, outputs) if return_outputs else stats
