"""A run's journal: what a killed streamed run needs to continue from its last finished layer.

A streamed run is a sequence of *phases* (a result computed once, e.g. the sensitivities) and
*passes* (one step per decoder layer, each step turning the layer's inputs and a small
loop-carried ``carry`` into a per-layer result, the next layer's inputs and the next carry).
The journal records, as they finish,

* each finished phase's result: ``phases/NAME.json`` (+ ``.safetensors``);
* each finished layer's result: ``passes/PP/layer-IIIII.json`` (+ ``.safetensors``);
* a pass's *state* after its latest checkpointed layer (the carry and the next layer's hidden
  states): ``passes/PP/state.json`` (+ ``.safetensors``), replaced atomically;
* ``passes/PP/done.json`` when a pass has finished (its final carry inside).

Every file is written under a temporary name, fsynced and renamed, so a kill leaves either the
old or the new version. Results are made of plain values, tensors, activation stores, layer
inputs and registered dataclasses, stored as JSON plus one safetensors file: nothing is ever
unpickled (the folder lives next to the user's output and is read back).

Computation is deterministic given its inputs, so a resumed run that restores exactly the
stored tensors produces the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import StructPruneError
from .activations import ActivationStore
from .capture import LayerInputs

#: how a distributed run refuses ranks whose journals stopped at different points (the commit barrier
#: of :func:`save_value` keeps them together; a resume checks it)
JOURNALS_APART = "their journals of the interrupted run stopped at different points; start afresh with --overwrite"
JOURNAL_VERSION = 3  # 2: StructPrune's profile results are {"menus", "final"}; 3: its menus unweighted, the profile pass before the sensitivities
_DATACLASSES: dict[str, type] = {}


def register(cls: type) -> type:
    """Allow instances of dataclass ``cls`` in journaled results (usable as a decorator)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    _DATACLASSES[f"{cls.__module__}:{cls.__qualname__}"] = cls
    return cls


# -- values <-> (JSON spec, tensors) ------------------------------------------------------------

