"""Which photo an operator should label first: the review queue's order.

A label teaches a head most where the head is unsure, and a batch of labels teaches most when its photos are
also unlike each other (ten near-identical uncertain photos from one bedspread teach about as much as one).
`order_queue` ranks the photos awaiting review by one of:

- "confidence": lowest top-1 confidence first; the plain order, easy to explain.
- "margin": smallest gap between the top two probabilities first: the photos the head hesitates between two
  classes on.
- "badge": BADGE (Ash, Zhang, Krishnamurthy, Langford and Agarwal, "Deep Batch Active Learning by Diverse,
  Uncertain Gradient Lower Bounds", ICLR 2020): each photo's gradient embedding, the gradient of the loss under
  the head's own guess with respect to its last layer, g = (p - onehot(argmax p)) x h (h: the head's hidden
  layer, `model.head.embed`), ordered by k-means++ seeding over g. A photo's g is long when the head is unsure
  and points where its features do, so the first photos are uncertain and diverse.
"""
from __future__ import annotations

import numpy as np

STRATEGIES = ("confidence", "margin", "badge")
PROJECTED_DIMS = 128  # hidden layers wider than this are randomly projected for BADGE's distances
SEEDED_ROWS = 1000  # BADGE's k-means++ picks this many; the rest follow by their distance to those


def order_queue(proba: np.ndarray, embeddings: np.ndarray | None = None, strategy: str = "badge",
                seed: int = 0) -> np.ndarray:
    """Indices of the rows (photos awaiting review) in the order an operator should label them.

    proba: calibrated class probabilities, one row per photo. embeddings: the head's hidden-layer embedding of
    each photo (`model.head.embed(features)`), used by "badge"; without it BADGE runs on the gradient with
    respect to the last layer's bias alone (h = 1), i.e. diversity among the probability vectors. seed: BADGE's
    random draws (the same seed gives the same order). Ties keep row order."""
    proba = _check_proba(proba)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: must be one of {', '.join(STRATEGIES)}")
    if strategy == "confidence":
        return np.argsort(proba.max(1), kind="stable")
    if strategy == "margin":
        return np.argsort(_margin(proba), kind="stable")
    hidden = np.ones((len(proba), 1)) if embeddings is None else _check_embeddings(embeddings, len(proba))
    return _badge(proba, hidden, np.random.default_rng(seed))


def _check_proba(proba: np.ndarray) -> np.ndarray:
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[1] < 2:
        raise ValueError(f"proba: must be rows x classes with at least 2 classes, got shape {proba.shape}")
    if not np.isfinite(proba).all():
        raise ValueError("proba: holds NaN or infinite values")
    return proba


def _check_embeddings(embeddings: np.ndarray, rows: int) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 2 or len(embeddings) != rows:
        raise ValueError(f"embeddings: must be one row per row of proba ({rows}), got shape {embeddings.shape}")
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings: holds NaN or infinite values")
    return embeddings


def _margin(proba: np.ndarray) -> np.ndarray:
    top2 = np.sort(proba, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def _badge(proba: np.ndarray, hidden: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding over the gradient embeddings g_i = a_i x h_i, a_i = p_i - onehot(argmax p_i).

    g has classes x hidden columns (70 x 2048 for the tuned head: 1.1 GB for 1,000 photos), so it is never
    built: ||g_i - g_j||^2 = ||a_i||^2 ||h_i||^2 + ||a_j||^2 ||h_j||^2 - 2 (a_i . a_j)(h_i . h_j), two
    matrix-vector products per pick. A hidden layer wider than PROJECTED_DIMS is first projected by a seeded
    Gaussian matrix (Johnson-Lindenstrauss): that is the projection I x R of g itself, so distances keep their
    meaning within a few percent, and each pick reads a fraction of the rows' bytes.

    As in the paper, the first pick is the longest gradient, each next one is drawn with probability
    proportional to its squared distance to the nearest pick so far. After SEEDED_ROWS picks (more than an
    operator labels before a retrain re-ranks the queue) the rest follow by that distance, largest first."""
    a = proba.astype(np.float32)
    a[np.arange(len(a)), a.argmax(1)] -= 1.0
    h = _project(hidden, rng)
    a_sq, h_sq = (a * a).sum(1), (h * h).sum(1)
    norm_sq = a_sq * h_sq
    order = np.empty(len(a), dtype=np.int64)
    if not len(a):
        return order
    nearest = np.full(len(a), np.inf)
    chosen = np.zeros(len(a), dtype=bool)
    pick = int(np.argmax(norm_sq))
    picks = min(len(a), SEEDED_ROWS)
    for step in range(picks):
        order[step], chosen[pick] = pick, True
        dist = norm_sq + norm_sq[pick] - 2.0 * _dots(a, a[pick]) * _dots(h, h[pick])
        nearest = np.minimum(nearest, np.maximum(dist, 0.0))
        nearest[chosen] = 0.0
        if step + 1 < picks:
            pick = _draw(nearest, norm_sq, chosen, rng)
    rest = np.flatnonzero(~chosen)
    order[picks:] = rest[np.argsort(-nearest[rest], kind="stable")]
    return order


def _dots(rows: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """rows @ vector on one thread: a multi-threaded BLAS matrix-vector product is many times slower on a CPU
    whose cores are busy with other work, and a thousand of them in a row add up."""
    return np.einsum("ij,j->i", rows, vector)


def _project(hidden: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`hidden` as float32, randomly projected to PROJECTED_DIMS columns when wider (norms and dot products
    kept in expectation)."""
    if hidden.shape[1] <= PROJECTED_DIMS:
        return hidden.astype(np.float32)
    r = rng.standard_normal((hidden.shape[1], PROJECTED_DIMS)) / np.sqrt(PROJECTED_DIMS)
    return (hidden @ r).astype(np.float32)


def _draw(nearest: np.ndarray, norm_sq: np.ndarray, chosen: np.ndarray, rng: np.random.Generator) -> int:
    """The next k-means++ pick: a row drawn with probability proportional to `nearest` (its squared distance to
    the closest pick). When every row left coincides with a pick, the longest gradient left."""
    cumulative = np.cumsum(nearest)
    if cumulative[-1] > 0:
        return int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    left = np.flatnonzero(~chosen)
    return int(left[np.argmax(norm_sq[left])])
