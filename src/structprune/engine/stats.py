"""Per-module calibration statistics, accumulated with forward pre-hooks while streaming.

For a module whose output is ``W @ z`` (attention: ``z`` the concatenated per-head
outputs entering ``o_proj``; MLP: the channel activations entering ``down_proj``/``fc2``)
we keep the Gram matrix ``H = sum z z^T``, the sum of ``z`` and the token count: every
scorer and solver of the project is a function of these (method.md). We also keep the
squared norm of each feature of the module's input ``x`` (Wanda-style input norms).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..adapters import Adapter
from ..errors import CalibrationError
from .capture import LayerInputs, run_layer

MODULES = ("attn", "mlp")


@dataclass
class ModuleStats:
    """Statistics of one module's inner activations ``z`` ([tokens, n]) and inputs ``x``."""

    gram: torch.Tensor | None  # [n, n] float32, sum over tokens of z z^T
    zsum: torch.Tensor  # [n]
    zsq: torch.Tensor  # [n] sum of z^2 (diag of gram, kept even when gram is off)
    xsq: torch.Tensor  # [d] sum of x^2 over tokens
    count: int = 0

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
        for name in ("gram", "zsum", "zsq", "xsq"):
            t = getattr(self, name)
            if t is not None and not torch.isfinite(t).all():
                raise CalibrationError(
                    f"NaN or Inf in calibration statistics ({name}) of {where}: check the calibration "
                    "text and the model weights; in float16 try --dtype bfloat16 or float32")


@dataclass
class _Accumulator:
    gram: bool
    stats: dict[str, ModuleStats] = field(default_factory=dict)

    def _get(self, name: str, n: int, d: int, device) -> ModuleStats:
        if name not in self.stats:
            f = dict(dtype=torch.float32, device=device)
            self.stats[name] = ModuleStats(
                gram=torch.zeros(n, n, **f) if self.gram else None,
                zsum=torch.zeros(n, **f), zsq=torch.zeros(n, **f), xsq=torch.zeros(d, **f))
        return self.stats[name]

    def z_hook(self, name: str, d: int):
        def hook(module, args):
            z = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, n]
            s = self._get(name, z.shape[1], d, z.device)
            if s.gram is not None:
                s.gram.addmm_(z.T, z)
            s.zsum += z.sum(0)
            s.zsq += (z * z).sum(0)
            s.count += z.shape[0]
        return hook

    def x_hook(self, name: str, n: int):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = self._get(name, n, x.shape[1], x.device)
            s.xsq += (x * x).sum(0)
        return hook


def collect_stats(adapter: Adapter, layer, inputs: LayerInputs, device, modules=MODULES,
                  gram: bool = True, where: str = "layer", return_outputs: bool = False):
    """Run ``layer`` over ``inputs`` and return ``{module: ModuleStats}`` (and the outputs)."""
    acc = _Accumulator(gram=gram)
    handles = []
    for name in modules:
        ins, out = adapter.attn_linears(layer) if name == "attn" else adapter.mlp_linears(layer)
        handles.append(out.register_forward_pre_hook(acc.z_hook(name, ins[0].in_features)))
        handles.append(ins[0].register_forward_pre_hook(acc.x_hook(name, out.in_features)))
    try:
        outputs = run_layer(layer, inputs, device)
    finally:
        for h in handles:
            h.remove()
    for name, s in acc.stats.items():
        s.check_finite(f"{where} {name}")
    return (acc.stats, outputs) if return_outputs else acc.stats
