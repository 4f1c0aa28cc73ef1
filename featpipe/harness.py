"""One training and evaluation harness for torch heads, scikit-learn and LightGBM on a feature cache:
fit-head (with calibration and an auto-tag threshold), the study's sweep, and compare."""
from __future__ import annotations

import inspect
import itertools
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import log_loss

from .bagging import FoldBag
from .calibrate import auto_tagging, fit_temperature, proba_logits, scale_proba
from .comparators import SoftVote, candidates
from .errors import UserError
from .evaluate import (confused_pairs, markdown_table, per_class, plot_bars, plot_confusion, plot_curves, scores,
                       write_csv)
from .heads import TorchHead, fit_stack
from .labelled import LabelledFeatures
from .models import Model
from .store import FeatureCache
from .views import ViewSet


@dataclass
class Splits:
    """The cache's fixed train/val/test split as float32 arrays with integer labels."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]

    @classmethod
    def from_cache(cls, cache: FeatureCache, views: ViewSet | None = None) -> "Splits":
        """The cache's splits; with `views`, the training split also holds those augmented views."""
        parts = [a for s in ("train", "val", "test") for a in cache.subset(s)]
        if views is not None:
            parts[0] = np.concatenate([parts[0], views.features.astype(np.float32)])
            parts[1] = np.concatenate([parts[1], views.labels(cache)])
        return cls(*parts, classes=cache.classes)


def fit_estimator(est: BaseEstimator, s: Splits) -> float:
    """Fit on train (giving the validation split to estimators that take one); returns seconds."""
    t0 = time.perf_counter()
    if "X_val" in inspect.signature(est.fit).parameters:
        est.fit(s.X_train, s.y_train, X_val=s.X_val, y_val=s.y_val)
    else:
        est.fit(s.X_train, s.y_train)
    return time.perf_counter() - t0


def evaluate_estimator(est: BaseEstimator, X: np.ndarray, y: np.ndarray) -> dict:
    t0 = time.perf_counter()
    pred = est.predict(X)
    ms = (time.perf_counter() - t0) * 1000 / max(len(X), 1) * 1000
    return scores(y, pred) | {"predict_ms_per_1000": ms}


