"""The HDF5 feature cache: naming, immutable shards with a journal for extraction in progress, and the reader.

While extraction runs, each finished batch is written as its own small HDF5 file, a shard, in
`<cache>.shards/` (written to a temporary name, then atomically renamed), so a kill at any moment loses
at most the batch in flight; `config.json` there marks the run in progress. When every image is done,
the cache file is written under a temporary name and renamed into place: a file at the cache path is
therefore always complete. It is the manifest: provenance, labels, splits, per-image stamps, the list
of shards with their sha256, and the features as an HDF5 virtual dataset over the shards. A later
extraction of a changed dataset adds shards for new and changed images only and writes a new manifest.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import Callable, Iterable, Sequence

import h5py
import numpy as np

from .errors import UserError
from .files import atomic_path

log = logging.getLogger(__name__)

FORMAT = "featpipe-cache"
FORMAT_VERSION = 2  # 2: features may be a virtual dataset over shards; per-image stamps
READABLE_VERSIONS = (1, 2)
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
# images a cache held in an earlier build and no longer does, with their digest and split: an image that comes
# back (same id, or same bytes) gets its old split, so a model's training image never returns as a test image
RETIRED = ("id", "digest", "split")


class CacheError(UserError):
    """A cache that is missing, incomplete, ambiguous or does not match what was asked for."""


def storable(feats: np.ndarray, ok: np.ndarray, dtype: str, ids: np.ndarray) -> np.ndarray:
    """Features cast to the cache's dtype, refused when the cast or the backbone would store a wrong value:
    NaN/Inf (broken weights), values past float16's range, or values float16 rounds to zero (e.g. a
    random-init backbone's ~1e-9 outputs, which would make every image look the same)."""
    good = feats[ok]
    if not np.isfinite(good).all():
        bad = ids[ok][~np.isfinite(good).all(1)]
        raise CacheError(f"the backbone gave NaN or Inf features for image(s) {', '.join(map(str, bad[:5]))}; "
                         "check that --weights is an intact file for this backbone")
    if dtype == "float16" and len(good):
        big = float(np.abs(good).max())
        if big > float(np.finfo(np.float16).max):
            raise CacheError(f"features reach {big:.3g}, past float16's range; rerun with --dtype float32")
        nonzero = good != 0
        lost = float((good[nonzero].astype(dtype) == 0).mean()) if nonzero.any() else 0.0
        if lost > 0.01:
            raise CacheError(f"{lost:.0%} of the non-zero features round to 0 in float16 (largest |value| {big:.2g}; "
                             "random-init weights give such tiny values); rerun with --dtype float32")
    return np.where(ok[:, None], feats, 0).astype(dtype)  # an unreadable image's row is never read back


def file_stem(backbone: str) -> str:
    """A backbone's name as the start of a file name: timm:NAME -> timm-NAME (no colon, which some
    file systems refuse)."""
    return backbone.replace(":", "-")


