"""Small file-system helpers shared by the writers (model cache, exports)."""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the permissions the user's umask gives new files.

    Folders made by ``tempfile.mkdtemp`` (where outputs are written before they are moved into
    place) are private (0700), and would stay so after the move: other users of a shared
    machine could not read the model."""
    umask = current_umask()
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for f in filenames:
            p = Path(dirpath) / f
            if not p.is_symlink():
                os.chmod(p, 0o666 & ~umask)