def _proba_full(est: BaseEstimator, X: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba widened to every class of the cache (a class may be absent from a tiny train split)."""
    p = np.asarray(est.predict_proba(X), dtype=np.float64)
    p /= p.sum(1, keepdims=True)
    full = np.zeros((len(X), n_classes))
    full[:, np.asarray(est.classes_, dtype=int)] = p
    return full


# -- fit-head ----------------------------------------------------------------------------------------
def fit_head(cache: FeatureCache, out: str | Path, head: TorchHead, target_precision: float = 0.99,
             alpha: float = 0.05, views: ViewSet | None = None, cross_fit_folds: int | None = None,
             labelled: LabelledFeatures | None = None, labelled_repeat: int = 10, drop_overlap: bool = False) -> Model:
    """Train a head (on the clean training features, plus `views` when given), calibrate it on validation,
    choose the auto-tag threshold, evaluate on test, save.

    labelled: photos from outside the catalogue (`labelled.labelled_features`) to train on too, each row
    `labelled_repeat` times: a few hundred photos beside tens of thousands of catalogue rows would hardly move
    the loss once each. They are training rows only (of every copy, with `cross_fit_folds`): calibration and
    the test scores stay on the catalogue's rows. A labelled photo with the bytes of a validation or test
    image is an error naming its line, or with `drop_overlap` dropped and counted.

    cross_fit_folds: K folds of train + val instead: the model is a bag (`bagging.FoldBag`) of K copies of
    `head`, each fitted on all folds but one, giving the mean of their logits; the temperature and threshold
    come from every train and val row's logits from the copy that held it out. Calibrating on all those rows,
    not the val split's alone, makes the precision bound tighter, so more is auto-tagged at the same target,
    and the bag is more accurate than one head; it costs K fits and K heads' weights. Test stays out.

    Writes `out` (the model file) and, beside it, `<stem>.curves.csv` and `<stem>.curves.png`.
    """
    if cross_fit_folds is not None and views is not None:
        raise UserError("--cross-fit calibrates on the clean photos of train and val; leave --augment out")
    s = Splits.from_cache(cache, views)
    if labelled_repeat < 1:
        raise UserError(f"--labelled-repeat {labelled_repeat}: must be at least 1")
    if labelled is not None:
        labelled = labelled.without_held_out(cache, drop_overlap)
    # no empty arrays when there are none: appending them would copy the whole training split for nothing
    extra = (np.repeat(labelled.features.astype(np.float32), labelled_repeat, axis=0),
             np.repeat(labelled.labels, labelled_repeat)) if labelled is not None else ()
    if cross_fit_folds is None:
        if extra:
            s.X_train, s.y_train = np.concatenate([s.X_train, extra[0]]), np.concatenate([s.y_train, extra[1]])
        model, fit_s = head, fit_estimator(head, s)
        calibration = (head.logits(s.X_val), s.y_val, "validation split")
        n_train = len(s.y_train)
    else:
        X, y = np.concatenate([s.X_train, s.X_val]), np.concatenate([s.y_train, s.y_val])
        if not 2 <= cross_fit_folds <= len(y):
            raise UserError(f"--cross-fit {cross_fit_folds}: needs 2 to {len(y)} folds (the rows it calibrates on)")
        model = FoldBag(head, cross_fit_folds).fit(X, y, *extra)
        fit_s, n_train = sum(model.fit_seconds_), len(y) + (len(extra[1]) if extra else 0)
        calibration = (model.oof_logits_, y, f"{cross_fit_folds}-fold cross-fit over train + val")
    trained_on = {"train_views": views.name if views is not None else "none",
                  "train_labelled": f"{labelled.describe()} x {labelled_repeat}" if labelled is not None else "none"}
    return save_fitted(cache, out, model, calibration, (s.X_test, s.y_test), n_train, fit_s, cache.provenance(),
                       target_precision, alpha, trained_on)


def save_fitted(cache: FeatureCache, out: str | Path, head: TorchHead | FoldBag,
                calibration: tuple[np.ndarray, np.ndarray, str], test: tuple[np.ndarray, np.ndarray],
                n_train: int, fit_seconds: float, provenance: dict, target_precision: float = 0.99,
                alpha: float = 0.05, trained_on: dict | None = None) -> Model:
    """A fitted head's calibration and auto-tag threshold, from `calibration` (logits in the head's class
    columns, the cache's labels of those rows, what the rows are), and its test scores (on `test`, features and
    labels), saved with `provenance` as a model file, with its training curves beside it. `trained_on`: what
    the training rows held besides the catalogue's clean photos, as metrics (views, labelled photos)."""
    out = Path(out)
    logits, y_cal, calibrated_on = calibration
    X_test, y_test = test
    classes = [cache.classes[i] for i in head.classes_]
    idx_of = {c: i for i, c in enumerate(head.classes_)}
    yc = np.array([idx_of[v] for v in y_cal])
    yt = np.array([idx_of.get(v, -1) for v in y_test])

    auto = auto_tagging(logits, yc, head.logits(X_test), yt, target_precision, alpha)
    metrics = scores(y_test, head.predict(X_test)) | {
        "fit_seconds": fit_seconds, "best_epoch": head.best_epoch_, "n_train": n_train,
        "calibrated_on": calibrated_on, "n_calibration": len(y_cal),
        "n_test": len(y_test), **auto, "train_views": "none", "train_labelled": "none", **(trained_on or {}),
    }
    model = Model(head, classes, provenance, auto["temperature"], auto["threshold"], target_precision, metrics)
    model.save(out)
    write_csv(out.with_suffix(".curves.csv"), head.history_)
    plot_curves(head.history_, out.with_suffix(".curves.png"), f"{cache.backbone} + {head.head}")
    return model