def cache_name(key: dict) -> str:
    """`<backbone>-<target>-<hash>.h5`: readable, and distinct for every setting that changes features.

    The dataset's content fingerprint is deliberately not part of the name: a changed dataset
    maps to the same file and is updated in place rather than silently starting a second cache.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return f"{file_stem(key['backbone'])}-{key['target']}-{digest}.h5"


def disk_bytes(path: Path) -> int:
    """What a cache takes on disk: its manifest and its shard files."""
    return path.stat().st_size + sum(p.stat().st_size for p in shard_dir(path).glob("*.h5"))


def _json_attr(value) -> str:
    return json.dumps(value, sort_keys=True)


@contextmanager
def cache_lock(cache_path: Path) -> Iterator[None]:
    """Hold `<cache>.lock` while extracting: a second extraction of the same cache waits for the first
    (and then finds the cache complete) instead of both writing it. The operating system drops the lock
    when its holder dies, so a killed run never leaves it stuck."""
    lock_path = Path(str(cache_path) + ".lock")
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            log.warning("%s is being extracted by %s; waiting for it to finish", cache_path.name, holder)
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        try:
            yield
        finally:
            fh.truncate(0)
            fcntl.flock(fh, fcntl.LOCK_UN)


class Journal:
    """Finished batches of an extraction in progress, one atomically written HDF5 part each (features
    checksummed by fletcher32). `committed`: parts of the dir that already belong to a finished cache
    (its shards); they are neither read nor counted as work of the run in progress."""

    def __init__(self, dir: Path, committed: Iterable[str] = ()):
        self.dir = Path(dir)
        self.committed = set(committed)
        self._seq = 0

    @property
    def exists(self) -> bool:
        return (self.dir / "config.json").is_file()

    def config(self) -> dict:
        return json.loads((self.dir / "config.json").read_text())

    def start(self, config: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.dir / "config.json") as tmp:
            tmp.write_text(json.dumps(config, sort_keys=True, indent=1))

    def all_parts(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.h5"))

    def _parts(self) -> list[Path]:
        return [p for p in self.all_parts() if p.name not in self.committed]

    def _load(self, part: Path) -> dict[str, np.ndarray]:
        try:
            with h5py.File(part, "r") as f:
                rows = {k: f[k][...] for k in ("ids", "features", "ok", "errors", "seconds")}
        except (OSError, KeyError) as exc:
            raise CacheError(f"{part}: damaged ({str(exc).splitlines()[0]}); rerun with --overwrite") from None
        rows["errors"] = rows["errors"].astype(str)
        rows["part"] = np.full(len(rows["ids"]), part.name)
        rows["row"] = np.arange(len(rows["ids"]), dtype=np.int32)
        return rows

    def read(self) -> dict[str, np.ndarray]:
        """All finished rows of the run: ids, features, ok flags, error texts, seconds spent per row, and the
        part and row each is stored in, in write order."""
        chunks = [self._load(p) for p in self._parts()]
        if not chunks:
            return {"ids": np.zeros(0, np.int64), "features": np.zeros((0, 0), np.float32), "ok": np.zeros(0, bool),
                    "errors": np.zeros(0, str), "seconds": np.zeros(0), "part": np.zeros(0, str),
                    "row": np.zeros(0, np.int32)}
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def read_complete(self, expected: np.ndarray) -> dict[str, np.ndarray]:
        """Every finished row, sorted by id, which must be exactly `expected` (sorted)."""
        rows = self.read()
        order = np.argsort(rows["ids"], kind="stable")
        if not np.array_equal(rows["ids"][order], expected):
            raise CacheError(f"{self.dir}: the finished batches do not cover what was asked for exactly; "
                             "rerun with --overwrite")
        return {k: v[order] for k, v in rows.items()}

    def done_ids(self) -> set[int]:
        ids: set[int] = set()
        for p in self._parts():
            with h5py.File(p, "r") as f:
                ids.update(f["ids"][...].tolist())
        return ids

    def write(self, ids: np.ndarray, features: np.ndarray, ok: np.ndarray, errors: list[str], seconds: float) -> None:
        if self._seq == 0:
            self._seq = max((int(p.stem.split("-")[1]) for p in self.all_parts()), default=0) + 1
        n = len(ids)

        def fill(f: h5py.File) -> None:
            f.create_dataset("features", data=features, chunks=(max(n, 1), features.shape[1]), fletcher32=True)
            f.create_dataset("ids", data=ids)
            f.create_dataset("ok", data=ok)
            f.create_dataset("errors", data=np.array(errors, dtype=object), dtype=h5py.string_dtype())
            f.create_dataset("seconds", data=np.full(n, seconds / max(n, 1)))

        write_h5(self.dir / f"part-{self._seq:07d}.h5", fill)
        self._seq += 1

    def finish(self, keep: Iterable[str]) -> None:
        """The run is committed: forget its config and delete every part not in `keep` (the shards the
        cache now references); parts that only held replaced, removed or unreadable images go."""
        keep = set(keep)
        for p in self.all_parts():
            if p.name not in keep:
                p.unlink()
        (self.dir / "config.json").unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def shard_dir(cache_path: Path) -> Path:
    """Where a cache's shards live: beside it, named after it."""
    return Path(str(cache_path) + ".shards")


@dataclass
class Shards:
    """Where each row of a cache's table is stored: shard file names (in the cache's shard folder), their
    sha256 and row counts, and per table row the shard index and the row inside that shard."""

    names: list[str]
    sha256: list[str]
    rows: list[int]
    shard: np.ndarray
    row: np.ndarray

    def runs(self) -> Iterator[tuple[int, int, int, int]]:
        """(table start, shard index, shard row start, length): maximal stretches stored contiguously."""
        n = len(self.shard)
        if n == 0:
            return
        breaks = np.flatnonzero((np.diff(self.shard) != 0) | (np.diff(self.row) != 1)) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [n]])
        for a, b in zip(starts, ends):
            yield int(a), int(self.shard[a]), int(self.row[a]), int(b - a)


