"""Zero-shot task data (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-easy/-challenge, OpenBookQA) as local files.

lm-eval reads its task data from the Hugging Face hub at run time; this module finds the same rows
offline, as JSON lines in the Hugging Face schema (one document a line, the split lm-eval evaluates).
Where each task's file comes from, first match wins (the order of the text corpora, data/corpora.py):

1. a user-supplied folder: ``--zero-shot-data DIR`` / ``$STRUCTPRUNE_ZEROSHOT_DATA``, else ``zeroshot/``
   inside the assets folder (``$STRUCTPRUNE_ASSETS`` or ``../shared/assets``), holding files named as
   in :data:`TASK_FILES` (``.jsonl`` or ``.jsonl.gz``);
2. the copies shipped inside the package (``data/bundled``: the six sets whose licences allow it; see
   its README), verified by SHA-256 (of the decompressed JSON lines) on every read;
3. the hub, through lm-eval's own task, where it is reachable (returned here as ``None``).

OpenBookQA has no licence that we found and does not ship: it comes from a user file or the hub.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import StructPruneError
from .corpora import BUNDLED_DIR, find_assets_dir

ZEROSHOT_DATA_ENV = "STRUCTPRUNE_ZEROSHOT_DATA"

#: task -> (file stem, the split lm-eval evaluates). The file is ``<stem>.jsonl`` or ``<stem>.jsonl.gz``.
TASK_FILES = {
    "boolq": ("boolq_validation", "validation"),
    "piqa": ("piqa_validation", "validation"),
    "hellaswag": ("hellaswag_validation", "validation"),
    "winogrande": ("winogrande_validation", "validation"),
    "arc_easy": ("arc_easy_test", "test"),
    "arc_challenge": ("arc_challenge_test", "test"),
    "openbookqa": ("openbookqa_test", "test"),
}
#: The shipped sets: task -> SHA-256 of the decompressed JSON lines (data/bundled/SHA256SUMS).
BUNDLED_TASKS = {
    "boolq": "2f8abf3b60339b697916885e187f152c8de9d63e81951717e7babda58a566b04",
    "piqa": "61533005e22f175534909b1ec8eacb6da03c233933558d1bafb15787453b1f55",
    "hellaswag": "d5c08c3e5771307e73886dc9d2744df8ca5f372a7857f32fe77df8c58942f950",
    "winogrande": "69f3d7f3a900d775339b04c7de672609c40fca573e50f594f2ae66d8782505be",
    "arc_easy": "6ce8fb7b4baa1a5d6f2f1b92a3055787cf04759819c3f03195cda787822f7f12",
    "arc_challenge": "a03a11a8fee86f6d0607f426e7b3b7a9180a4894170e934da75596e93c4b51f1",
}
OPENBOOKQA_ABSENT = (
    "OpenBookQA does not ship with StructPrune (no licence for its data was found): put openbookqa_test.jsonl "
    f"(the Hugging Face allenai/openbookqa main test rows) in a folder passed as --zero-shot-data or "
    f"${ZEROSHOT_DATA_ENV}, or run where the Hugging Face hub is reachable"
)


@dataclass(frozen=True)
class TaskData:
    """One task's documents, read from a local file."""

    task: str
    split: str
    source: str  # "folder" (user-supplied) or "packaged"
    path: str
    sha256: str  # of the decompressed JSON lines
    rows: tuple[str, ...]  # the JSON lines, one document each, in file order

    def describe(self) -> dict:
        return {"source": self.source, "path": self.path, "split": self.split, "sha256": self.sha256,
                "documents": len(self.rows)}


def user_data_dir(folder: str | os.PathLike | None = None) -> Path | None:
    """The user-supplied task folder: ``folder``, else ``$STRUCTPRUNE_ZEROSHOT_DATA``, else the assets
    folder's ``zeroshot/``; None when there is none. A named folder that does not exist is refused."""
    for given, what in ((folder, "--zero-shot-data"), (os.environ.get(ZEROSHOT_DATA_ENV), f"${ZEROSHOT_DATA_ENV}")):
        if given:
            path = Path(given).expanduser()
            if not path.is_dir():
                raise StructPruneError(f"{what} {given} is not a folder; pass a folder holding the task files "
                                       f"({', '.join(s + '.jsonl[.gz]' for s, _ in TASK_FILES.values())})")
            return path
    assets = find_assets_dir()
    if assets is not None and (assets / "zeroshot").is_dir():
        return assets / "zeroshot"
    return None


def _user_file(folder: Path | None, stem: str) -> Path | None:
    if folder is None:
        return None
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _rows(path: Path, data: bytes) -> tuple[str, ...]:
    rows = tuple(line for line in data.decode("utf-8").splitlines() if line.strip())
    for i, line in enumerate(rows):
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            raise StructPruneError(f"{path} line {i + 1} is not a JSON object; the task files are JSON lines in "
                                   "the Hugging Face schema")
    if not rows:
        raise StructPruneError(f"{path} holds no documents")
    return rows


def _read(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (gzip.BadGzipFile, EOFError, OSError) as exc:
            raise StructPruneError(f"{path} is not a valid gzip file ({type(exc).__name__})") from None
    return data


def bundled_task_path(task: str) -> Path:
    return BUNDLED_DIR / f"{TASK_FILES[task][0]}.jsonl.gz"


def load_task_data(task: str, folder: str | os.PathLike | None = None) -> TaskData | None:
    """The documents of ``task`` from a user-supplied folder or the packaged copy (checked against its
    SHA-256), or None when only the hub can provide them (lm-eval's own task then downloads them).
    Raises for a packaged file that fails its check; OpenBookQA without a file is the caller's call
    (:data:`OPENBOOKQA_ABSENT`)."""
    if task not in TASK_FILES:
        return None
    stem, split = TASK_FILES[task]
    path = _user_file(user_data_dir(folder), stem)
    if path is not None:
        data = _read(path)
        return TaskData(task, split, "folder", str(path), hashlib.sha256(data).hexdigest(), _rows(path, data))
    if task in BUNDLED_TASKS:
        path = bundled_task_path(task)
        if path.is_file():
            data = _read(path)
            got, want = hashlib.sha256(data).hexdigest(), BUNDLED_TASKS[task]
            if got != want:
                raise StructPruneError(f"the packaged task data {path} fails its SHA-256 check (got {got[:12]}..., "
                                       f"want {want[:12]}...): reinstall structprune")
            return TaskData(task, split, "packaged", str(path), got, _rows(path, data))
    return None
