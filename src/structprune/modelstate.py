"""Leave a model where and how it was found: devices, dtypes, training mode, ``requires_grad``, ``.grad``.

Pruning borrows layers onto the compute device and hands them back to the CPU, switches the
model to eval mode and turns gradients on and off for the sensitivities. :class:`ModelState`
records the state of every module, parameter and buffer before a run and puts it back
afterwards, on success and on error alike. Pruning replaces the pruned projections by
smaller tensors (and may add output biases): a tensor that was not there before takes the
state of a tensor of its own module (the ``weight``), else of the nearest module above it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _TensorState:
    device: torch.device
    dtype: torch.dtype
    requires_grad: bool
    grad: torch.Tensor | None


def _named_tensors(model: nn.Module):
    """``(module name, module, attr, tensor, is_param)`` for every parameter and buffer, shared ones repeated."""
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is not None:
                yield mod_name, mod, attr, p, True
        for attr, b in mod._buffers.items():
            if b is not None:
                yield mod_name, mod, attr, b, False


def _replace_data(p: nn.Parameter, data: torch.Tensor) -> None:
    """Give ``p`` new data in place, so tied parameters stay one object: ``.data`` where the tensor
    types allow it (CPU <-> GPU), else swapping the objects' contents (to or from ``meta``)."""
    try:
        p.data = data
    except RuntimeError:
        torch.utils.swap_tensors(p, nn.Parameter(data, requires_grad=p.requires_grad))


def _join(mod_name: str, attr: str) -> str:
    return f"{mod_name}.{attr}" if mod_name else attr


def _ancestors(name: str):
    """``"a.b.c"`` -> ``"a.b"``, ``"a"``, ``""``."""
    while name:
        name = name.rpartition(".")[0]
        yield name


class ModelState:
    """The state of every module (training flag) and tensor (device, dtype, ``requires_grad``,
    ``.grad``) of a model: ``state = ModelState.capture(model)`` ... ``state.restore(model)``."""

    def __init__(self, training: dict[str, bool], tensors: dict[str, _TensorState]):
        self.training = training
        self.tensors = tensors

    @classmethod
    def capture(cls, model: nn.Module) -> "ModelState":
        """Record ``model``'s state now."""
        training = {name: m.training for name, m in model.named_modules(remove_duplicate=False)}
        tensors = {}
        for mod_name, _, attr, t, is_param in _named_tensors(model):
            tensors[_join(mod_name, attr)] = _TensorState(t.device, t.dtype, bool(is_param and t.requires_grad),
                                                          t.grad if is_param else None)
        return cls(training, tensors)

    def _record_for(self, mod_name: str, attr: str) -> _TensorState | None:
        rec = self.tensors.get(_join(mod_name, attr))
        if rec is not None:
            return rec
        # A tensor pruning created (a refitted bias): its module's weight, else the nearest recorded module's.
        for owner in (mod_name, *_ancestors(mod_name)):
            rec = self.tensors.get(_join(owner, "weight"))
            if rec is not None:
                return rec
        return None

    def restore(self, model: nn.Module) -> list[str]:
        """Put the recorded state back on ``model``; returns what could not be restored (a tensor on
        the ``meta`` device cannot go back to a real one), which is also logged."""
        for name, m in model.named_modules(remove_duplicate=False):
            flag = self.training.get(name)
            if flag is None:  # a module pruning created: its parent's mode
                flag = next((self.training[a] for a in _ancestors(name) if a in self.training), None)
            if flag is not None:
                m.training = flag  # per module (not .train()): mixed modes stay mixed
        failed, done = [], {}
        for mod_name, mod, attr, t, is_param in list(_named_tensors(model)):
            rec = self._record_for(mod_name, attr)
            if rec is None:
                continue
            if id(t) in done:  # shared: already restored (a moved buffer is a new tensor: share it again)
                if not is_param:
                    mod._buffers[attr] = done[id(t)]
                continue
            done[id(t)] = t
            if t.device != rec.device or t.dtype != rec.dtype:
                if t.is_meta and rec.device.type != "meta":
                    failed.append(_join(mod_name, attr))
                    continue
                moved = t.data.to(rec.device, rec.dtype if t.is_floating_point() else t.dtype)
                if is_param:
                    _replace_data(t, moved)
                else:
                    mod._buffers[attr] = done[id(t)] = moved
            if is_param:
                t.requires_grad_(rec.requires_grad)
                # A gradient the run left (sensitivities back-propagate) goes; the user's own stays if it fits.
                t.grad = rec.grad if rec.grad is not None and rec.grad.shape == t.shape else None
        if failed:
            log.warning("could not move %d tensor(s) back from the meta device: %s", len(failed), failed[:3])
        return failed
