"""Labelled folders of photos: a csv of `file,<label>` rows, files relative to a root.

A model is scored on one (`score_folder`): what a user runs on their own shop's photos, and what the project
runs on `other-shops/` (photos unlike the catalogue) for every change to extraction, heads or predict. A head
can also train on one beside the catalogue (`labelled_features`, `fit-head --labelled`): photos that
reviewers tagged, which look like what sellers upload.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .dataset import DatasetError, case_clash
from .evaluate import per_class, scores
from .features.pipeline import FeaturePipeline
from .files import sha256_file
from .store import FeatureCache

if TYPE_CHECKING:
    from .workflows.predictor import Prediction, Predictor

log = logging.getLogger(__name__)


@dataclass
class LabelledImages:
    """Image paths and their true labels, with the csv line each came from."""

    csv_path: Path
    paths: list[Path]
    labels: list[str]
    lines: list[int]
    duplicates: int = 0  # rows that repeated an earlier row (same file, same label): used once


def _inside(path: Path, root: str) -> bool:
    """Whether `path`, resolved through symlinks and '..', lies inside the resolved folder `root`."""
    return os.path.commonpath([os.path.realpath(path), root]) == root


def read_labels(csv_path: str | os.PathLike, root: str | os.PathLike | None = None,
                label_column: str = "articleType", allow_outside_root: bool = False) -> LabelledImages:
    """Read `file,<label_column>[,...]` rows; `file` is relative to `root` (default: the csv's folder).

    A row without a file name or label is an error naming its line: a silently dropped row would
    make the accuracy describe a different set of photos than the user gave. So is a file that resolves
    outside `root` (through '..', an absolute path or a symlink) unless `allow_outside_root`: the csv may be
    written by other people, and must not make featpipe read (or say whether there is) any other file. The
    same file listed twice with other labels is an error naming both lines; with the same label it is used
    once and counted (`duplicates`)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: no such labels file; give a csv with columns file,{label_column}")
    root = Path(root) if root is not None else csv_path.parent
    real_root = os.path.realpath(root)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{csv_path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    if not rows:
        raise DatasetError(f"{csv_path}: empty; give a header line file,{label_column} and one row per photo")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in ("file", label_column) if c not in header]
    if missing:
        raise DatasetError(f"{csv_path}: no column {' or '.join(missing)} in the header ({','.join(header)}); "
                           f"name the columns file,{label_column} (or pass --label-column)")
    fi, li = header.index("file"), header.index(label_column)
    paths, labels, lines = [], [], []
    first: dict[str, int] = {}  # resolved file -> its index in paths
    duplicates = 0
    for n, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(fi, li) or not row[fi].strip() or not row[li].strip():
            raise DatasetError(f"{csv_path}: line {n} has no file name or no {label_column}; fix or delete that row")
        name, label = row[fi].strip(), row[li].strip()
        path = root / name
        if not allow_outside_root and not _inside(path, real_root):
            raise DatasetError(f"{csv_path}: line {n}: {name!r} is outside the root folder {root}; list files inside it "
                               "(no '..', absolute paths or symlinks leading out), or pass --allow-outside-root")
        k = first.setdefault(os.path.realpath(path), len(paths))
        if k < len(paths):
            if labels[k] != label:
                raise DatasetError(f"{csv_path}: lines {lines[k]} and {n} list the same file {name!r} with labels "
                                   f"{labels[k]!r} and {label!r}; keep the right one")
            duplicates += 1
            continue
        paths.append(path)
        labels.append(label)
        lines.append(n)
    if not paths:
        raise DatasetError(f"{csv_path}: no rows below the header")
    clash = case_clash(list(dict.fromkeys(labels)))
    if clash:
        a, b = clash
        raise DatasetError(f"{csv_path}: lines {lines[labels.index(a)]} and {lines[labels.index(b)]}: labels {a!r} and "
                           f"{b!r} differ only in case or spaces; write them the same way")
    if duplicates:
        log.warning("%s: %d row(s) repeat an earlier row (same file, same label); each file is used once",
                    csv_path, duplicates)
    return LabelledImages(csv_path, paths, labels, lines, duplicates)


@dataclass
class LabelledFeatures:
    """A labelled folder's photos as feature rows for a head to train on, in a cache's label indices."""

    csv_path: Path
    features: np.ndarray  # one row per photo that could be read
    labels: np.ndarray  # the cache's class index of each row
    skipped: list[str]  # 'line N: path: why', one per photo that could not be read

    duplicates: int = 0  # csv rows that repeated another (`LabelledImages.duplicates`)
    lines: list[int] = field(default_factory=list)  # the csv line of each row
    digests: list[str] = field(default_factory=list)  # the sha256 of each row's photo
    overlap: int = 0  # rows dropped for having the bytes of a catalogue validation or test photo

    def describe(self) -> str:
        skipped = f", {len(self.skipped)} unreadable skipped" if self.skipped else ""
        skipped += f", {self.duplicates} duplicate rows used once" if self.duplicates else ""
        skipped += f", {self.overlap} dropped as catalogue validation or test photos" if self.overlap else ""
        return f"{self.csv_path} ({len(self.labels)} photos{skipped})"

    def without_held_out(self, cache: FeatureCache, drop: bool = False) -> LabelledFeatures:
        """These rows, refused when a photo has the bytes of one of `cache`'s validation or test images (a head
        trained on it is calibrated or scored on its own training photo): an error naming the first such
        line, or with `drop`, those rows dropped and counted (`overlap`)."""
        if cache.digests is None:  # a cache from before per-image digests: nothing to compare with
            return self
        held = {d: (int(i), int(s)) for i, d, s in zip(cache.ids, cache.digests, cache.split) if s != 0}
        hit = np.array([d in held for d in self.digests], dtype=bool)
        if not hit.any():
            return self
        if not drop:
            k = int(np.flatnonzero(hit)[0])
            image, split = held[self.digests[k]]
            more = f" (and {int(hit.sum()) - 1} more row(s))" if hit.sum() > 1 else ""
            raise DatasetError(f"{self.csv_path}: line {self.lines[k]}: the photo has the same bytes as the catalogue's "
                               f"{'validation' if split == 1 else 'test'} image {image}{more}; delete the row, or pass "
                               "--drop-overlap to drop such rows")
        log.warning("%s: dropped %d photo(s) with the same bytes as catalogue validation or test images",
                    self.csv_path, int(hit.sum()))
        keep = ~hit
        return replace(self, features=self.features[keep], labels=self.labels[keep],
                       lines=[n for n, k in zip(self.lines, keep) if k],
                       digests=[d for d, k in zip(self.digests, keep) if k], overlap=int(hit.sum()))


def labelled_features(provenance: dict, classes: list[str], data: LabelledImages, batch_size: int = 64,
                      device: str = "auto") -> LabelledFeatures:
    """The features of `data`'s photos through the pipeline `provenance` records (a cache's or a model's),
    labelled by their index in `classes`.

    A label outside `classes` is an error naming its line: a head cannot learn a class the catalogue lacks,
    and dropping the row would lose a reviewer's work without a word. A photo that cannot be read is
    skipped, logged and counted, as extraction skips an unreadable catalogue image."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = [(n, t) for n, t in zip(data.lines, data.labels) if t not in index]
    if unknown:
        n, t = unknown[0]
        more = f" (and {len(unknown) - 1} more row(s))" if len(unknown) > 1 else ""
        raise DatasetError(f"{data.csv_path}: line {n}: {t!r} is not one of the catalogue's {len(classes)} classes"
                           f"{more}; fix the label (names as in the catalogue, e.g. {classes[0]!r}) or delete the row")
    feats, ok, errors = FeaturePipeline(provenance, device=device, batch_size=batch_size).embed(data.paths)
    skipped = [f"line {n}: {p}: {e}" for n, p, good, e in zip(data.lines, data.paths, ok, errors) if not good]
    for line in skipped:
        log.warning("skipped an unreadable labelled photo, %s", line)
    if not ok.any():
        raise DatasetError(f"{data.csv_path}: none of its {len(ok)} photos could be read ({skipped[0]}); "
                           "check the paths (--labelled-root) and the files")
    labels = np.array([index[t] for t, good in zip(data.labels, ok) if good])
    return LabelledFeatures(data.csv_path, feats[ok], labels, skipped, data.duplicates,
                            [n for n, good in zip(data.lines, ok) if good],
                            [_digest(p) for p, good in zip(data.paths, ok) if good])


def _digest(path: Path) -> str:
    """The sha256 of a photo that was just read, or "" when it cannot be read again."""
    try:
        return sha256_file(path)
    except OSError:
        return ""


@dataclass
class FolderScore:
    """What a model does on a labelled folder: summary metrics, per-class rows and every prediction."""

    summary: dict
    per_class: list[dict]
    predictions: list[Prediction]
    truth: list[str]
    unknown_labels: dict[str, int] = field(default_factory=dict)

    def mistakes(self) -> list[tuple[Prediction, str]]:
        return [(p, t) for p, t in zip(self.predictions, self.truth) if p.decision != "error" and p.label != t]


def score_folder(predictor: Predictor, data: LabelledImages, top_k: int = 3) -> FolderScore:
    """Predict every photo and score it against its label.

    Unreadable photos are counted and left out of the metrics (their rows say why). Labels the model
    does not know are kept and count as wrong: the model cannot give them, and leaving them out would
    flatter it; they are reported by name."""
    preds = predictor.predict(data.paths, top_k=max(top_k, 1))
    read = [i for i, p in enumerate(preds) if p.decision != "error"]
    if not read:
        raise DatasetError(f"{data.csv_path}: none of its {len(preds)} photos could be read (line {data.lines[0]}: "
                           f"{preds[0].path}: {preds[0].error}); check the paths (--root) and the files")
    known = set(predictor.classes)
    unknown: dict[str, int] = {}
    for t in data.labels:
        if t not in known:
            unknown[t] = unknown.get(t, 0) + 1
    truth = [data.labels[i] for i in read]
    guess = [preds[i].label for i in read]
    in_top = [data.labels[i] in [c for c, _ in preds[i].top_k] for i in read]
    auto = np.array([preds[i].decision == "auto" for i in read], dtype=bool)
    right = np.array([t == g for t, g in zip(truth, guess)], dtype=bool)
    names = sorted(set(truth) | set(guess))
    index = {c: k for k, c in enumerate(names)}
    y_true, y_pred = [index[t] for t in truth], [index[g] for g in guess]
    present = sorted({index[t] for t in truth})
    summary = {
        "images": len(preds), "unreadable": len(preds) - len(read), "unknown_label": sum(unknown.values()),
        "classes": len(set(truth)),
        **(scores(y_true, y_pred, labels=present) if read else {"accuracy": float("nan")}),
        f"top{top_k}": float(np.mean(in_top)) if read else float("nan"),
        "auto_coverage": float(auto.mean()) if read else float("nan"),
        "auto_precision": float(right[auto].mean()) if auto.any() else float("nan"),
        "auto": int(auto.sum()),
    }
    rows = [r for r in per_class(y_true, y_pred, names) if r["class"] in set(truth)]
    return FolderScore(summary, rows, preds, list(data.labels), unknown)
