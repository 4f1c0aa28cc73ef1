"""A bag of one head's copies, each fitted on all folds of the data but one (cross-fitting).

Deployed, the bag gives the mean of its copies' logits: an ensemble over resampled rows. For calibration,
every row also gets logits from the one copy that never saw it (`oof_logits_`), so the temperature and the
auto-tag threshold can be fitted on every training row rather than on a held-out split alone. Those
out-of-fold logits come from single copies, which are less accurate than their mean, so a threshold chosen on
them is on the safe side for the bag.
"""
from __future__ import annotations

import numbers
import time
import warnings

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, check_X_y, validate_data
from torch import nn

from .heads import LogitsClassifier, TorchHead, _hold_out

# the out-of-fold logit of a class that the copy scoring the row never saw: no probability at any temperature
# calibrate.fit_temperature tries, yet finite, so a row of that class still has a finite loss
UNSEEN_LOGIT = -1e4


class FoldBag(LogitsClassifier, BaseEstimator):
    """`folds` copies of `estimator`, copy k fitted on every stratified fold of (X, y) but the k-th (folds drawn
    with the estimator's seed); logits are the mean of the copies' logits, each class's over the copies that
    were fitted on it.

    After fit: `oof_logits_` (each row's logits, in the columns of `classes_`, from the copy that held its fold
    out; UNSEEN_LOGIT for a class that copy never saw), `train_rows_` (each copy's rows) and `fit_seconds_`.
    A saved and loaded bag predicts alike but keeps none of these three.
    """

    def __init__(self, estimator: TorchHead | None = None, folds: int = 10):
        self.estimator = estimator
        self.folds = folds

    @property
    def head(self) -> str:
        """The copies' architecture name ('batchnorm', 'fc'), as TorchHead.head: names an index on its embedding."""
        return self._template().head

    def _template(self) -> TorchHead:
        return self.estimator if self.estimator is not None else TorchHead()

    def fit(self, X, y, X_extra=None, y_extra=None) -> "FoldBag":
        """X_extra, y_extra: rows every copy also trains on, outside the folds (photos reviewers labelled): none
        is ever held out, so none has out-of-fold logits and calibration rests on (X, y) alone."""
        X, y = validate_data(self, X, y, dtype=np.float32, ensure_min_samples=2)
        check_classification_targets(y)
        if (X_extra is None) != (y_extra is None):
            raise ValueError("give both X_extra and y_extra, or neither")
        if X_extra is not None:
            X_extra, y_extra = check_X_y(X_extra, y_extra, dtype=np.float32, ensure_min_samples=0)
            if X_extra.shape[1] != X.shape[1] or not np.isin(y_extra, y).all():
                raise ValueError(f"X_extra must have X's {X.shape[1]} features and y_extra only classes y has")
        if not (isinstance(self.folds, numbers.Integral) and 2 <= self.folds <= len(y)):
            raise ValueError(f"folds must be a whole number from 2 to the {len(y)} rows, not {self.folds!r}")
        template = self._template()
        self.classes_ = np.unique(y)
        with warnings.catch_warnings():  # a class with fewer rows than folds is only missing from some copies' training
            warnings.filterwarnings("ignore", "The least populated class", UserWarning)
            splits = list(StratifiedKFold(self.folds, shuffle=True, random_state=template.seed).split(X, y))
        self.oof_logits_ = np.full((len(y), len(self.classes_)), UNSEEN_LOGIT, dtype=np.float32)
        self.estimators_, self.train_rows_, self.fit_seconds_ = [], [], []
        for train, held in splits:
            t0 = time.perf_counter()
            # the rows that pick a copy's best epoch come from its folds, as they would without extra rows, and
            # never from the extra rows, which are repeated: held out, they would be copies of training rows
            X_fit, X_stop, y_fit, y_stop = _hold_out(X[train], y[train], template.val_fraction, template.seed)
            if X_extra is not None:  # (not appended when absent: that would copy every copy's rows once more)
                X_fit, y_fit = np.concatenate([X_fit, X_extra]), np.concatenate([y_fit, y_extra])
            est = clone(template).fit(X_fit, y_fit, X_stop, y_stop)
            self.fit_seconds_.append(time.perf_counter() - t0)
            self.oof_logits_[np.ix_(held, self._columns(est))] = est.logits(X[held])
            self.estimators_.append(est)
            self.train_rows_.append(train)
        self._adopt(self.estimators_)
        return self

    def _columns(self, est: TorchHead) -> np.ndarray:
        return np.searchsorted(self.classes_, est.classes_)

    def _adopt(self, estimators: list[TorchHead]) -> None:
        """What the copies make of the bag as a whole: its module (the weights a model's digest covers), curves."""
        self.module_ = nn.ModuleList([est.module_ for est in estimators])
        per_copy = estimators[0].members
        self.history_ = [row | {"member": k * per_copy + row.get("member", 0)}
                         for k, est in enumerate(estimators) for row in est.history_]
        self.best_epoch_ = [est.best_epoch_ for est in estimators]

    def logits(self, X) -> np.ndarray:
        """Each class's mean logit over the copies fitted on it (temperature and thresholds work on these)."""
        check_is_fitted(self, "estimators_")
        X = validate_data(self, X, reset=False, dtype=np.float32)
        total = np.zeros((len(X), len(self.classes_)))
        count = np.zeros(len(self.classes_))
        for est in self.estimators_:
            cols = self._columns(est)
            total[:, cols] += est.logits(X)
            count[cols] += 1
        return (total / count).astype(np.float32)

    def embed(self, X) -> np.ndarray:
        """The first copy's embedding (TorchHead.embed): the copies' hidden layers are not aligned, so no mean."""
        check_is_fitted(self, "estimators_")
        return self.estimators_[0].embed(X)

    # -- persistence (tensors and plain values only, as TorchHead's) -------------------------------
    def to_state(self) -> dict:
        check_is_fitted(self, "estimators_")
        return {"bag": {"folds": self.folds, "estimator": self._template().get_params(),
                        "classes": self.classes_.tolist(), "copies": [est.to_state() for est in self.estimators_]}}

    @classmethod
    def from_state(cls, state: dict) -> "FoldBag":
        s = state["bag"]
        bag = cls(TorchHead(**s["estimator"]), s["folds"])
        bag.classes_ = np.array(s["classes"])
        bag.estimators_ = [TorchHead.from_state(c) for c in s["copies"]]
        bag.n_features_in_ = bag.estimators_[0].n_features_in_
        bag._adopt(bag.estimators_)
        return bag


def head_from_state(state: dict) -> TorchHead | FoldBag:
    """The head a model file holds: a bag or a single head (with its own members)."""
    return FoldBag.from_state(state) if "bag" in state else TorchHead.from_state(state)
