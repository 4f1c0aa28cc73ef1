"""Images -> frozen backbone -> feature cache, resumable and refusing to mix settings."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .augment import Augment, View
from .backbones import get_spec, load_backbone, weights_identity
from .dataset import Dataset, hashed_split, load_dataset, scan
from .devices import resolve_device
from .embed import iter_features
from .errors import UserError
from .images import Preprocessing, decode_threads, threaded_batches
from .runtimes import INT8_RECIPE, Forward, default_runtime, ir_identity, make_forward
from .files import sha256_file
from .store import (RETIRED, CacheError, Journal, Shards, Table, cache_lock, cache_name, check_cache_dir,
                    read_attrs, read_table, shard_dir, storable, write_cache)

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")


def journal_features(journal: Journal, keys: np.ndarray, image_ids: np.ndarray, paths: Sequence[Path],
                     forward: Forward, pre: Preprocessing, device: torch.device, batch_size: int,
                     workers: int | None, dtype: str, bar: tqdm,
                     augments: Sequence[Augment | None] | None = None) -> None:
    """Features of `paths` (of images `image_ids`), each finished batch written to `journal` under its
    rows' `keys` with the time it took: a kill loses at most the batch in flight."""
    t_batch = time.perf_counter()
    for pos, feats, ok, errors in iter_features(forward, paths, pre, device.type, batch_size, workers, augments,
                                                same_shape=True):
        now = time.perf_counter()
        journal.write(keys[pos], storable(feats, ok, dtype, image_ids[pos]), ok, errors, now - t_batch)
        t_batch = now
        bar.update(len(feats))
    bar.close()


def int8_dir(cache_path: Path) -> Path:
    """Where a cache's calibrated INT8 model lives: beside it, named after it."""
    return Path(str(cache_path) + ".int8")


def calibrate_int8(model: nn.Module, ds: Dataset, pre: Preprocessing, out_dir: Path, n_images: int, seed: int,
                   batch_size: int) -> str:
    """Quantize the backbone on a seeded sample of training images, every other batch of them as seller-style
    views (`augment`), so that the INT8 ranges also cover photos unlike the catalogue's (`INT8_RECIPE`);
    returns the stored model's identity."""
    from .runtimes import quantize_int8, to_openvino

    train = np.flatnonzero(ds.split == 0)
    pick = np.sort(np.random.default_rng(seed).choice(train, size=min(n_images, len(train)), replace=False))
    views = [View("seller", seed, 0, int(i)) if (k // batch_size) % 2 else None for k, i in enumerate(ds.ids[pick])]
    batches = [images[ok] for images, ok, _ in
               threaded_batches([ds.image_path(i) for i in ds.ids[pick]], pre, batch_size, decode_threads(), views)]
    log.info("calibrating INT8 on %d training images (%d of them as seller-style views)", len(pick),
             sum(v is not None for v in views))
    return quantize_int8(to_openvino(model, pre), [b for b in batches if len(b)], out_dir)


@dataclass
class ExtractSummary:
    cache: Path
    total: int
    done_now: int
    resumed_from: int
    seconds: float
    skipped: dict[str, int] = field(default_factory=dict)
    already_complete: bool = False
    update: dict[str, int] | None = None  # counts of an update of an earlier build

    @property
    def images_per_s(self) -> float:
        return self.done_now / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        if self.already_complete:
            return f"{self.cache}: already complete ({self.total} images); nothing to do"
        skipped = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items())) or "none"
        resumed = f" (resumed after {self.resumed_from})" if self.resumed_from else ""
        update = ""
        if self.update:
            update = "; update: {new} new, {changed} changed, {removed} removed, {reused} reused".format(**self.update)
            update += f", {self.update['retried']} unreadable retried" if self.update.get("retried") else ""
            update += (f" ({self.update['restamped']} of them with new timestamps, same bytes)"
                       if self.update.get("restamped") else "")
            update += (f" ({self.update['relabelled']} of the changed with a new label only, same bytes)"
                       if self.update.get("relabelled") else "")
        return (f"{self.cache}: {self.done_now} images extracted{resumed}{update} in {self.seconds:.1f} s "
                f"({self.images_per_s:.1f} images/s); {self.total} in cache; skipped: {skipped}")


