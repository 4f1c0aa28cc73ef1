"""File names from requests, looked up under one folder only."""
from __future__ import annotations

from pathlib import Path, PurePosixPath


def resolve_under(folder: Path, name: str) -> Path:
    """The file `name` (relative, '/'-separated) under `folder`. PermissionError for a name that is absolute,
    climbs with '..', or resolves outside `folder` (a symbolic link pointing elsewhere); FileNotFoundError when
    there is no such file."""
    parts = PurePosixPath(name).parts
    if not name or name.startswith(("/", "\\")) or "\\" in name or ".." in parts or ":" in name:
        raise PermissionError(f"{name!r}: give a plain file name inside the folder (no '..', no absolute path)")
    root = folder.resolve()
    real = (root / name).resolve()
    if not real.is_relative_to(root):
        raise PermissionError(f"{name!r} leads outside the folder it is served from")
    if not real.is_file():
        raise FileNotFoundError(f"{name!r}: no such file")
    return real
