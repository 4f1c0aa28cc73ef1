"""Metrics, per-class reports and plots shared by every head and comparator."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # not pyplot: plots go to files, and a notebook's backend is left alone
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def scores(y_true, y_pred, labels=None) -> dict[str, float]:
    """Accuracy, weighted and macro F1; `labels` limits the F1 averages to those classes (e.g. the ones present)."""
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
    }


def per_class(y_true, y_pred, classes: list[str]) -> list[dict]:
    """Precision/recall/F1/support per class, worst F1 first."""
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(len(classes)), zero_division=0)
    rows = [{"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(classes)]
    return sorted(rows, key=lambda row: (row["f1"], -row["support"]))


def confused_pairs(y_true, y_pred, classes: list[str], top: int = 15) -> list[dict]:
    cm = confusion_matrix(y_true, y_pred, labels=range(len(classes)))
    np.fill_diagonal(cm, 0)
    flat = np.argsort(-cm, axis=None)[:top]
    return [{"true": classes[i], "predicted": classes[j], "count": int(cm[i, j])}
            for i, j in zip(*np.unravel_index(flat, cm.shape)) if cm[i, j] > 0]


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        if rows:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def markdown_table(rows: list[dict], floatfmt: str = ".4f") -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(rows[0])
    fmt = lambda v: format(v, floatfmt) if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    """Loss and accuracy per epoch, train and validation (one pair of lines per member of an ensemble)."""
    members = sorted({h.get("member", 0) for h in history})
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "acc")):
        for m in members:
            rows = [h for h in history if h.get("member", 0) == m]
            tag = f" {m}" if len(members) > 1 else ""
            for split, name in (("train", "train"), ("val", "validation")):
                ax.plot([h["epoch"] for h in rows], [h[f"{split}_{metric}"] for h in rows], "o-", label=name + tag)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_confusion(y_true, y_pred, classes: list[str], path: Path, title: str = "") -> None:
    """Row-normalised confusion matrix, sized so that 70 class names stay readable."""
    cm = confusion_matrix(y_true, y_pred, labels=range(len(classes))).astype(float)
    cm /= np.maximum(cm.sum(1, keepdims=True), 1)
    side = max(6.0, 0.22 * len(classes) + 3)
    fig = Figure(figsize=(side, side))
    ax = fig.subplots()
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_bars(rows: list[dict], path: Path, metrics=("accuracy", "weighted_f1", "macro_f1")) -> None:
    names = [r["model"] for r in rows]
    x = np.arange(len(names))
    width = 0.8 / len(metrics)
    fig = Figure(figsize=(max(6, 1.1 * len(names)), 4))
    ax = fig.subplots()
    for k, m in enumerate(metrics):
        ax.bar(x + k * width, [r[m] for r in rows], width, label=m)
    ax.set_xticks(x + width * (len(metrics) - 1) / 2, names, rotation=30, ha="right")
    lo = min(r[m] for r in rows for m in metrics)
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
