"""Augmented views of the training images, stored beside their feature cache.

`<cache>.h5.views/<policy>-k<K>.h5` holds K views of every training image of the cache (never of
validation or test images: those stay the clean photos a model is judged on), made by the cache's own
backbone, weights, preprocessing and runtime. Heads can train on the clean features plus the views.
The file is extracted like the cache itself: batch by batch into a journal, resumable after a kill, under
the same kind of lock, and refused once the cache it was made from has been rebuilt.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from .augment import AUGMENTATIONS, View
from .errors import UserError
from .extract import journal_features
from .predict import pipeline_forward
from .store import CacheError, FeatureCache, Journal, cache_lock, read_attrs, set_attrs, write_h5

log = logging.getLogger(__name__)
FORMAT = "featpipe-views"


def views_dir(cache_path: Path) -> Path:
    return Path(str(cache_path) + ".views")


def views_path(cache_path: Path, policy: str, k: int) -> Path:
    return views_dir(cache_path) / f"{policy}-k{k}.h5"


def _made_from(cache: FeatureCache) -> dict:
    """What ties a views file to one build of its cache: the build's id, which changes whenever its rows or
    features do (not when files only got new timestamps); caches from before builds had an id are told
    apart by their time and dataset fingerprint."""
    build = cache.attrs.get("build")
    if build:
        return {"cache": cache.path.name, "cache_build": build}
    return {"cache": cache.path.name, "cache_created": cache.attrs["created"],
            "dataset_fingerprint": cache.attrs["dataset_fingerprint"]}


@dataclass
class ViewSet:
    """The views of one views file: features (M, D), the image id and view number of each row."""

    path: Path
    attrs: dict
    features: np.ndarray
    ids: np.ndarray
    view: np.ndarray

    def labels(self, cache: FeatureCache) -> np.ndarray:
        return cache.labels[np.searchsorted(cache.ids, self.ids)]

    @property
    def name(self) -> str:
        return f"{self.attrs['policy']} x{self.attrs['views']}"


@dataclass
class ViewsSummary:
    path: Path
    rows: int
    done_now: int
    seconds: float
    already_complete: bool = False

    def __str__(self) -> str:
        if self.already_complete:
            return f"{self.path}: already complete ({self.rows} views); nothing to do"
        rate = self.done_now / self.seconds if self.seconds > 0 else 0.0
        return f"{self.path}: {self.done_now} views extracted in {self.seconds:.1f} s ({rate:.1f} views/s); {self.rows} in file"


def extract_views(cache: FeatureCache, k: int, policy: str = "seller", batch_size: int = 64,
                  workers: int | None = None, device: str = "auto", progress: bool = True) -> ViewsSummary:
    """K views of every training image of `cache` under augmentation `policy`, written beside it.

    A view is a pure function of (policy, the cache's split seed, view number, image id), so a resumed
    run computes the same pixels as an uninterrupted one."""
    if policy not in AUGMENTATIONS:
        raise UserError(f"--augment {policy}: choose one of {', '.join(AUGMENTATIONS)}")
    if k < 1:
        raise UserError(f"--views {k}: give at least 1")
    t0 = time.perf_counter()
    path = views_path(cache.path, policy, k)
    path.parent.mkdir(exist_ok=True)
    seed = int(cache.attrs.get("split_seed", 0))
    config = _made_from(cache) | {"policy": policy, "views": k, "seed": seed}
    with cache_lock(path):
        if path.exists():
            attrs = read_attrs(path)
            if all(attrs.get(key) == value for key, value in config.items()):
                return ViewsSummary(path, int(attrs["n_rows"]), 0, time.perf_counter() - t0, already_complete=True)
            log.warning("%s was made from an earlier build of %s; extracting it again", path.name, cache.path.name)
            path.unlink()
        journal = Journal(Path(str(path) + ".parts"))
        if journal.exists and journal.config() != config:
            journal.remove()  # left by an interrupted run for an earlier build of the cache: useless now
        journal.start(config)
        train_ids = cache.ids[cache.split == 0]
        rows = np.arange(k * len(train_ids))  # row r: view r // n of training image r % n
        done = journal.done_ids()
        pending = rows[~np.isin(rows, list(done))] if done else rows
        image_dir = Path(cache.attrs["dataset_root"]) / "images"
        if len(pending):
            forward, pre, dev = pipeline_forward(cache.provenance(), batch_size=batch_size, device=device)
            image_ids = train_ids[pending % len(train_ids)]
            paths = [image_dir / f"{i}.jpg" for i in image_ids]
            augments = [View(policy, seed, int(v), int(i)) for v, i in zip(pending // len(train_ids), image_ids)]
            bar = tqdm(total=len(rows), initial=len(rows) - len(pending), unit="view", desc=f"views {policy}",
                       disable=not progress, smoothing=0.05)
            journal_features(journal, pending, image_ids, paths, forward, pre, dev, batch_size, workers,
                             cache.attrs["dtype"], bar, augments)
        seconds = time.perf_counter() - t0
        got = journal.read_complete(rows)
        ok = got["ok"]
        for r, err in zip(rows[~ok], got["errors"][~ok]):  # the image was readable for the cache itself
            log.warning("view %d of image %d failed: %s", r // len(train_ids), train_ids[r % len(train_ids)], err)
        kept = rows[ok]
        arrays = {"features": got["features"][ok], "ids": train_ids[kept % len(train_ids)],
                  "view": (kept // len(train_ids)).astype(np.int8)}

        def fill(f: h5py.File) -> None:
            f.create_dataset("features", data=arrays["features"], fletcher32=True,
                             chunks=(min(max(len(kept), 1), 1024), arrays["features"].shape[1]))
            for name in ("ids", "view"):
                f.create_dataset(name, data=arrays[name], chunks=(max(len(kept), 1),), fletcher32=True)
            set_attrs(f, config | {"format": FORMAT, "n_rows": len(kept), "n_failed": int((~ok).sum()),
                                   "extract_seconds": round(float(got["seconds"].sum()), 2)})

        write_h5(path, fill)
        journal.remove()
    return ViewsSummary(path, len(kept), len(pending), seconds)


def available_views(cache: FeatureCache) -> list[Path]:
    return sorted(views_dir(cache.path).glob("*-k*.h5"))


def open_views(cache: FeatureCache, policy: str, k: int | None = None) -> ViewSet:
    """The views of `cache` under `policy` (K views; the only set of that policy when k is None)."""
    if "parts" in cache.attrs:
        raise CacheError(f"{cache.backbone}: augmented views are stored per cache; a head on joined caches "
                         "trains on their clean features (leave --augment out)")
    if k is None:
        found = [p for p in available_views(cache) if p.name.startswith(f"{policy}-k")]
        if len(found) != 1:
            have = ", ".join(p.stem for p in available_views(cache)) or "none"
            raise CacheError(f"{cache.path.name}: {len(found)} view sets for --augment {policy} (have: {have}); "
                             + ("give --views K" if found else f"run `featpipe extract ... --views K --augment {policy}`"))
        path = found[0]
    else:
        path = views_path(cache.path, policy, k)
    if not path.is_file():
        raise CacheError(f"{path}: no such views; run `featpipe extract ... --views {k} --augment {policy}` first")
    try:
        with h5py.File(path, "r") as f:
            arrays = {name: f[name][...] for name in ("features", "ids", "view")}
        attrs = read_attrs(path)
    except (OSError, KeyError) as exc:
        raise CacheError(f"{path}: damaged ({str(exc).splitlines()[0]}); delete it and rerun the extraction") from None
    if attrs.get("format") != FORMAT:
        raise CacheError(f"{path}: not a featpipe views file")
    stale = [key for key, value in _made_from(cache).items() if attrs.get(key) != value]
    if stale:
        raise CacheError(f"{path}: made from another build of {cache.path.name} ({', '.join(stale)} differ); "
                         f"rerun `featpipe extract ... --views {attrs.get('views')} --augment {policy}`")
    if not np.isfinite(arrays["features"]).all():
        raise CacheError(f"{path}: holds NaN or Inf features; delete it and rerun the extraction")
    if not np.isin(arrays["ids"], cache.ids[cache.split == 0]).all():
        raise CacheError(f"{path}: holds views of images outside the cache's training split")
    return ViewSet(path, attrs, **arrays)