def write_cache(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, list[str]], classes: list[str],
                skipped: dict[str, list[str]], attrs: dict, shards: Shards | None = None) -> None:
    """Write the complete cache under a temporary name and rename it into place.

    With `shards`, the features stay in the shard files and the cache holds an HDF5 virtual dataset over
    them (plain h5py reads it as one array) plus the shard list with checksums: the cache file is the
    manifest. Rows no shard covers read as NaN, which `open_cache` refuses. Without, `arrays["features"]`
    is stored in the file itself."""
    def fill(f: h5py.File) -> None:
        str_dt = h5py.string_dtype()
        if shards is None:
            n, d = arrays["features"].shape
            # fletcher32: HDF5 checksums every chunk and refuses to read one whose bytes changed on disk
            f.create_dataset("features", data=arrays["features"], chunks=(min(max(n, 1), 1024), d), fletcher32=True)
        else:
            folder, n = shard_dir(Path(path.name)).name, len(shards.shard)
            _virtual_features(f, folder, shards, int(attrs["feature_dim"]), np.dtype(attrs["dtype"]))
            g = f.create_group("shards")
            g.create_dataset("name", data=np.array(shards.names, dtype=object), dtype=str_dt)
            g.create_dataset("sha256", data=np.array(shards.sha256, dtype=object), dtype=str_dt)
            g.create_dataset("rows", data=np.array(shards.rows, dtype=np.int64))
            g.create_dataset("shard", data=shards.shard.astype(np.int32), fletcher32=True, chunks=(max(n, 1),))
            g.create_dataset("row", data=shards.row.astype(np.int32), fletcher32=True, chunks=(max(n, 1),))
            f.attrs["shard_dir"] = folder
        for name, values in arrays.items():
            if name == "features":
                continue
            if values.dtype.kind in "OU":
                f.create_dataset(name, data=values.astype(object), dtype=str_dt)
            else:
                f.create_dataset(name, data=values, chunks=(max(len(values), 1),), fletcher32=True)
        f.create_dataset("classes", data=np.array(classes, dtype=object), dtype=str_dt)
        g = f.create_group("meta")
        for col, values in meta.items():
            g.create_dataset(col, data=np.array(values, dtype=object), dtype=str_dt)
        s = f.create_group("skipped")
        pairs = [(i, reason) for reason, items in skipped.items() for i in items]
        s.create_dataset("id", data=np.array([str(p[0]) for p in pairs], dtype=object), dtype=str_dt)
        s.create_dataset("reason", data=np.array([p[1] for p in pairs], dtype=object), dtype=str_dt)
        set_attrs(f, attrs | {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": True})

    write_h5(path, fill)


def _virtual_features(f: h5py.File, folder: str, shards: Shards, d: int, dtype: np.dtype) -> None:
    """`features` as a virtual dataset: each stretch of rows stored contiguously in one shard is one
    mapping. Built with h5py's low-level calls: an updated catalogue interleaves new rows with old ones,
    so there are thousands of stretches, and the high-level VirtualLayout's per-mapping cost showed in
    the update's time."""
    from h5py import h5d, h5p, h5s, h5t

    n = len(shards.shard)
    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_fill_value(np.array(np.nan, dtype=dtype))  # rows no shard covers read as NaN: refused on open
    virtual = h5s.create_simple((n, d))
    sources = [h5s.create_simple((rows, d)) for rows in shards.rows]
    files = [f"{folder}/{name}".encode() for name in shards.names]
    for start, s, row, length in shards.runs():
        virtual.select_hyperslab((start, 0), (length, d))
        sources[s].select_hyperslab((row, 0), (length, d))
        dcpl.set_virtual(virtual, files[s], b"features", sources[s])
    h5d.create(f.id, b"features", h5t.py_create(dtype), h5s.create_simple((n, d)), dcpl=dcpl).close()


def write_h5(path: Path, fill: Callable[[h5py.File], None]) -> None:
    """An HDF5 file filled by `fill`, written atomically. HDF5 builds it in memory and Python writes the
    bytes: when the disk filled mid-write, HDF5's own writer raised and then crashed the process
    (segfault), while a plain write raises a clean OSError."""
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        fill(f)
    with atomic_path(path) as tmp:
        tmp.write_bytes(image.getbuffer())


def set_attrs(f: h5py.File, attrs: dict) -> None:
    """Plain values as HDF5 attributes; dicts, lists and None as JSON text (read back by `read_attrs`)."""
    for k, v in attrs.items():
        f.attrs[k] = _json_attr(v) if v is None or isinstance(v, (dict, list, tuple)) else v


def _decode(v):
    if isinstance(v, bytes):
        v = v.decode()
    if v == "null":
        return None
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v.item() if isinstance(v, np.generic) else v


@dataclass
class FeatureCache:
    """A complete cache read into memory (features are a few hundred MB at most)."""

    path: Path
    attrs: dict
    features: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    classes: list[str]
    meta: dict[str, list[str]]
    # sha256 over each row's id and image digest: which images, by content, the features are of. Unlike
    # dataset_fingerprint (file sizes and mtimes by default) it survives a copy of the dataset. None for
    # caches from before per-image digests were kept.
    images_digest: str | None = None
    digests: np.ndarray | None = None  # each row's image sha256 (None for caches from before digests)

    @property
    def backbone(self) -> str:
        return self.attrs["backbone"]

    def subset(self, split: str | Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """(float32 features, labels) of one split or several, e.g. ("train", "val")."""
        names = [split] if isinstance(split, str) else list(split)
        unknown = [s for s in names if s not in SPLIT_CODES]
        if unknown:
            raise CacheError(f"unknown split {unknown}; use {', '.join(SPLIT_CODES)}")
        mask = np.isin(self.split, [SPLIT_CODES[s] for s in names])
        # torch gathers float16 rows and converts them to float32 several times faster than numpy's
        # boolean indexing and astype on this CPU (0.06 s vs 0.2 + 0.8 s for the training split)
        import torch  # here, not at the top: a Ray actor imports this module for `storable` alone

        rows = torch.from_numpy(np.flatnonzero(mask))
        return torch.from_numpy(self.features).index_select(0, rows).float().numpy(), self.labels[mask]

    def test_rows(self) -> dict:
        """The test split's image ids and, by content, a sha256 over their "id:digest" lines (None without
        digests): what a model records as the rows it was scored on, so that a cache whose test split moved
        (its test rows may be the model's training rows) is refused (`Model.check_labels`)."""
        test = self.split == SPLIT_CODES["test"]
        ids = self.ids[test]
        return {"ids": ids.tolist(),
                "sha256": images_digest(ids, self.digests[test]) if self.digests is not None else None}

    def provenance(self) -> dict:
        """What a model trained on this cache must carry to rebuild its input pipeline and to recognise the
        rows it was scored on; for joined caches (`join_caches`) each part's, in order, under "parts"."""
        images = ({"images_digest": self.images_digest} if self.images_digest else {}) | {"test_rows": self.test_rows()}
        if "parts" in self.attrs:
            return {k: self.attrs[k] for k in _JOINED_KEYS + _SHARED_KEYS if k in self.attrs} | images
        keys = ("backbone", "weights", "weights_id", "feature_dim", "preprocessing", "target",
                "dataset_root", "dataset_fingerprint")
        optional = ("split_fractions", "split_seed", "runtime_model", "runtime_id")  # only INT8 caches have a model
        return ({k: self.attrs[k] for k in keys} | {"runtime": self.runtime, "cache": str(self.path)}
                | {k: self.attrs[k] for k in optional if k in self.attrs} | images)

    @property
    def runtime(self) -> str:
        return self.attrs.get("runtime", "torch")  # caches from before runtimes existed were torch's


# a joined cache's attributes: what each part was made with, as lists in part order ...
_JOINED_KEYS = ("backbone", "feature_dim", "parts", "weights_id", "preprocessing", "runtime", "runtime_id", "cache")
# ... and what its parts share, by construction
_SHARED_KEYS = ("target", "dataset_root", "dataset_fingerprint", "split_fractions", "split_seed")


def join_caches(caches: Sequence[FeatureCache]) -> FeatureCache:
    """Caches of several backbones over the same images as one table whose features are theirs side by
    side, in the order given: a head then trains on two backbones at once, and predict runs each
    backbone and joins their features the same way. They must hold the same images, labels and split."""
    first = caches[0]
    for c in caches[1:]:
        same = (np.array_equal(c.ids, first.ids) and np.array_equal(c.labels, first.labels)
                and np.array_equal(c.split, first.split) and c.classes == first.classes
                and same_images(c.provenance(), first.provenance())
                and all(c.attrs.get(k) == first.attrs.get(k) for k in _SHARED_KEYS if k != "dataset_fingerprint"))
        if not same:
            raise CacheError(f"{c.path.name} and {first.path.name} do not hold the same images, labels and split; "
                             "extract both from the same dataset with the same --target, --min-per-class, --split "
                             "and --seed")
    parts = [c.provenance() for c in caches]
    attrs = {k: first.attrs[k] for k in _SHARED_KEYS if k in first.attrs} | {
        "backbone": "+".join(c.backbone for c in caches), "feature_dim": sum(p["feature_dim"] for p in parts),
        "parts": parts, "cache": [str(c.path) for c in caches],
        **{k: [p.get(k) for p in parts] for k in ("weights_id", "preprocessing", "runtime", "runtime_id")}}
    return FeatureCache(first.path, attrs, np.hstack([c.features for c in caches]), first.ids, first.labels,
                        first.split, first.classes, first.meta, first.images_digest, first.digests)


def same_images(a: dict, b: dict) -> bool:
    """Whether two provenances (of caches or models) are of the same images: by their content digests when
    both have them, so a copied or re-downloaded dataset still matches, else by the dataset fingerprint."""
    if a.get("images_digest") and b.get("images_digest"):
        return a["images_digest"] == b["images_digest"]
    return a.get("dataset_fingerprint") == b.get("dataset_fingerprint")


def images_digest(ids: np.ndarray, digests: np.ndarray) -> str | None:
    """sha256 over "id:digest" lines, row by row; None when a row has no digest."""
    if any(not d for d in digests):
        return None
    lines = (f"{i}:{d.decode() if isinstance(d, bytes) else d}\n" for i, d in zip(ids.tolist(), digests.tolist()))
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def open_caches(paths: Sequence[str | os.PathLike]) -> FeatureCache:
    """One cache, or several joined (`join_caches`)."""
    caches = [open_cache(p) for p in paths]
    return caches[0] if len(caches) == 1 else join_caches(caches)


def _attrs(f: h5py.File) -> dict:
    return {k: _decode(v) for k, v in f.attrs.items()}


def read_attrs(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return _attrs(f)


def open_cache(path: str | os.PathLike) -> FeatureCache:
    """Read a cache; refuses files that are not complete featpipe caches."""
    path = Path(path)
    if not path.is_file():
        hint = (" (an extraction is in progress or was interrupted: rerun the same `featpipe extract`)"
                if Journal(shard_dir(path)).exists else "")
        raise CacheError(f"{path}: no such cache{hint}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CacheError(f"{path}: not a readable HDF5 file ({exc}); delete it and rerun `featpipe extract`") from None
    with f:
        attrs = _attrs(f)
        if attrs.get("format") != FORMAT:
            raise CacheError(f"{path}: not a featpipe cache (no format attribute)")
        if not attrs.get("complete"):
            raise CacheError(f"{path}: cache is incomplete; rerun the `featpipe extract` that made it")
        if attrs.get("format_version") not in READABLE_VERSIONS:
            raise CacheError(f"{path}: cache format {attrs.get('format_version')} is not {FORMAT_VERSION}; re-extract it")
        _check_shards(path, f)
        try:
            ids = f["ids"][...]
            digests = f["digests"][...].astype(str) if "digests" in f else None
            cache = FeatureCache(
                path=path,
                attrs=attrs,
                features=f["features"][...],
                ids=ids,
                labels=f["labels"][...],
                split=f["split"][...],
                classes=[c.decode() if isinstance(c, bytes) else c for c in f["classes"][...]],
                meta={k: [v.decode() for v in f["meta"][k][...]] for k in f["meta"]},
                images_digest=images_digest(ids, digests) if digests is not None else None,
                digests=digests,
            )
        except (OSError, KeyError) as exc:  # a checksum mismatch or a damaged structure
            raise CacheError(f"{path}: damaged ({str(exc).splitlines()[0]}); delete it and rerun `featpipe extract`") from None
    if not np.isfinite(cache.features).all():
        raise CacheError(f"{path}: holds NaN or Inf features; delete it and rerun `featpipe extract`")
    if not (len(cache.ids) == len(cache.labels) == len(cache.split) == len(cache.features)):
        raise CacheError(f"{path}: its arrays have different lengths; delete it and rerun `featpipe extract`")
    return cache


def _check_shards(path: Path, f: h5py.File) -> None:
    """A sharded cache's shard files must all be there: HDF5 would read a missing one as its fill value."""
    if "shards" not in f:
        return
    folder = path.parent / str(_decode(f.attrs["shard_dir"]))
    missing = [n for n in (_decode(v) for v in f["shards/name"][...]) if not (folder / n).is_file()]
    if missing:
        raise CacheError(f"{path}: {len(missing)} of its shard files are missing from {folder} (e.g. {missing[0]}); "
                         "move the cache together with its .shards folder, or rerun `featpipe extract --overwrite`")


@dataclass
class Table:
    """What an update of a sharded cache needs of the previous build: rows, their split and image stamps,
    and where each row's features are stored."""

    attrs: dict
    ids: np.ndarray
    split: np.ndarray
    stamps: np.ndarray
    shards: Shards
    skipped: dict[str, list[str]]
    digests: np.ndarray | None = None  # sha256 of each image's bytes (caches from before digests: None)
    labels: np.ndarray | None = None  # class names of the rows
    retired: dict[str, np.ndarray] | None = None  # images it held once: "id", "digest", "split" (`RETIRED`)


def read_table(path: Path) -> Table | None:
    """The previous build of a sharded cache with per-image stamps, or None for one without (an older
    format, or a single-file cache), which can only be rebuilt."""
    try:
        with h5py.File(path, "r") as f:
            attrs = _attrs(f)
            if not attrs.get("complete") or "shards" not in f or "stamps" not in f:
                return None
            _check_shards(path, f)
            g = f["shards"]
            shards = Shards([_decode(v) for v in g["name"][...]], [_decode(v) for v in g["sha256"][...]],
                            g["rows"][...].tolist(), g["shard"][...], g["row"][...])
            skipped: dict[str, list[str]] = {}
            for i, reason in zip(f["skipped/id"][...], f["skipped/reason"][...]):
                skipped.setdefault(_decode(reason), []).append(_decode(i))
            digests = f["digests"][...].astype(str) if "digests" in f else None
            classes = np.array([_decode(c) for c in f["classes"][...]], dtype=str)
            retired = {k: f[f"retired/{k}"][...] for k in RETIRED} if "retired" in f else None
            if retired is not None:
                retired["digest"] = retired["digest"].astype(str)
            return Table(attrs, f["ids"][...], f["split"][...], f["stamps"][...].astype(str), shards, skipped,
                         digests, classes[f["labels"][...]], retired)
    except (OSError, KeyError) as exc:
        raise CacheError(f"{path}: damaged ({str(exc).splitlines()[0]}); rerun `featpipe extract --overwrite`") from None


def check_cache_dir(cache_dir: str | os.PathLike) -> Path:
    """--cache-dir must be a folder (it is created when missing)."""
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise CacheError(f"--cache-dir {cache_dir} is a file, not a folder; give a folder for the caches")
    return cache_dir


def find_cache(cache_dir: str | os.PathLike = "cache", backbone: str = "mobilenet_v2", cache: str | os.PathLike | None = None) -> Path:
    """The one complete cache for `backbone` in `cache_dir`, or `cache` when given explicitly."""
    if cache is not None:
        return Path(cache)
    cache_dir = check_cache_dir(cache_dir)
    found, unreadable = [], []
    for p in sorted(cache_dir.glob(f"{glob_escape(file_stem(backbone))}-*.h5")):
        try:
            if read_attrs(p).get("backbone") == backbone:
                found.append(p)
        except OSError:  # truncated or not HDF5: say so rather than pass it over or crash on it
            unreadable.append(p.name)
    if not found:
        pending = sorted(cache_dir.glob(f"{glob_escape(file_stem(backbone))}-*.h5.shards/config.json"))
        hint = f"; unfinished extraction(s): {', '.join(p.parent.name for p in pending)}" if pending else ""
        hint += (f"; unreadable (truncated or not HDF5, delete and re-extract): {', '.join(unreadable)}"
                 if unreadable else "")
        raise CacheError(f"no complete {backbone} cache in {cache_dir}/{hint}; run `featpipe extract --backbone {backbone}` first")
    if len(found) > 1:
        raise CacheError(
            f"{len(found)} {backbone} caches in {cache_dir}/ ({', '.join(p.name for p in found)}); choose one with --cache FILE"
        )
    return found[0]