def _subset(ds: Dataset, limit: int | None, seed: int) -> Dataset:
    """A seeded random subset of `limit` rows (quick runs, e.g. VGG16 on a few hundred images)."""
    if not limit or limit >= len(ds):
        return ds
    keep = np.sort(np.random.default_rng(seed).choice(len(ds), size=limit, replace=False))
    return Dataset(ds.root, ds.target, ds.ids[keep], ds.labels[keep], ds.classes, ds.split[keep],
                   {k: [v[i] for i in keep] for k, v in ds.meta.items()}, ds.skipped)


def extract(
    data: str | os.PathLike,
    backbone: str = "mobilenet_v2",
    weights: str = "imagenet",
    cache_dir: str | os.PathLike = "cache",
    target: str = "articleType",
    min_per_class: int = 50,
    image_size: int | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    dtype: str = "float16",
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    runtime: str | None = None,
    calibration_images: int = 300,
    fingerprint_mode: str = "stat",
    engine: str = "local",
    address: str | None = None,
    actors: int | None = None,
    shard_size: int = 512,
) -> ExtractSummary:
    """Run `backbone` over every image of the dataset once and write the feature cache.

    Rerunning the same call resumes an interrupted run, or does nothing when the cache is complete.
    When the dataset changed since the cache was built, only new and changed images are extracted:
    the rest keep their features and split (overwrite=True rebuilds it from scratch).
    image_size: the square the images are resized to [default: the backbone's training resolution].
    runtime: torch | openvino | openvino-bf16 | openvino-int8 (default: `runtimes.default_runtime`);
    openvino-int8 first calibrates on `calibration_images` training images.
    fingerprint_mode: stat (names, sizes, mtimes) or content (also every image's bytes) decides when the
    data has changed under a cache.
    engine: local (this process) or ray (a Ray Data actor pool on the cluster at `address`, or on a local
    one; `actors` of them, each embedding `shard_size` images at a time). The features are the same, so
    the engine is not part of the cache's identity: a run of one can be resumed by the other.
    """
    if engine not in ENGINES:
        raise UserError(f"--engine {engine}: use {' or '.join(ENGINES)}")
    if dtype not in ("float16", "float32"):
        raise UserError(f"--dtype {dtype}: use float16 or float32")
    t0 = time.perf_counter()
    ds = _subset(load_dataset(data, target, min_per_class, fractions, seed), limit, seed)
    spec = get_spec(backbone)
    image_size = image_size or spec.image_size
    pre = Preprocessing(image_size=image_size, mean=spec.mean, std=spec.std)
    dev = resolve_device(device)
    runtime = runtime or default_runtime(dev)
    key = {
        "backbone": backbone, "weights_id": weights_identity(backbone, weights), "target": target,
        "min_per_class": min_per_class, "split_fractions": list(fractions), "split_seed": seed,
        "preprocessing": pre.to_dict(), "dtype": dtype, "dataset": Path(data).resolve().name, "limit": limit,
        "runtime": runtime,
    }
    if fingerprint_mode != "stat":
        # the default stays out of the name: an older cache is found and checked, not left beside a new one
        key["fingerprint_mode"] = fingerprint_mode
    if runtime == "openvino-int8":
        key["calibration"] = {"images": calibration_images, "seed": seed, "recipe": INT8_RECIPE}
    cache_dir = check_cache_dir(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / cache_name(key)
    with cache_lock(path):
        fp, stamps = scan(ds, fingerprint_mode)
        if overwrite:
            Journal(shard_dir(path)).remove()
            path.unlink(missing_ok=True)
            shutil.rmtree(int8_dir(path), ignore_errors=True)
        base = None
        if path.exists():
            attrs = read_attrs(path)
            if attrs.get("dataset_fingerprint") == fp:
                return ExtractSummary(path, int(attrs["n_images"]), 0, 0, time.perf_counter() - t0, already_complete=True)
            base = read_table(path)
            if base is None:
                raise CacheError(f"{path}: built from a different version of {data} (styles.csv or images changed) by "
                                 "a featpipe that could not update it in place; rerun with --overwrite to rebuild "
                                 "it, or use another --cache-dir")
        plan = plan_update(ds, stamps, base, fractions, seed, fingerprint_mode)
        journal = Journal(shard_dir(path), committed=base.shards.names if base else ())
        config = json.loads(json.dumps(key | {"dataset_fingerprint": fp,  # as it reads back from disk
                                              "base": base.attrs["dataset_fingerprint"] if base else None}))
        if journal.exists and journal.config() != config:
            # the cache's settings are in its name, so only the data can differ: that work is of no use now
            log.warning("%s: discarding an unfinished extraction of an earlier version of %s", journal.dir, data)
            journal.finish(keep=journal.committed)
        elif not journal.exists:
            journal.finish(keep=journal.committed)  # shards no cache refers to (its file was deleted): stale
        if base:
            verify_shards(path, base)
        journal.start(config)

        todo = ds.ids[plan.pending]
        done = journal.done_ids()
        pending = plan.pending[~np.isin(todo, list(done))] if done else plan.pending
        if done:
            log.info("resuming %s: %d of %d images already done", path.name, len(todo) - len(pending), len(todo))
        t_run = time.perf_counter()
        runtime_id = None
        if len(pending):
            if runtime == "openvino-int8":
                runtime_id = (ir_identity(int8_dir(path)) if (done or base) and int8_dir(path).is_dir() else
                              calibrate_int8(load_backbone(backbone, weights)[0], ds, pre, int8_dir(path),
                                             calibration_images, seed, batch_size))
            bar = tqdm(total=len(todo), initial=len(todo) - len(pending), unit="img", desc=f"extract {backbone}",
                       disable=not progress, smoothing=0.05)
            paths = [ds.image_path(i) for i in ds.ids[pending]]
            if engine == "ray":
                from .ray_engine import ActorSpec, portable_network, ray_features

                spec = ActorSpec(backbone, weights, runtime, pre.to_dict(), batch_size, dtype, str(dev))
                ray_features(journal, ds.ids[pending], paths, spec, address, actors, shard_size, bar,
                             lambda: portable_network(backbone, weights, runtime, pre, int8_dir(path), runtime_id))
            else:
                forward = make_forward(load_backbone(backbone, weights)[0], runtime, dev, pre, batch_size,
                                       int8_dir(path), runtime_id)
                journal_features(journal, ds.ids[pending], ds.ids[pending], paths, forward, pre, dev, batch_size,
                                 workers, dtype, bar)
        seconds = time.perf_counter() - t_run

        rows = journal.read_complete(todo)
        ok = rows["ok"]
        skipped = {r: list(v) for r, v in ds.skipped.items()}
        for i, err in zip(rows["ids"][~ok], rows["errors"][~ok]):
            log.warning("skipped unreadable image %s: %s", ds.image_path(i), err)
            skipped.setdefault("unreadable_image", []).append(str(i))
        shards, keep = locate_rows(ds, plan, rows, base, shard_dir(path))
        busy = float(rows["seconds"].sum())  # forward-pass time behind the features the cache now holds
        if base:  # plus the earlier build's share for the rows reused from it (replaced and removed rows took theirs)
            busy += float(base.attrs.get("extract_seconds", 0)) * plan.counts["reused"] / max(len(base.ids), 1)
        attrs = key | {
            "weights": weights if weights in ("imagenet", "none") else str(Path(weights).resolve()),
            "feature_dim": int(rows["features"].shape[1]) if len(rows["ids"]) else int(base.attrs["feature_dim"]),
            "dataset_root": str(Path(data).resolve()), "dataset_fingerprint": fp,
            "n_images": int(keep.sum()), "n_unreadable": len(skipped.get("unreadable_image", [])),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "build": _build_id(base, plan), "device": str(dev),
            "engine": engine,
            "extract_seconds": round(busy, 2),
            **({"runtime_model": str(int8_dir(path).resolve()), "runtime_id": runtime_id or ir_identity(int8_dir(path))}
               if runtime == "openvino-int8" else {}),
            "images_per_s": round(len(todo) / max(float(rows["seconds"].sum()), 1e-9), 2) if len(todo) else
            base.attrs.get("images_per_s"),
            "versions": {"featpipe": __version__, "torch": torch.__version__, "numpy": np.__version__,
                         **_versions("torchvision", "h5py", "PIL")},
            "updates": (base.attrs.get("updates", []) if base else []) + ([plan.counts] if base else []),
        }
        write_cache(
            path,
            {"ids": ds.ids[keep], "labels": ds.labels[keep], "split": plan.split[keep], "stamps": stamps[keep],
             "digests": plan.digests[keep]} | retired_rows(base, ds.ids[keep]),
            {k: vals if keep.all() else [v for v, m in zip(vals, keep) if m] for k, vals in ds.meta.items()},
            ds.classes, skipped, attrs, shards,
        )
        journal.finish(keep=shards.names)
        return ExtractSummary(path, int(keep.sum()), len(pending), len(todo) - len(pending), seconds,
                              {r: len(v) for r, v in skipped.items()}, update=plan.counts if base else None)


@dataclass
class UpdatePlan:
    """What an extraction must do: the split of every image of the dataset, the positions whose features
    must be extracted, and (for an update of an earlier build) how many images are new, changed, removed
    and reused."""

    split: np.ndarray
    pending: np.ndarray
    counts: dict[str, int]
    base_row: np.ndarray  # per image of the dataset: its row in the earlier build, or -1
    digests: np.ndarray  # per image of the dataset: the sha256 of its bytes


def plan_update(ds: Dataset, stamps: np.ndarray, base: Table | None, fractions: tuple[float, float, float],
                seed: int, mode: str = "stat") -> UpdatePlan:
    """From scratch: every image, with the dataset's stratified split. Over an earlier build: images it
    holds keep their split, and their features unless their content changed; new images (and ones it could
    not read before) get a split from a stable hash of their id. In stat mode a file with a new size or
    timestamp is hashed and compared with the digest the build recorded, so a copied or re-laid folder
    (new timestamps, same bytes) reuses every feature."""
    def digests_of(rows: np.ndarray) -> np.ndarray:
        if mode == "content":  # the stamps are the digests
            return stamps[rows]
        return np.array([sha256_file(ds.image_path(i)) for i in ds.ids[rows]], dtype=str)

    if base is None:
        every = np.arange(len(ds))
        return UpdatePlan(ds.split, every, {}, np.full(len(ds), -1), digests_of(every))
    pos = np.searchsorted(base.ids, ds.ids)
    pos = np.minimum(pos, max(len(base.ids) - 1, 0))
    known = (base.ids[pos] == ds.ids) if len(base.ids) else np.zeros(len(ds), bool)
    digests = np.full(len(ds), "", dtype=object)
    restamped = known & (base.stamps[pos] != stamps)
    changed = restamped.copy()
    if base.digests is not None:
        digests[known] = base.digests[pos[known]]
        now = digests_of(np.flatnonzero(restamped))
        changed[restamped] = now != digests[restamped]
        digests[restamped] = now
    else:  # a build from before digests were kept: a new stamp is all there is to go by
        digests[known] = digests_of(np.flatnonzero(known))
    split = base.split[pos].astype(np.int8) if len(base.ids) else np.zeros(len(ds), np.int8)
    digests[~known] = digests_of(np.flatnonzero(~known))
    split[~known] = remembered_split(ds.ids[~known], digests[~known].astype(str), base, fractions, seed)
    relabelled = known & ~changed
    if base.labels is not None:
        relabelled &= base.labels[pos] != np.asarray(ds.classes)[ds.labels]
    # images the earlier build could not read are tried again (their file may have been fixed): not new
    retried = ~known & np.isin(ds.ids, [int(i) for i in base.skipped.get("unreadable_image", [])])
    counts = {"new": int((~known & ~retried).sum()), "changed": int((changed | relabelled).sum()),
              "removed": int((~np.isin(base.ids, ds.ids)).sum()), "reused": int((known & ~changed).sum()),
              "retried": int(retried.sum()), "restamped": int((restamped & ~changed).sum()),
              "relabelled": int(relabelled.sum()),
              "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return UpdatePlan(split, np.flatnonzero(~known | changed), counts, np.where(known, pos, -1),
                      digests.astype(str))


def remembered_split(ids: np.ndarray, digests: np.ndarray, base: Table, fractions: tuple[float, float, float],
                     seed: int) -> np.ndarray:
    """The split of images new to a cache: the one it had when the cache held it before (by id), or that of an
    image the cache holds or held with the same bytes, else a stable hash of its id (`hashed_split`). So an
    image that leaves the catalogue and comes back, or a copy of it under another id, never changes sides."""
    split = hashed_split(ids, fractions, seed)
    by_digest: dict[str, int] = {}
    by_id: dict[int, int] = {}
    if base.retired is not None:
        by_id = dict(zip(base.retired["id"].tolist(), base.retired["split"].tolist()))
        by_digest = dict(zip(base.retired["digest"].tolist(), base.retired["split"].tolist()))
    if base.digests is not None:
        by_digest |= dict(zip(base.digests.tolist(), base.split.tolist()))
    for k, (i, d) in enumerate(zip(ids.tolist(), digests.tolist())):
        split[k] = by_id.get(i, by_digest.get(d, split[k]))
    return split


def retired_rows(base: Table | None, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Images the earlier build held (or had retired) that the new one (`ids`, its rows) does not: remembered
    with their digest and split (`store.RETIRED`), for `remembered_split`."""
    if base is None:
        return {}
    held = {"id": base.ids, "digest": base.digests if base.digests is not None else np.full(len(base.ids), ""),
            "split": base.split}
    old = base.retired or {k: np.zeros(0, v.dtype) for k, v in held.items()}
    rows = {k: np.concatenate([old[k], held[k]]) for k in RETIRED}
    gone = ~np.isin(rows["id"], ids)
    last = np.unique(rows["id"][gone][::-1], return_index=True)[1]  # the latest entry of an id retired twice
    pick = np.flatnonzero(gone)[::-1][last]
    if not len(pick):
        return {}
    return {f"retired/{k}": rows[k][pick].astype(str if k == "digest" else rows[k].dtype) for k in RETIRED}


def verify_shards(path: Path, base: Table) -> None:
    """The shards an update reuses must be the bytes they were when the cache was written."""
    folder = shard_dir(path)
    for name, digest in zip(base.shards.names, base.shards.sha256):
        if sha256_file(folder / name) != digest:
            raise CacheError(f"{folder / name}: damaged (checksum differs from the cache's); "
                             "rerun `featpipe extract --overwrite` to rebuild the cache")


def locate_rows(ds: Dataset, plan: UpdatePlan, rows: dict[str, np.ndarray], base: Table | None,
                folder: Path) -> tuple[Shards, np.ndarray]:
    """Where each kept image's features are stored (this run's parts first, then the earlier build's shards),
    and which images of `ds` are kept (all but unreadable ones)."""
    new_parts = sorted(set(rows["part"][rows["ok"]]))
    names = (list(base.shards.names) if base else []) + new_parts
    index = {n: k for k, n in enumerate(names)}
    sha = (list(base.shards.sha256) if base else []) + [sha256_file(folder / n) for n in new_parts]
    sizes = (list(base.shards.rows) if base else []) + [int((rows["part"] == n).sum()) for n in new_parts]
    shard = np.full(len(ds), -1, dtype=np.int64)
    row = np.zeros(len(ds), dtype=np.int64)
    old = plan.base_row >= 0
    if old.any():
        shard[old], row[old] = base.shards.shard[plan.base_row[old]], base.shards.row[plan.base_row[old]]
    fresh = plan.pending
    got = rows["ok"]
    shard[fresh] = np.where(got, [index.get(n, -1) for n in rows["part"]], -1)
    row[fresh] = rows["row"]
    keep = shard >= 0
    used = sorted(set(shard[keep].tolist()))
    remap = np.full(len(names), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    shards = Shards([names[k] for k in used], [sha[k] for k in used], [sizes[k] for k in used],
                    remap[shard[keep]], row[keep])
    return shards, keep


def _build_id(base: Table | None, plan: UpdatePlan) -> str:
    """A new id for every build whose rows or features differ from the last one's. An update that only
    saw new timestamps on the same bytes keeps the id, so what was made from the cache (augmented views)
    stays valid."""
    untouched = base is not None and len(plan.pending) == 0 and not plan.counts.get("removed")
    return str(base.attrs["build"]) if untouched and base.attrs.get("build") else uuid.uuid4().hex


def _versions(*modules: str) -> dict[str, str]:
    import importlib

    return {m: getattr(importlib.import_module(m), "__version__", "?") for m in modules}
