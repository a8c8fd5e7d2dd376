"""Write a pruned model folder atomically: nothing half-written is ever left at the output path."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import StructPruneError


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder next to ``path``; move it into place only if the block succeeds."""
    path = Path(path).expanduser().resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise StructPruneError(f"output path {path} exists and is not empty; pass --overwrite or choose another")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


def save_pruned(model, tokenizer, out_dir: str | os.PathLike, report: dict | None = None,
                plans=None) -> None:
    """Save weights (safetensors), config, tokenizer, ``report.json`` and ``plan.json`` to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if report is not None:
        write_json(out / "report.json", report)
    if plans is not None:
        write_json(out / "plan.json", [p.to_dict() for p in plans])
