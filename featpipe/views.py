"""Augmented views of the training images, stored beside their feature cache.

`<cache>.h5.views/<policy>-k<K>.h5` holds K views of every training image of the cache (never of
validation or test images: those stay the clean photos a model is judged on), made by the cache's own
backbone, weights, preprocessing and runtime. Heads can train on the clean features plus the views.
Extracted and checked as every side file of a cache is (sidefiles.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .augment import AUGMENTATIONS, View
from .errors import UserError
from .features.pipeline import pipeline_forward
from .sidefiles import SideSummary, extract_rows, made_from, open_rows
from .store import CacheError, FeatureCache

FORMAT = "featpipe-views"


def views_dir(cache_path: Path) -> Path:
    return Path(str(cache_path) + ".views")


def views_path(cache_path: Path, policy: str, k: int) -> Path:
    return views_dir(cache_path) / f"{policy}-k{k}.h5"


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


def extract_views(cache: FeatureCache, k: int, policy: str = "seller", batch_size: int = 64,
                  workers: int | None = None, device: str = "auto", progress: bool = True) -> SideSummary:
    """K views of every training image of `cache` under augmentation `policy`, written beside it.

    A view is a pure function of (policy, the cache's split seed, view number, image id), so a resumed
    run computes the same pixels as an uninterrupted one."""
    if policy not in AUGMENTATIONS:
        raise UserError(f"--augment {policy}: choose one of {', '.join(AUGMENTATIONS)}")
    if k < 1:
        raise UserError(f"--views {k}: give at least 1")
    seed = int(cache.attrs.get("split_seed", 0))
    train_ids = cache.ids[cache.split == 0]
    rows = np.arange(k * len(train_ids))  # row r: view r // n of training image r % n
    image_ids, view = train_ids[rows % len(train_ids)], (rows // len(train_ids)).astype(np.int8)
    return extract_rows(
        cache, views_path(cache.path, policy, k), made_from(cache) | {"policy": policy, "views": k, "seed": seed},
        FORMAT, image_ids, {"view": view},
        lambda: pipeline_forward(cache.provenance(), batch_size=batch_size, device=device),
        lambda r: [View(policy, seed, int(view[i]), int(image_ids[i])) for i in r],
        batch_size, workers, cache.attrs["dtype"], "views", progress)


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
    rerun = f"featpipe extract ... --views {path.stem.rpartition('-k')[2]} --augment {policy}"
    arrays, attrs = open_rows(cache, path, FORMAT, ("view",), rerun, "views")
    if not np.isin(arrays["ids"], cache.ids[cache.split == 0]).all():
        raise CacheError(f"{path}: holds views of images outside the cache's training split")
    return ViewSet(path, attrs, **arrays)
