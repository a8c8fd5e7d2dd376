"""Corpora (WikiText-2, PTB, C4, local files) and calibration windows."""

from .calibration import encode_text, get_calibration, get_heldout_calibration, tokenize
from .corpora import (
    C4_CALIB_DOCS,
    C4_EVAL_DOCS,
    C4_EVAL_MAX_WINDOWS,
    C4_HELDOUT_DOCS,
    find_assets_dir,
    load_c4_documents,
    load_text,
)

__all__ = [
    "C4_CALIB_DOCS",
    "C4_EVAL_DOCS",
    "C4_EVAL_MAX_WINDOWS",
    "C4_HELDOUT_DOCS",
    "encode_text",
    "find_assets_dir",
    "get_calibration",
    "get_heldout_calibration",
    "load_c4_documents",
    "load_text",
    "tokenize",
]
