"""Retraining from the review page: a new head on the catalogue plus the reviewed photos, in a background
thread, then the queue re-ranked with it.

It is the training of `featpipe fit-head --preset tuned --members 1 --labelled <reviews.csv>`
(`RetrainSettings.command` gives that line): the catalogue's cache, each reviewed photo `repeat` times, calibration
and the auto-tag threshold on the catalogue. One member, not the tuned preset's three or make run's bag, so that a
retrain takes one fit; train the larger head with the command when the reviews are in. The reviewed photos'
features are the ones the review session stored, from the same pipeline the command would run them through.

How much the reviews helped is measured on the reviewed photos themselves: K-fold cross-validation over them
(each fold's head trained on the catalogue and the other folds' reviews, scored on the held-out fold), beside
the old model's accuracy on the same photos, which never trained on them.
"""
from __future__ import annotations

import logging
import shlex
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.base import clone
from sklearn.model_selection import KFold

from ..comparators import candidates
from ..errors import UserError
from ..harness import fit_head
from ..labelled import LabelledFeatures
from ..store import open_caches
from .review import ReviewSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrainSettings:
    """folds: cross-validation folds over the reviewed photos (fewer when there are fewer photos); repeat: how
    many times each reviewed photo is a training row (`fit-head --labelled-repeat`)."""

    device: str = "auto"
    folds: int = 5
    seed: int = 0
    repeat: int = 10

    def __post_init__(self):
        if self.folds < 2:
            raise UserError(f"folds {self.folds}: cross-validation needs at least 2")
        if self.repeat < 1:
            raise UserError(f"repeat {self.repeat}: must be at least 1")

    def command(self, session: ReviewSession) -> str:
        """The `featpipe fit-head` line that trains the same head from the reviews csv."""
        model = session.view.predictor.model
        caches = [f"--cache {shlex.quote(str(c))}" for c in _cache_paths(model.provenance)]
        return " ".join(["featpipe fit-head", *caches, f"--head {model.head.head} --preset tuned --members 1",
                         f"--labelled {shlex.quote(str(session.out))} "
                         f"--labelled-root {shlex.quote(str(session.label_root))} --labelled-repeat {self.repeat}",
                         f"--seed {self.seed} --target-precision {model.target_precision:g}",
                         f"--out {shlex.quote(str(session.out.with_suffix('.retrained.pt')))}"])


class RetrainJob:
    """One retrain of `session`'s model: `start()`, then `status()` until its state is 'done' or 'failed'."""

    def __init__(self, session: ReviewSession, settings: RetrainSettings = RetrainSettings()):
        self.session, self.settings = session, settings
        self.state, self.stage, self.step, self.steps = "starting", "", 0, 1
        self.error, self.result = "", None
        self.started = time.time()
        self._thread = threading.Thread(target=self._run, name="featpipe-retrain", daemon=True)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def status(self) -> dict:
        return {"state": self.state, "stage": self.stage, "step": self.step, "steps": self.steps,
                "seconds": round(time.time() - self.started, 1), "error": self.error, "result": self.result}

    def _run(self) -> None:
        try:
            self._retrain()
            self.state = "done"
        except (UserError, OSError) as exc:
            self.state, self.error = "failed", str(exc).splitlines()[0]
        except Exception as exc:  # a bug: the page says so, the log keeps the traceback
            log.exception("retrain failed")
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"

    def _retrain(self) -> None:
        session, settings = self.session, self.settings
        old = session.view
        model = old.predictor.model
        labels = session.labels()
        if len(labels) < 2:
            raise UserError(f"retrain needs at least 2 labelled photos; {len(labels)} so far")
        paths = _cache_paths(model.provenance)
        missing = [p for p in paths if not Path(p).is_file()]
        if not paths or missing:
            raise UserError(f"retraining needs the catalogue's feature cache {missing[0] if missing else '(none)'}, "
                            "which is not on this machine; run the command shown where it is")
        self.state, self.stage = "running", "opening the catalogue's cache"
        cache = open_caches(paths)
        rows = sorted(labels)
        unknown = sorted({labels[i] for i in rows} - set(cache.classes))
        if unknown:
            raise UserError(f"label {unknown[0]!r} is not one of the cache's classes")
        X = session.features[rows]
        y = np.array([cache.classes.index(labels[i]) for i in rows])
        k = min(settings.folds, len(rows))
        self.steps = 1 + k
        head = clone(candidates(settings.seed, settings.device)[model.head.head]).set_params(members=1)
        fits = session.state_dir / "retrained"
        fits.mkdir(exist_ok=True)
        out = fits / f"model-{len(list(fits.glob('model-*.pt'))) + 1}.pt"

        def fit(path: Path, train: np.ndarray):
            return fit_head(cache, path, clone(head), model.target_precision,
                            labelled=LabelledFeatures(session.out, X[train], y[train], []),
                            labelled_repeat=settings.repeat)

        self.stage = f"training on the catalogue + {len(rows)} reviewed photos"
        new = fit(out, np.arange(len(rows)))
        self.step, self.stage = 1, "re-ranking the queue with the new model"
        session.use_model(session.load_predictor(out))
        truth = np.array([labels[i] for i in rows])
        right = np.zeros(len(rows), dtype=bool)
        with tempfile.TemporaryDirectory(dir=fits) as tmp:
            for j, (train, held) in enumerate(KFold(k, shuffle=True, random_state=settings.seed).split(rows)):
                self.stage = f"cross-validating on the reviewed photos: fold {j + 1} of {k}"
                fold = fit(Path(tmp) / f"fold-{j}.pt", train)
                right[held] = np.array(fold.classes)[fold.proba(X[held]).argmax(axis=1)] == truth[held]
                self.step = 2 + j
        old_right = np.array(model.classes)[old.proba[rows].argmax(axis=1)] == truth
        self.stage = "done"
        self.result = {"model": str(out), "reviewed": len(rows), "folds": k,
                       "old_accuracy": float(old_right.mean()), "new_cv_accuracy": float(right.mean()),
                       "old_test_accuracy": model.metrics.get("accuracy"),
                       "new_test_accuracy": new.metrics.get("accuracy"),
                       "threshold": new.threshold if np.isfinite(new.threshold) else None}


def _cache_paths(provenance: dict) -> list[str]:
    recorded = provenance.get("cache")
    return recorded if isinstance(recorded, list) else [recorded] if recorded else []
