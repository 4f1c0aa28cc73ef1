"""styles.csv + images/{id}.jpg -> labelled records, class filter and a stratified split.

The csv is read by hand rather than with pandas because the real file has rows whose last
field (productDisplayName) holds unquoted commas: the name is the tail of such a row.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .files import sha256_file

log = logging.getLogger(__name__)

TARGETS = ("articleType", "subCategory", "masterCategory", "baseColour", "gender", "usage", "season")


class DatasetError(UserError):
    """Input data that cannot be used; the message says what and where."""


@dataclass
class Dataset:
    """Records that survived parsing and filtering, in id order, with their split."""

    root: Path
    target: str
    ids: np.ndarray  # int64, sorted
    labels: np.ndarray  # int32 index into classes
    classes: list[str]
    split: np.ndarray  # int8: 0 train, 1 val, 2 test
    meta: dict[str, list[str]]  # every csv column for the kept rows
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> ids / row refs

    @property
    def image_dir(self) -> Path:
        return self.root / "images"

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / f"{int(image_id)}.jpg"

    def __len__(self) -> int:
        return len(self.ids)


def _read_text(csv_path: Path) -> str:
    """The file as UTF-8 text; any other encoding is an error naming the line, never U+FFFD in a class name."""
    data = csv_path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DatasetError(f"{csv_path}: line {line} is not UTF-8 (byte 0x{data[exc.start]:02x}; the file looks "
                           "Latin-1 or Windows-1252 encoded); save it as UTF-8 and rerun") from None


def read_styles(csv_path: Path, required: tuple[str, ...] = ("id",)) -> tuple[list[str], list[list[str]], dict[str, list[str]]]:
    """Parse styles.csv; rows longer than the header get their tail joined into the last column.

    A field holding a line break means a quote opened on one line was closed lines later (or never):
    the csv reader would have merged those rows into one, so that is an error naming the line.
    Returns (header, rows, skipped) where skipped maps a reason to 'line N' references.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: no such file; point --data at the folder holding styles.csv and images/")
    reader = csv.reader(io.StringIO(_read_text(csv_path), newline=""))
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise DatasetError(f"{csv_path}: file is empty; expected a header line like 'id,gender,...,articleType,...'")
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise DatasetError(
            f"{csv_path}: missing column(s) {', '.join(missing)}; the header has {', '.join(header)}"
        )
    width = len(header)
    rows: list[list[str]] = []
    skipped: dict[str, list[str]] = {}
    lineno = reader.line_num + 1
    for row in reader:
        first, lineno = lineno, reader.line_num + 1
        if any("\n" in x or "\r" in x for x in row):
            raise DatasetError(f"{csv_path}: line {first} opens a quote (\") that is not closed on that line, which "
                               f"would merge lines {first}-{lineno - 1} into one row; close or remove the quote")
        if not row or not any(x.strip() for x in row):
            continue
        if len(row) > width:  # unquoted commas in the free-text last column
            row = row[: width - 1] + [",".join(row[width - 1:])]
        elif len(row) < width:
            skipped.setdefault("short_row", []).append(f"line {first}")
            continue
        rows.append([x.strip() for x in row])
    return header, rows, skipped


def case_clash(values: list[str]) -> tuple[str, str] | None:
    """Two of `values` that differ only in case or spaces ('Tshirts', 'tshirts'), or None: meant as one class,
    they would silently become two."""
    seen: dict[str, str] = {}
    for v in values:
        first = seen.setdefault("".join(v.split()).casefold(), v)
        if first != v:
            return first, v
    return None


