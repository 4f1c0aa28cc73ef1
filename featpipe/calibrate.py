"""Confidences an operator can act on: temperature scaling, calibration error, and an auto-tag
threshold whose precision holds on unseen data (chosen on a lower confidence bound, not the point
estimate, because the best-looking threshold on validation data overstates its own precision)."""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp
from scipy.stats import beta


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64) / temperature, 1).numpy()


def proba_logits(proba: np.ndarray) -> np.ndarray:
    """Log-probabilities as logits, so estimators that only give probabilities can be temperature-scaled."""
    return np.log(np.clip(np.asarray(proba, dtype=np.float64), 1e-12, None))


def scale_proba(proba: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature scaling applied to probabilities: softmax(log p / T)."""
    return softmax(proba_logits(proba), temperature)


TEMPERATURE_BOUNDS = (0.05, 20.0)


def fit_temperature(logits: np.ndarray, y_idx: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The T within `bounds` minimising validation NLL of softmax(logits / T).

    Bounded because on a few validation images whose mistakes are confident, NLL keeps falling as T
    grows: unbounded, the fit ran to T = 1.6e9, which makes every confidence 1/classes."""
    z = np.asarray(logits, dtype=np.float64)
    rows, y = np.arange(len(z)), np.asarray(y_idx)

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        return float((logsumexp(s, axis=1) - s[rows, y]).mean())

    best = minimize_scalar(nll, bounds=np.log(bounds), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(best.x))


def expected_calibration_error(proba: np.ndarray, y_idx: np.ndarray, bins: int = 15) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    conf = proba.max(1)
    correct = proba.argmax(1) == y_idx
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def precision_lower_bound(n_correct: np.ndarray, n: np.ndarray, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound of a binomial proportion."""
    n_correct, n = np.asarray(n_correct, float), np.asarray(n, float)
    out = np.zeros_like(n)
    ok = n_correct > 0
    out[ok] = beta.ppf(alpha, n_correct[ok], n[ok] - n_correct[ok] + 1)
    return out


def choose_threshold(confidence: np.ndarray, correct: np.ndarray, target: float = 0.99, alpha: float = 0.05) -> float:
    """Lowest confidence threshold whose accepted set has precision >= target with (1 - alpha) confidence.

    Returns +inf when no threshold qualifies (everything goes to review).
    """
    order = np.argsort(-confidence, kind="stable")
    conf, hits = confidence[order], correct[order].astype(float)
    n = np.arange(1, len(conf) + 1)
    lower = precision_lower_bound(np.cumsum(hits), n, alpha)
    last_of_tie = np.r_[conf[1:] != conf[:-1], True]  # a threshold accepts every tied confidence
    ok = np.flatnonzero((lower >= target) & last_of_tie)
    return float(conf[ok[-1]]) if len(ok) else float("inf")


def coverage_and_precision(confidence: np.ndarray, correct: np.ndarray, threshold: float) -> tuple[float, float, int]:
    """Share auto-tagged, precision among them, and how many."""
    auto = confidence >= threshold
    n = int(auto.sum())
    return float(auto.mean()) if len(auto) else 0.0, float(correct[auto].mean()) if n else float("nan"), n


def auto_tagging(cal_logits: np.ndarray, y_cal: np.ndarray, test_logits: np.ndarray, y_test: np.ndarray,
                 target: float = 0.99, alpha: float = 0.05) -> dict[str, float]:
    """Calibrate a classifier's confidence on held-out rows (the val split, or out-of-fold logits): the
    temperature, then the auto-tag threshold for `target` precision; and measure it on test: what fit-head
    records for a head, for any model's logits."""
    temperature = fit_temperature(cal_logits, y_cal)
    pc, pt_raw, pt = softmax(cal_logits, temperature), softmax(test_logits), softmax(test_logits, temperature)
    threshold = choose_threshold(pc.max(1), pc.argmax(1) == y_cal, target, alpha)
    coverage, precision, n_auto = coverage_and_precision(pt.max(1), pt.argmax(1) == y_test, threshold)
    cal_cov, cal_prec, _ = coverage_and_precision(pc.max(1), pc.argmax(1) == y_cal, threshold)
    return {"temperature": temperature, "ece_test_before": expected_calibration_error(pt_raw, y_test),
            "ece_test_after": expected_calibration_error(pt, y_test), "threshold": threshold,
            "target_precision": target, "alpha": alpha, "calibration_coverage": cal_cov,
            "calibration_precision": cal_prec, "test_coverage": coverage, "test_precision": precision,
            "test_auto": n_auto}
