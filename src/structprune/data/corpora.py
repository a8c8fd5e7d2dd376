"""Text corpora for calibration and perplexity.

Where each corpus comes from, first match wins:

1. an assets folder (``$STRUCTPRUNE_ASSETS``, or ``../shared/assets`` beside a checkout)
   holding ``wikitext2/``, ``ptb/`` and ``c4/`` as ``shared/assets/README.md`` lays out;
2. the copies shipped inside the package (``data/bundled``: WikiText-2 raw test and the
   1,500-document C4 subset, with their licences), verified by SHA-256 on every read, so
   the default job runs on any machine with nothing beside the package;
3. ``datasets.load_dataset`` where the Hugging Face hub is reachable.

PTB is under LDC terms and is not shipped: it comes from an assets folder, ``datasets``
or a file the user passes.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import os
from pathlib import Path

from ..errors import StructPruneError

logger = logging.getLogger(__name__)

ASSETS_ENV = "STRUCTPRUNE_ASSETS"

#: Built-in corpus names accepted by :func:`load_text`.
CORPORA = ("wikitext2", "ptb", "c4")

_WIKITEXT_FILE = ("wikitext2", "wikitext-2-raw-v1.test.txt")
_PTB_FILE = ("ptb", "ptb.valid.txt")
_C4_FILE = ("c4", "c4-validation-subset-1500.json.gz")

#: Corpora shipped inside the package: file in ``data/bundled`` and the SHA-256 of what is
#: read (for the gzip-compressed WikiText, of the decompressed text, as in shared/assets).
BUNDLED_DIR = Path(__file__).with_name("bundled")
BUNDLED = {
    "wikitext2": ("wikitext-2-raw-v1.test.txt.gz", "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"),
    # WikiText-2's validation split: held-out text of a second domain for choosing hyper-parameters
    # (never calibration, never evaluation: the protocol evaluates on the test split).
    "wikitext2-valid": ("wikitext-2-raw-v1.validation.txt.gz",
                        "b44fb967f92b525731216a507d1fbc44b97446b7ef0a2b4d1a893f81f1bbc29e"),
    "c4": ("c4-validation-subset-1500.json.gz", "15f2e7b216f3c4d6be6b168dcbfa3537adc697c97bd910291f9792cb5f3076ce"),
}
PTB_ABSENT = (
    "PTB (Penn Treebank) is under LDC terms and does not ship with StructPrune: pass its validation "
    f"text as a file (e.g. --eval ./ptb.valid.txt), set {ASSETS_ENV} to a folder holding ptb/ptb.valid.txt, "
    "or pip install datasets where the Hugging Face hub is reachable"
)

# C4 document ranges (indices into the 1,500-document subset). Calibration and
# evaluation must never share text, and hyper-parameters are chosen on held-out
# calibration text that is disjoint from both.
C4_CALIB_DOCS = (0, 1000)  # calibration windows (get_calibration)
C4_HELDOUT_DOCS = (1000, 1100)  # held-out calibration for hyper-parameter selection
C4_EVAL_DOCS = (1100, 1500)  # C4 perplexity windows (first 256 windows at most)
C4_EVAL_MAX_WINDOWS = 256


def find_assets_dir() -> Path | None:
    """Return the ``shared/assets`` folder, or None if it cannot be found.

    Order: ``$STRUCTPRUNE_ASSETS``; ``../shared/assets`` relative to the working
    directory; ``<repo>/../shared/assets`` found by walking up from this file.
    """
    env = os.environ.get(ASSETS_ENV)
    if env:
        path = Path(env).expanduser()
        if path.is_dir():
            return path
        logger.warning("%s=%s is not a folder; looking elsewhere", ASSETS_ENV, env)
    candidate = Path.cwd().parent / "shared" / "assets"
    if candidate.is_dir():
        return candidate
    for parent in Path(__file__).resolve().parents:
        candidate = parent.parent / "shared" / "assets"
        if (parent / "pyproject.toml").exists() and candidate.is_dir():
            return candidate
    return None


def asset_path(*parts: str) -> Path | None:
    """Path of a file inside the assets folder, or None if the folder or file is absent."""
    root = find_assets_dir()
    if root is None:
        return None
    path = root.joinpath(*parts)
    return path if path.exists() else None


def bundled_bytes(key: str) -> bytes:
    """Content of a corpus shipped with the package (``wikitext2``, ``wikitext2-valid``: the text, ``c4``: the gzip file),
    checked against its SHA-256; raises if it is missing or altered."""
    name, want = BUNDLED[key]
    path = BUNDLED_DIR / name
    if not path.is_file():
        raise StructPruneError(f"the packaged corpus {path} is missing: reinstall structprune or set {ASSETS_ENV}")
    data = path.read_bytes()
    if key.startswith("wikitext2"):
        data = gzip.decompress(data)
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise StructPruneError(f"the packaged corpus {path} fails its SHA-256 check (got {got[:12]}..., "
                               f"want {want[:12]}...): reinstall structprune")
    return data


def _load_dataset(*args, **kwargs):
    """Call ``datasets.load_dataset``; raise StructPruneError naming both options on failure."""
    name = args[0]
    try:
        from datasets import load_dataset
    except ImportError as exc:
        if name.startswith("ptb"):
            raise StructPruneError(PTB_ABSENT) from exc
        raise StructPruneError(
            f"corpus '{name}' not found in the assets folder and the 'datasets' package is not "
            f"installed: set {ASSETS_ENV} to a folder holding shared/assets, or pip install datasets"
        ) from exc
    try:
        return load_dataset(*args, **kwargs)
    except Exception as exc:  # network, hub and cache errors come in many types
        if name.startswith("ptb"):
            raise StructPruneError(f"{PTB_ABSENT} (datasets.load_dataset failed: {type(exc).__name__})") from exc
        raise StructPruneError(
            f"corpus '{name}' not found in the assets folder and datasets.load_dataset failed "
            f"({type(exc).__name__}): set {ASSETS_ENV} to a folder holding shared/assets, "
            "or run where the Hugging Face hub is reachable"
        ) from exc


def _read_json_docs(path: Path | str, data: bytes | None = None) -> list[str]:
    """Documents of a .json (list of strings or of {'text': ...}) or .jsonl(.gz) file
    (``data``: the file's bytes, already read)."""
    path = Path(path)
    if data is None:
        data = path.read_bytes()
    try:
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        raw = data.decode("utf-8")
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
        raise StructPruneError(f"{path} is not UTF-8 JSON text ({type(exc).__name__}); "
                               "pass a plain text or JSON file") from None
    stripped = raw.lstrip()
    try:
        if stripped.startswith("["):
            items = json.loads(stripped)
        else:
            items = [json.loads(line) for line in raw.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise StructPruneError(f"{path} is not valid JSON or JSON lines ({exc}); pass a .txt file for plain text") \
            from None
    docs = []
    for item in items:
        if isinstance(item, str):
            docs.append(item)
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            docs.append(item["text"])
        else:
            raise StructPruneError(
                f"{path}: expected JSON strings or objects with a 'text' field; "
                "convert the file or pass a plain .txt file"
            )
    return docs


@functools.lru_cache(maxsize=4)
def _c4_documents_cached() -> tuple[str, ...]:
    path = asset_path(*_C4_FILE)
    if path is not None:
        return tuple(_read_json_docs(path))
    if (BUNDLED_DIR / BUNDLED["c4"][0]).is_file():
        return tuple(_read_json_docs(BUNDLED["c4"][0], bundled_bytes("c4")))
    logger.info("C4 subset not in assets; loading allenai/c4 en validation via datasets")
    ds = _load_dataset(
        "allenai/c4",
        data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
        split="validation",
    )
    # Same size as the shipped subset, so the document ranges below mean the same.
    return tuple(ds["text"][:1500])


def load_c4_documents() -> list[str]:
    """The C4 validation documents (the 1,500-document subset in the assets)."""
    return list(_c4_documents_cached())


def c4_documents(doc_range: tuple[int, int]) -> list[str]:
    """C4 documents ``[start:stop]``; raises if the subset is smaller than the range."""
    docs = _c4_documents_cached()
    start, stop = doc_range
    if len(docs) < stop:
        raise StructPruneError(
            f"C4 subset has {len(docs)} documents but range {start}:{stop} is needed; "
            "use the 1,500-document subset from shared/assets"
        )
    return list(docs[start:stop])


def _is_file_spec(name: str) -> bool:
    lowered = name.lower()
    return (
        os.sep in name
        or lowered.endswith((".txt", ".json", ".jsonl", ".json.gz", ".jsonl.gz"))
        or Path(name).expanduser().is_file()
    )


def is_corpus_name(name: str) -> bool:
    """Whether ``name`` names a text corpus (one of :data:`CORPORA` or a text file) rather than, say,
    a zero-shot task."""
    return name.lower() in CORPORA or _is_file_spec(name)


def _load_file(name: str) -> str:
    path = Path(name).expanduser()
    if not path.is_file():
        raise StructPruneError(f"text file not found: {name}; pass an existing .txt/.json/.jsonl(.gz) file")
    lowered = path.name.lower()
    if lowered.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
        # Documents joined with a space, as for C4.
        return " ".join(_read_json_docs(path))
    opener = gzip.open if lowered.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            text = fh.read()
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
        raise StructPruneError(f"{name} is not UTF-8 text ({type(exc).__name__}: is it a binary file?); "
                               "pass a plain text or JSON file") from None
    if "\x00" in text:  # NUL bytes decode as UTF-8 but never occur in text: a binary file
        raise StructPruneError(f"{name} is not UTF-8 text (it holds NUL bytes: is it a binary file?); "
                               "pass a plain text or JSON file")
    if not text.strip():
        raise StructPruneError(f"{name} is empty; pass a file with text in it")
    return text


def load_text(name: str, split: str = "eval") -> str:
    """Return the raw text of a corpus.

    ``name`` is ``wikitext2`` (test split joined with ``"\\n\\n"``; ``split="heldout"``: the
    validation split, held-out text for tuning), ``ptb`` (validation
    lines stripped and joined with a space), ``c4`` (documents joined with a space:
    ``split="eval"`` gives the evaluation documents, ``"calib"`` the calibration ones,
    ``"heldout"`` the held-out calibration ones, ``"all"`` all of them) or a path to a
    local .txt / .json / .jsonl(.gz) file (``split`` is ignored for files).
    """
    if name.lower() in CORPORA:
        return _load_builtin(name.lower(), split)
    if _is_file_spec(name):
        # Files are not cached: the user may edit them between calls.
        return _load_file(name)
    raise StructPruneError(
        f"unknown corpus '{name}'; use one of {', '.join(CORPORA)} or a path to a .txt/.json/.jsonl file"
    )


def corpus_missing(name: str) -> str | None:
    """Why the built-in corpus ``name`` cannot be read here (one line), or None when it can.

    It reads the corpus (cached), so a hub download happens now rather than hours into a run.
    Only PTB can be missing on a machine with the package (it does not ship: LDC terms).
    """
    if name.lower() not in CORPORA:
        return None  # a file: reading it is what reports a bad one
    try:
        load_text(name)
    except StructPruneError as exc:
        return str(exc)
    return None


@functools.lru_cache(maxsize=8)
def _load_builtin(key: str, split: str) -> str:
    if key == "wikitext2":  # held-out text: the validation split (evaluation reads test)
        heldout = split == "heldout"
        path = None if heldout else asset_path(*_WIKITEXT_FILE)
        if path is not None:
            return path.read_text(encoding="utf-8")
        bundled = "wikitext2-valid" if heldout else "wikitext2"
        if (BUNDLED_DIR / BUNDLED[bundled][0]).is_file():
            return bundled_bytes(bundled).decode("utf-8")
        ds = _load_dataset("wikitext", "wikitext-2-raw-v1", split="validation" if heldout else "test")
        return "\n\n".join(ds["text"])
    if key == "ptb":
        path = asset_path(*_PTB_FILE)
        if path is not None:
            lines = path.read_text(encoding="utf-8").splitlines()
        else:
            ds = _load_dataset("ptb_text_only", "penn_treebank", split="validation")
            lines = ds["sentence"]
        return " ".join(line.strip() for line in lines)
    if key == "c4":
        ranges = {"eval": C4_EVAL_DOCS, "calib": C4_CALIB_DOCS, "heldout": C4_HELDOUT_DOCS, "all": (0, 1500)}
        if split not in ranges:
            raise StructPruneError(f"unknown C4 split '{split}'; use one of {sorted(ranges)}")
        return " ".join(c4_documents(ranges[split]))
    raise AssertionError(key)