def _stratified_split(labels: np.ndarray, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """Per-class seeded shuffle; every class gets at least one val and test item when it has 3+."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise DatasetError(f"split fractions {fractions} must be three non-negative numbers summing to 1")
    rng = np.random.default_rng(seed)
    split = np.zeros(len(labels), dtype=np.int8)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        n_val = int(round(n * fractions[1]))
        n_test = int(round(n * fractions[2]))
        if n >= 3:
            n_val = max(n_val, 1 if fractions[1] > 0 else 0)
            n_test = max(n_test, 1 if fractions[2] > 0 else 0)
        split[idx[:n_val]] = 1
        split[idx[n_val:n_val + n_test]] = 2
    return split


def hashed_split(ids: np.ndarray, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """A split for images added to an existing cache: from a stable hash of (seed, id), so it never
    depends on what else is in the catalogue, and an image keeps its split across every later update."""
    u = np.array([int.from_bytes(hashlib.sha256(f"featpipe split {seed}:{int(i)}".encode()).digest()[:8], "big")
                  for i in ids], dtype=np.float64) / 2.0**64
    return np.where(u < fractions[0], 0, np.where(u < fractions[0] + fractions[1], 1, 2)).astype(np.int8)


def load_dataset(
    root: str | os.PathLike,
    target: str = "articleType",
    min_per_class: int = 50,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> Dataset:
    """Read the dataset folder, drop rows without an image or label, keep classes with enough images."""
    root = Path(root)
    csv_path = root / "styles.csv"
    header, rows, skipped = read_styles(csv_path, required=("id", target))
    image_dir = root / "images"
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: no images folder; expected images/{{id}}.jpg beside styles.csv")
    # name -> whether it is a regular file (through symlinks): a named pipe, device or folder is never opened
    on_disk = {e.name: e.is_file() for e in os.scandir(image_dir)}
    id_col, t_col = header.index("id"), header.index(target)

    kept: list[list[str]] = []
    seen: set[int] = set()
    for row in rows:
        raw_id = row[id_col]
        try:
            image_id = int(raw_id)
        except ValueError:
            skipped.setdefault("bad_id", []).append(raw_id)
            continue
        if image_id in seen:
            skipped.setdefault("duplicate_id", []).append(raw_id)
            continue
        seen.add(image_id)
        if f"{image_id}.jpg" not in on_disk:
            skipped.setdefault("missing_image", []).append(raw_id)
            continue
        if not on_disk[f"{image_id}.jpg"]:
            skipped.setdefault("not_a_file", []).append(raw_id)
            continue
        if not row[t_col]:
            skipped.setdefault("no_label", []).append(raw_id)
            continue
        kept.append(row)
    if not kept:
        raise DatasetError(f"{csv_path}: no usable rows (every row lacks an image in {image_dir} or a {target} value)")

    counts = Counter(r[t_col] for r in kept)
    clash = case_clash(list(counts))
    if clash:
        a, b = clash
        first = {v: next(r[id_col] for r in kept if r[t_col] == v) for v in clash}
        raise DatasetError(f"{csv_path}: {target} values {a!r} ({counts[a]} rows, e.g. id {first[a]}) and {b!r} "
                           f"({counts[b]} rows, e.g. id {first[b]}) differ only in case or spaces, so they would be "
                           "two classes; write them the same way")
    classes = sorted(c for c, n in counts.items() if n >= min_per_class)
    if len(classes) < 2:
        raise DatasetError(
            f"{csv_path}: --min-per-class {min_per_class} leaves {len(classes)} class(es) of {target} "
            f"(largest: {counts.most_common(3)}); lower --min-per-class or pick another --target"
        )
    rare = {c for c in counts if c not in set(classes)}
    if rare:
        skipped["rare_class"] = [r[id_col] for r in kept if r[t_col] in rare]
    kept = sorted((r for r in kept if r[t_col] not in rare), key=lambda r: int(r[id_col]))

    class_index = {c: i for i, c in enumerate(classes)}
    labels = np.array([class_index[r[t_col]] for r in kept], dtype=np.int32)
    for reason, items in skipped.items():
        log.info("skipped %d row(s): %s", len(items), reason)
    return Dataset(
        root=root,
        target=target,
        ids=np.array([int(r[id_col]) for r in kept], dtype=np.int64),
        labels=labels,
        classes=classes,
        split=_stratified_split(labels, fractions, seed),
        meta={h: [r[i] for r in kept] for i, h in enumerate(header)},
        skipped=skipped,
    )


FINGERPRINTS = ("stat", "content")


def scan(ds: Dataset, mode: str = "stat") -> tuple[str, np.ndarray]:
    """(fingerprint, stamps) from one pass over the image folder.

    fingerprint: sha256 over styles.csv's bytes and every image's name, size and modification time (a
    replaced file has a new mtime even at the same size), plus each image's bytes in content mode, for
    files rewritten with their old mtime; it changes when the data does. stamps: per image of `ds` (in
    its order), what says whether that file changed: "size:mtime_ns", or the sha256 of its bytes."""
    if mode not in FINGERPRINTS:
        raise DatasetError(f"fingerprint mode {mode!r}: use {' or '.join(FINGERPRINTS)}")
    h = hashlib.sha256(f"featpipe fingerprint {mode}\n".encode())
    h.update((ds.root / "styles.csv").read_bytes())
    stamp_of = {}
    for entry in sorted(os.scandir(ds.image_dir), key=lambda e: e.name):
        st = entry.stat()
        h.update(f"{entry.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        stamp_of[entry.name] = f"{st.st_size}:{st.st_mtime_ns}"
        if mode == "content" and entry.is_file():  # the dataset's images are regular files (`load_dataset`)
            digest = sha256_file(entry.path)
            h.update(bytes.fromhex(digest))
            stamp_of[entry.name] = digest
    stamps = np.array([stamp_of[f"{int(i)}.jpg"] for i in ds.ids], dtype=str)
    return h.hexdigest(), stamps


def fingerprint(ds: Dataset, mode: str = "stat") -> str:
    """sha256 over styles.csv's bytes and the images (see `scan`): changes when the data does."""
    return scan(ds, mode)[0]
