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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .dataset import DatasetError
from .evaluate import per_class, scores
from .features.pipeline import FeaturePipeline

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


def read_labels(csv_path: str | os.PathLike, root: str | os.PathLike | None = None,
                label_column: str = "articleType") -> LabelledImages:
    """Read `file,<label_column>[,...]` rows; `file` is relative to `root` (default: the csv's folder).

    A row without a file name or label is an error naming its line: a silently dropped row would
    make the accuracy describe a different set of photos than the user gave."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: no such labels file; give a csv with columns file,{label_column}")
    root = Path(root) if root is not None else csv_path.parent
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
    for n, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(fi, li) or not row[fi].strip() or not row[li].strip():
            raise DatasetError(f"{csv_path}: line {n} has no file name or no {label_column}; fix or delete that row")
        paths.append(root / row[fi].strip())
        labels.append(row[li].strip())
        lines.append(n)
    if not paths:
        raise DatasetError(f"{csv_path}: no rows below the header")
    return LabelledImages(csv_path, paths, labels, lines)


@dataclass
class LabelledFeatures:
    """A labelled folder's photos as feature rows for a head to train on, in a cache's label indices."""

    csv_path: Path
    features: np.ndarray  # one row per photo that could be read
    labels: np.ndarray  # the cache's class index of each row
    skipped: list[str]  # 'line N: path: why', one per photo that could not be read

    def describe(self) -> str:
        skipped = f", {len(self.skipped)} unreadable skipped" if self.skipped else ""
        return f"{self.csv_path} ({len(self.labels)} photos{skipped})"


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
    return LabelledFeatures(data.csv_path, feats[ok], labels, skipped)


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