# -- sweep -------------------------------------------------------------------------------------------
SWEEP_GRID = {"lr": (0.1, 0.01, 0.001), "optimizer": ("adam", "sgd"), "head": ("fc", "batchnorm")}


def sweep(caches: list[FeatureCache], lrs=SWEEP_GRID["lr"], optimizers=SWEEP_GRID["optimizer"],
          heads=SWEEP_GRID["head"], epochs: int = 3, stack_size: int = 16, **head_params) -> list[dict]:
    """The study's grid: backbone x learning rate x optimizer x head, each trained `epochs` epochs.

    A backbone's conditions share their data, batches and loss, so they train as stacks of up to
    `stack_size` (`heads.fit_stack`): every head's first layer in one matrix product per step, the
    rest once per kind of head, each condition ending as it would alone. A row's `seconds` is its
    equal share of its stack's.
    """
    rows = []
    for cache in caches:
        s = Splits.from_cache(cache)
        grid = [TorchHead(**dict(head_params, head=head, optimizer=o, lr=lr, epochs=epochs))
                for head, o, lr in itertools.product(heads, optimizers, lrs)]
        for start in range(0, len(grid), stack_size):
            stack = grid[start:start + stack_size]
            t0 = time.perf_counter()
            fit_stack(stack, s.X_train, s.y_train, s.X_val, s.y_val)
            seconds = time.perf_counter() - t0
            rows += [_sweep_row(est, cache.backbone, seconds, len(stack), start // stack_size + 1) for est in stack]
    return rows


def _sweep_row(est: TorchHead, backbone: str, stack_seconds: float, stack_size: int, stack: int) -> dict:
    best = est.history_[est.best_epoch_ - 1] if est.best_epoch_ else est.history_[-1]
    return {"backbone": backbone, "head": est.head, "optimizer": est.optimizer, "lr": est.lr, "epochs": est.epochs,
            "best_epoch": est.best_epoch_, "val_loss": best["val_loss"], "val_acc": best["val_acc"],
            "train_loss": best["train_loss"], "seconds": stack_seconds / stack_size,
            "stack": f"{backbone}/{stack}", "stack_size": stack_size, "stack_seconds": stack_seconds}


def top_by_val_loss(rows: list[dict], k: int = 10) -> list[dict]:
    return sorted(rows, key=lambda r: (not np.isfinite(r["val_loss"]), r["val_loss"]))[:k]


# -- compare -----------------------------------------------------------------------------------------
def compare(cache: FeatureCache, out_dir: str | Path, names: list[str] | None = None, ensemble_size: int = 3,
            seed: int = 0, device: str = "auto", log=print) -> list[dict]:
    """Fit every candidate on the same split; add a soft-vote of the best by temperature-scaled
    validation log-loss, weighted by greedy ensemble selection on validation.

    Writes compare.md, compare.csv and compare.png to `out_dir`, plus a per-class report of the best model.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s = Splits.from_cache(cache)
    pool = candidates(seed, device)
    names = names or list(pool)
    unknown = [n for n in names if n not in pool]
    if unknown:
        raise UserError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(pool)}")
    n_classes = len(cache.classes)
    rows, fitted, val_loss, val_proba = [], {}, {}, {}
    for name in names:
        est = clone(pool[name])
        with warnings.catch_warnings():  # iteration caps are deliberate: they bound compare's run time
            warnings.simplefilter("ignore", ConvergenceWarning)
            fit_s = fit_estimator(est, s)
        row = {"model": name} | evaluate_estimator(est, s.X_test, s.y_test) | {"fit_seconds": fit_s}
        if hasattr(est, "predict_proba"):
            val_proba[name] = _proba_full(est, s.X_val, n_classes)
            val_loss[name] = log_loss(s.y_val, val_proba[name], labels=range(n_classes))
        rows.append(row)
        fitted[name] = est
        log(f"{name:12s} acc={row['accuracy']:.4f} wF1={row['weighted_f1']:.4f} mF1={row['macro_f1']:.4f} "
            f"fit={fit_s:.1f}s")
    if ensemble_size > 1 and len(val_loss) >= 2:
        temps = {n: fit_temperature(proba_logits(p), s.y_val) for n, p in val_proba.items()}
        calibrated = {n: scale_proba(p, temps[n]) for n, p in val_proba.items()}
        scaled_loss = {n: log_loss(s.y_val, p, labels=range(n_classes)) for n, p in calibrated.items()}
        best = sorted(scaled_loss, key=scaled_loss.get)[:ensemble_size]
        weights = greedy_weights({n: calibrated[n] for n in best}, s.y_val)
        used = [n for n in best if weights[n] > 0]
        vote = SoftVote([fitted[n] for n in used], [weights[n] for n in used], [temps[n] for n in used]).fit()
        name = "ensemble(" + "+".join(f"{weights[n]:.1f}*{n}" for n in used) + ")"
        rows.append({"model": name} | evaluate_estimator(vote, s.X_test, s.y_test)
                    | {"fit_seconds": sum(r["fit_seconds"] for r in rows if r["model"] in used)})
        val_loss[name] = log_loss(s.y_val, vote.predict_proba(s.X_val), labels=range(n_classes))
        fitted[name] = vote
        log(f"{name} acc={rows[-1]['accuracy']:.4f} mF1={rows[-1]['macro_f1']:.4f}")
    for r in rows:
        r["val_log_loss"] = val_loss.get(r["model"], float("nan"))
    write_csv(out_dir / "compare.csv", rows)
    (out_dir / "compare.md").write_text(markdown_table(rows))
    plot_bars(rows, out_dir / "compare.png")
    # the model reported per class is chosen on validation: picking it by test accuracy would overstate it
    top = min(rows, key=lambda r: (not np.isfinite(r["val_log_loss"]), r["val_log_loss"]))
    write_report(fitted[top["model"]], s, out_dir / "report",
                 title=f"{cache.backbone} {top['model']} (lowest validation log-loss)")
    return rows


def greedy_weights(val_proba: dict[str, np.ndarray], y: np.ndarray, rounds: int = 10) -> dict[str, float]:
    """Ensemble selection with replacement (Caruana et al., 2004): repeatedly add the member that
    most lowers validation log-loss of the running average; weights are the pick counts."""
    picks = dict.fromkeys(val_proba, 0)
    total = np.zeros_like(next(iter(val_proba.values())))
    rows = np.arange(len(y))
    for step in range(1, rounds + 1):
        def loss_with(name: str) -> float:
            avg = (total + val_proba[name]) / step
            return float(-np.log(np.clip(avg[rows, y], 1e-12, None)).mean())
        name = min(val_proba, key=loss_with)
        picks[name] += 1
        total += val_proba[name]
    return {n: c / rounds for n, c in picks.items()}


def write_report(est: BaseEstimator, s: Splits, out_dir: str | Path, title: str = "") -> dict:
    """Per-class precision/recall/F1 (worst first), most confused pairs and a confusion-matrix PNG on test."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pred = est.predict(s.X_test)
    classes_rows = per_class(s.y_test, pred, s.classes)
    pairs = confused_pairs(s.y_test, pred, s.classes)
    write_csv(out_dir / "per_class.csv", classes_rows)
    write_csv(out_dir / "confused_pairs.csv", pairs)
    plot_confusion(s.y_test, pred, s.classes, out_dir / "confusion.png", title)
    (out_dir / "report.md").write_text(
        f"# {title}\n\n" + markdown_table([scores(s.y_test, pred)]) + "\n## Worst classes\n\n"
        + markdown_table(classes_rows[:15], ".3f") + "\n## Most confused pairs\n\n" + markdown_table(pairs))
    return {"per_class": classes_rows, "confused_pairs": pairs}