class _Packer:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self._ids: dict[int, str] = {}  # tensors shared between places are stored once
        self._storages: set[int] = set()

    def tensor(self, t: torch.Tensor) -> str:
        ident = id(t)
        key = self._ids.get(ident)
        if key is None:
            key = f"t{len(self.tensors)}"
            # safetensors needs contiguous CPU tensors that share no storage (a view is copied)
            t = t.detach().to("cpu").contiguous()
            ptr = t.untyped_storage().data_ptr()
            if t.untyped_storage().nbytes() != t.numel() * t.element_size() or ptr in self._storages:
                t = t.clone()
            self._storages.add(t.untyped_storage().data_ptr())
            self.tensors[key] = t
            self._ids[ident] = key
        return key

    def pack(self, obj):
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {"__float__": repr(obj)}
        if isinstance(obj, torch.Tensor):
            return {"__tensor__": self.tensor(obj)}
        if isinstance(obj, torch.dtype):
            return {"__dtype__": str(obj).replace("torch.", "")}
        if isinstance(obj, torch.device):
            return {"__device__": str(obj)}
        if isinstance(obj, LayerInputs):
            return {"__inputs__": self.pack(obj.hidden), "kwargs": self.pack(obj.kwargs)}
        if isinstance(obj, ActivationStore):  # before list: a store is a list
            return {"__store__": [self.tensor(c) for c in obj],
                    "dtype": self.pack(obj.dtype), "source_dtype": self.pack(obj.source_dtype)}
        if isinstance(obj, tuple):
            return {"__tuple__": [self.pack(v) for v in obj]}
        if isinstance(obj, list):
            return [self.pack(v) for v in obj]
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: self.pack(v) for k, v in obj.items()}
            return {"__items__": [[self.pack(k), self.pack(v)] for k, v in obj.items()]}
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            name = f"{type(obj).__module__}:{type(obj).__qualname__}"
            if name not in _DATACLASSES:
                raise TypeError(f"{name} is not registered for the run journal (engine.journal.register)")
            return {"__dataclass__": name,
                    "fields": {f.name: self.pack(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
        raise TypeError(f"cannot journal a {type(obj).__name__}")


def _unpack(spec, tensors: dict[str, torch.Tensor]):
    if spec is None or isinstance(spec, (bool, int, float, str)):
        return spec
    if isinstance(spec, list):
        return [_unpack(v, tensors) for v in spec]
    if "__float__" in spec:
        return float(spec["__float__"])
    if "__tensor__" in spec:
        return tensors[spec["__tensor__"]]
    if "__dtype__" in spec:
        return getattr(torch, spec["__dtype__"])
    if "__device__" in spec:
        return torch.device(spec["__device__"])
    if "__inputs__" in spec:
        return LayerInputs(_unpack(spec["__inputs__"], tensors), _unpack(spec["kwargs"], tensors))
    if "__store__" in spec:
        store = ActivationStore(dtype=_unpack(spec["dtype"], tensors))
        store.extend(tensors[k] for k in spec["__store__"])
        store.source_dtype = _unpack(spec["source_dtype"], tensors)
        return store
    if "__tuple__" in spec:
        return tuple(_unpack(v, tensors) for v in spec["__tuple__"])
    if "__items__" in spec:
        return {_unpack(k, tensors): _unpack(v, tensors) for k, v in spec["__items__"]}
    if "__dataclass__" in spec:
        cls = _DATACLASSES.get(spec["__dataclass__"])
        if cls is None:
            raise StructPruneError(f"run journal names an unknown type {spec['__dataclass__']!r}")
        obj = cls.__new__(cls)
        for name, value in spec["fields"].items():
            object.__setattr__(obj, name, _unpack(value, tensors))  # frozen dataclasses too
        return obj
    return {k: _unpack(v, tensors) for k, v in spec.items()}


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_value(path: Path, obj, before_commit=None) -> None:
    """Write ``obj`` to ``path`` (.json) and, if it holds tensors, ``path`` with ``.safetensors``;
    atomically (the JSON, written last, names the tensors file it goes with). ``before_commit()``
    runs when everything but the JSON's rename is on disk (a distributed run's barrier: every rank
    has written its part before any rank commits, so their journals stay one checkpoint)."""
    packer = _Packer()
    spec = packer.pack(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors_name = None
    if packer.tensors:
        # A fresh name per write: the JSON that points at it is replaced atomically afterwards,
        # so a kill in between leaves the old pair intact.
        n = 0
        while (path.parent / f"{path.stem}.{n}.safetensors").exists():
            n += 1
        tensors_name = f"{path.stem}.{n}.safetensors"
        tmp = path.parent / (tensors_name + ".tmp")
        save_file(packer.tensors, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path.parent / tensors_name)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"version": JOURNAL_VERSION, "tensors": tensors_name, "value": spec}, f)
        f.flush()
        os.fsync(f.fileno())
    old = _tensors_file(path)
    if before_commit is not None:
        before_commit()
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None and old != tensors_name:
        (path.parent / old).unlink(missing_ok=True)


def _tensors_file(path: Path) -> str | None:
    try:
        with open(path) as f:
            return json.load(f).get("tensors")
    except (OSError, ValueError):
        return None


def load_value(path: Path):
    """The value :func:`save_value` wrote to ``path``."""
    with open(path) as f:
        record = json.load(f)
    if record.get("version") != JOURNAL_VERSION:
        raise StructPruneError(f"{path} was written by another version of StructPrune's run journal")
    tensors = {}
    if record["tensors"] is not None:
        name = record["tensors"]
        if "/" in name or "\\" in name or name.startswith("."):
            raise StructPruneError(f"{path} names a tensors file outside its folder: {name!r}")
        tensors = load_file(str(path.parent / name))
    return _unpack(record["value"], tensors)


# -- the journal ----------------------------------------------------------------------------------

class RunJournal:
    """The journal of one run in ``folder``. ``identity`` (JSON-able) says which run it is: a
    journal left by a run with another identity (other model, calibration, options) is refused,
    never mixed in. ``resume=False`` starts afresh (deleting what is there)."""

    def __init__(self, folder: str | os.PathLike, identity: dict, resume: bool = True, before_commit=None):
        self.folder = Path(folder)
        # called before each checkpoint, finished pass or phase is committed (save_value)
        self.before_commit = before_commit
        identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
        run_file = self.folder / "run.json"
        if resume and run_file.exists():
            stored = load_value(run_file)
            if stored != identity:
                diff = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
                raise StructPruneError(
                    f"the interrupted run in {self.folder.parent} was started with a different "
                    f"{', '.join(diff)}; run the same command to resume it, or start afresh without --resume")
            self.resumed = True
        else:
            if self.folder.exists():
                shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True)
            save_value(run_file, identity)
            self.resumed = False
        self._passes = 0

    # -- phases: results computed once -------------------------------------------------------
    def phase(self, name: str):
        """The stored result of phase ``name``, or None if it has not finished."""
        path = self.folder / "phases" / f"{_safe(name)}.json"
        return load_value(path) if path.exists() else None

    def finish_phase(self, name: str, value) -> None:
        save_value(self.folder / "phases" / f"{_safe(name)}.json", value, self.before_commit)

    # -- passes ---------------------------------------------------------------------------------
    def next_pass(self, desc: str) -> "PassJournal":
        """The journal of the run's next pass (passes are numbered in the order they start, which
        a deterministic run repeats)."""
        self._passes += 1
        return PassJournal(self.folder / "passes" / f"{self._passes:03d}", desc, self.before_commit)


class PassJournal:
    """One pass: per-layer results and the state after the latest checkpointed layer."""

    def __init__(self, folder: Path, desc: str, before_commit=None):
        self.folder, self.desc, self.before_commit = folder, desc, before_commit
        meta = folder / "pass.json"
        if meta.exists():
            if load_value(meta) != desc:
                raise StructPruneError(f"run journal: pass {folder.name} was {load_value(meta)!r}, not {desc!r}")
        else:
            save_value(meta, desc)

    def finished(self):
        """``(results, carry)`` of a finished pass, else None."""
        path = self.folder / "done.json"
        if not path.exists():
            return None
        done = load_value(path)
        return [self.result(i) for i in range(done["layers"])], done["carry"]

    def state(self):
        """``(last_layer, carry, next_inputs_hidden)`` of the latest checkpoint, else None."""
        path = self.folder / "state.json"
        if not path.exists():
            return None
        s = load_value(path)
        return s["after"], s["carry"], s["hidden"]

    def result(self, i: int):
        return load_value(self._layer(i))

    def save_result(self, i: int, result) -> None:
        save_value(self._layer(i), result)

    def checkpoint(self, i: int, carry, hidden) -> None:
        """The pass can continue after layer ``i`` from ``carry`` and the next layer's ``hidden``."""
        save_value(self.folder / "state.json", {"after": i, "carry": carry, "hidden": hidden}, self.before_commit)

    def finish(self, layers: int, carry) -> None:
        save_value(self.folder / "done.json", {"layers": layers, "carry": carry}, self.before_commit)
        for p in self.folder.glob("state*"):
            p.unlink(missing_ok=True)

    def _layer(self, i: int) -> Path:
        return self.folder / f"layer-{i:05d}.json"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
