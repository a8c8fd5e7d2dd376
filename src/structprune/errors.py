"""User-facing errors. The CLI prints these as one line and exits non-zero (docs/errors.md lists them)."""

import errno
import os
import re


class StructPruneError(Exception):
    """Bad input or an impossible request: the message says what and how to fix it."""


class UnsupportedArchitectureError(StructPruneError):
    """The model family has no adapter."""


class CalibrationError(StructPruneError):
    """Calibration data is missing, too short, or produced non-finite statistics."""


class RankFailure(StructPruneError):
    """A distributed run's collective could not complete: another rank died, hung or cannot be
    reached. Unlike the other errors it is no bad input: the partial output is kept for a restart."""


_IO_HINTS = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere",
             errno.EFBIG: "the file system or a limit refuses files this large; write elsewhere",
             errno.EACCES: "choose a writable location", errno.EPERM: "choose a writable location",
             errno.EROFS: "choose a writable location (this file system is read-only)"}


def io_error_message(exc: BaseException) -> str:
    """One line for an operating-system failure (full disk, permissions, read-only file system...),
    given as an ``OSError`` or as the ``SafetensorError`` a weights writer raises around one."""
    code, what = getattr(exc, "errno", None), getattr(exc, "strerror", None)
    if code is None:  # safetensors (Rust) wraps the OS error in its message: "... (os error 28)"
        m = re.search(r"(?:code: |os error )(\d+)", str(exc))
        code = int(m.group(1)) if m else None
    what = what or (os.strerror(code) if code else " ".join(str(exc).split())[:200])
    where = getattr(exc, "filename", None)
    text = f"{what}" + (f": {where}" if where else "")
    hint = _IO_HINTS.get(code)
    return text + (f" ({hint})" if hint else "")
