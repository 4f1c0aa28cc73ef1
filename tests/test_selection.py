"""The review queue's order (`workflows.selection.order_queue`)."""
import numpy as np
import pytest

from featpipe.workflows import selection
from featpipe.workflows.selection import order_queue


def _proba(rows: list[list[float]]) -> np.ndarray:
    p = np.asarray(rows, dtype=float)
    return p / p.sum(1, keepdims=True)


def test_confidence_puts_the_least_confident_first():
    p = _proba([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.6, 0.3, 0.1]])
    assert order_queue(p, strategy="confidence").tolist() == [1, 2, 0]


def test_margin_puts_the_near_tie_first():
    # row 1 is more confident than row 0 (0.45 > 0.40) but torn between two classes; row 0 is spread over three
    p = _proba([[0.40, 0.30, 0.30], [0.45, 0.44, 0.11], [0.9, 0.05, 0.05]])
    assert order_queue(p, strategy="margin").tolist() == [1, 0, 2]
    assert order_queue(p, strategy="confidence").tolist() == [0, 1, 2]


def _clusters(rng: np.random.Generator, per: int = 20, k: int = 4, classes: int = 5) -> tuple[np.ndarray, ...]:
    """k tight clusters in embedding space, each of uncertain photos, rows shuffled; returns proba, embeddings
    and each row's cluster."""
    centres = rng.normal(0, 10, (k, 16))
    cluster = rng.permutation(np.repeat(np.arange(k), per))
    hidden = centres[cluster] + rng.normal(0, 0.1, (len(cluster), 16))
    logits = rng.normal(0, 0.01, (len(cluster), classes))
    logits[np.arange(len(cluster)), cluster % classes] += 1.0
    return _proba(np.exp(logits)), hidden, cluster


def test_badge_picks_every_cluster_before_repeating_one():
    rng = np.random.default_rng(0)
    p, h, cluster = _clusters(rng)
    for seed in range(5):
        first = order_queue(p, h, "badge", seed=seed)[:4]
        assert sorted(cluster[first].tolist()) == [0, 1, 2, 3]


def test_badge_starts_from_the_longest_gradient():
    rng = np.random.default_rng(1)
    p, h, _ = _clusters(rng)
    a = p - np.eye(p.shape[1])[p.argmax(1)]
    norms = (a ** 2).sum(1) * (h ** 2).sum(1)
    assert order_queue(p, h, "badge")[0] == np.argmax(norms)


def _kmeanspp_reference(g: np.ndarray, rng: np.random.Generator) -> list[int]:
    """k-means++ seeding on explicit gradient embeddings, drawn as `selection._draw` draws."""
    order = [int(np.argmax((g ** 2).sum(1)))]
    nearest = ((g - g[order[0]]) ** 2).sum(1)
    while len(order) < len(g):
        cumulative = np.cumsum(nearest)
        order.append(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")))
        nearest = np.minimum(nearest, ((g - g[order[-1]]) ** 2).sum(1))
        nearest[order] = 0.0
    return order


def test_badge_equals_kmeanspp_on_the_explicit_gradient_embeddings():
    rng = np.random.default_rng(2)
    p = _proba(np.exp(rng.normal(0, 1, (30, 6))))
    h = rng.normal(0, 1, (30, 8))
    g = np.einsum("ic,ih->ich", p - np.eye(6)[p.argmax(1)], h).reshape(30, -1)
    assert order_queue(p, h, "badge", seed=7).tolist() == _kmeanspp_reference(g, np.random.default_rng(7))


def test_badge_is_deterministic_given_the_seed():
    rng = np.random.default_rng(3)
    p = _proba(np.exp(rng.normal(0, 1, (200, 10))))
    h = rng.normal(0, 1, (200, 300))  # wider than PROJECTED_DIMS: the projection is seeded too
    first = order_queue(p, h, "badge", seed=4)
    assert first.tolist() == order_queue(p, h, "badge", seed=4).tolist()
    assert first.tolist() != order_queue(p, h, "badge", seed=5).tolist()


@pytest.mark.parametrize("strategy", ["confidence", "margin", "badge"])
def test_every_strategy_orders_every_row_once(strategy, monkeypatch):
    monkeypatch.setattr(selection, "SEEDED_ROWS", 50)  # the rows after the seeded ones, by their distance
    rng = np.random.default_rng(5)
    p = _proba(np.exp(rng.normal(0, 2, (120, 7))))
    p[:10] = np.eye(7)[0]  # certain rows: zero gradients
    h = rng.normal(0, 1, (120, 12))
    assert sorted(order_queue(p, h, strategy).tolist()) == list(range(120))


def test_badge_without_embeddings_uses_the_bias_gradient():
    # rows 0 and 1 are the same near-tie: once one is picked, the other is worth nothing more
    p = _proba([[0.5, 0.5, 1e-9], [0.5, 0.5, 1e-9], [1e-9, 0.5, 0.5], [0.98, 0.01, 0.01]])
    for seed in range(10):
        order = order_queue(p, seed=seed).tolist()
        assert sorted(order) == [0, 1, 2, 3] and set(order[:2]) != {0, 1}


def test_an_empty_queue_is_an_empty_order():
    assert order_queue(np.zeros((0, 3)), np.zeros((0, 4))).tolist() == []


def test_errors_name_the_parameter():
    p = _proba([[0.6, 0.4], [0.3, 0.7]])
    with pytest.raises(ValueError, match="strategy 'random'"):
        order_queue(p, strategy="random")
    with pytest.raises(ValueError, match="embeddings"):
        order_queue(p, np.ones((3, 4)))
    with pytest.raises(ValueError, match="proba"):
        order_queue(np.ones(4))
