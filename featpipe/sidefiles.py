"""Files of per-image rows stored beside a feature cache: augmented views (views.py) and a block's
activations for partial fine-tuning (finetune.py).

Each is extracted like the cache itself: batch by batch into a journal, resumable after a kill, under the
same kind of lock, written atomically with checksums, and refused once the cache it was made from has been
rebuilt. A file holds `features` (rows, D), the image `ids` of its rows and any other per-row arrays.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from .augment import Augment
from .extract import journal_features
from .images import Preprocessing
from .runtimes import Forward
from .store import CacheError, FeatureCache, Journal, cache_lock, read_attrs, set_attrs, write_h5

log = logging.getLogger(__name__)


def made_from(cache: FeatureCache) -> dict:
    """What ties a side file to one build of its cache: the build's id, which changes whenever its rows or
    features do (not when files only got new timestamps); caches from before builds had an id are told
    apart by their time and dataset fingerprint."""
    build = cache.attrs.get("build")
    if build:
        return {"cache": cache.path.name, "cache_build": build}
    return {"cache": cache.path.name, "cache_created": cache.attrs["created"],
            "dataset_fingerprint": cache.attrs["dataset_fingerprint"]}


@dataclass
class SideSummary:
    path: Path
    rows: int
    done_now: int
    seconds: float
    unit: str = "rows"
    already_complete: bool = False

    def __str__(self) -> str:
        if self.already_complete:
            return f"{self.path}: already complete ({self.rows} {self.unit}); nothing to do"
        rate = self.done_now / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.path}: {self.done_now} {self.unit} extracted in {self.seconds:.1f} s "
                f"({rate:.1f} {self.unit}/s); {self.rows} in file")


def extract_rows(cache: FeatureCache, path: Path, config: dict, fmt: str, image_ids: np.ndarray,
                 per_row: dict[str, np.ndarray], pipeline: Callable[[], tuple[Forward, Preprocessing, torch.device]],
                 augments: Callable[[np.ndarray], Sequence[Augment | None]] | None = None, batch_size: int = 64,
                 workers: int | None = None, dtype: str = "float16", unit: str = "rows",
                 progress: bool = True) -> SideSummary:
    """Row r of `path` holds the features of image `image_ids[r]` (augmented by `augments(rows)[i]` when
    given) under `pipeline()`, built only if some row is still missing. `config` (with `made_from(cache)`)
    names what the file holds: a file with another config is extracted again, a journal of another
    config dropped. Rows whose image fails are left out with a warning; `per_row` arrays go with the rows."""
    t0 = time.perf_counter()
    path.parent.mkdir(exist_ok=True)
    with cache_lock(path):
        if path.exists():
            attrs = read_attrs(path)
            if all(attrs.get(key) == value for key, value in config.items()):
                return SideSummary(path, int(attrs["n_rows"]), 0, time.perf_counter() - t0, unit, already_complete=True)
            log.warning("%s was made from an earlier build of %s or other settings; extracting it again",
                        path.name, cache.path.name)
            path.unlink()
        journal = Journal(Path(str(path) + ".parts"))
        if journal.exists and journal.config() != config:
            journal.remove()  # left by an interrupted run for an earlier build of the cache: useless now
        journal.start(config)
        rows = np.arange(len(image_ids))
        done = journal.done_ids()
        pending = rows[~np.isin(rows, list(done))] if done else rows
        image_dir = Path(cache.attrs["dataset_root"]) / "images"
        if len(pending):
            forward, pre, dev = pipeline()
            bar = tqdm(total=len(rows), initial=len(rows) - len(pending), unit=unit, desc=path.stem,
                       disable=not progress, smoothing=0.05)
            journal_features(journal, pending, image_ids[pending], [image_dir / f"{i}.jpg" for i in image_ids[pending]],
                             forward, pre, dev, batch_size, workers, dtype, bar,
                             augments(pending) if augments is not None else None)
        seconds = time.perf_counter() - t0
        got = journal.read_complete(rows)
        ok = got["ok"]
        for r, err in zip(rows[~ok], got["errors"][~ok]):  # the image was readable for the cache itself
            log.warning("%s: row %d (image %d) failed: %s", path.name, r, image_ids[r], err)
        arrays = {"ids": image_ids[ok]} | {name: a[ok] for name, a in per_row.items()}
        features = got["features"][ok]
        n = int(ok.sum())

        def fill(f: h5py.File) -> None:
            f.create_dataset("features", data=features, fletcher32=True,
                             chunks=(min(max(n, 1), 1024, max(1, 2 ** 21 // features.shape[1])), features.shape[1]))
            for name, a in arrays.items():
                f.create_dataset(name, data=a, chunks=(max(n, 1),), fletcher32=True)
            set_attrs(f, config | {"format": fmt, "n_rows": n, "n_failed": int((~ok).sum()),
                                   "extract_seconds": round(float(got["seconds"].sum()), 2)})

        write_h5(path, fill)
        journal.remove()
    return SideSummary(path, n, len(pending), seconds, unit)


def open_rows(cache: FeatureCache, path: Path, fmt: str, names: Sequence[str], rerun: str,
              what: str) -> tuple[dict, dict]:
    """(arrays, attrs) of a side file of `cache` holding `what`, refused with a one-line error (saying to run
    `rerun`) when missing, damaged, foreign, made from another build of the cache, or holding NaN/Inf."""
    if not path.is_file():
        raise CacheError(f"{path}: no such {what}; run `{rerun}` first")
    try:
        with h5py.File(path, "r") as f:
            arrays = {name: f[name][...] for name in ("features", "ids", *names)}
        attrs = read_attrs(path)
    except (OSError, KeyError) as exc:
        raise CacheError(f"{path}: damaged ({str(exc).splitlines()[0]}); delete it and run `{rerun}`") from None
    if attrs.get("format") != fmt:
        raise CacheError(f"{path}: not a {fmt} file")
    stale = [key for key, value in made_from(cache).items() if attrs.get(key) != value]
    if stale:
        raise CacheError(f"{path}: made from another build of {cache.path.name} ({', '.join(stale)} differ); run `{rerun}`")
    if not np.isfinite(arrays["features"]).all():
        raise CacheError(f"{path}: holds NaN or Inf features; delete it and run `{rerun}`")
    return arrays, attrs
