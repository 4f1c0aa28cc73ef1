import numpy as np
import pytest
from sklearn.base import clone

from featpipe.bagging import UNSEEN_LOGIT, FoldBag, head_from_state
from featpipe.harness import Splits
from featpipe.heads import TorchHead
from featpipe.store import open_cache


class _Spy(TorchHead):
    """A head whose logits say, in their last column, whether the row was among those it was given to fit
    (to train on, or to pick its best epoch)."""

    def fit(self, X, y, X_val=None, y_val=None):
        super().fit(X, y, X_val, y_val)
        given = [X] if X_val is None else [X, X_val]
        self.seen_ = {row.tobytes() for rows in given for row in np.asarray(rows, dtype=np.float32)}
        return self

    def logits(self, X):
        z = super().logits(X)
        z[:, -1] = [row.tobytes() in self.seen_ for row in np.asarray(X, dtype=np.float32)]
        return z


def _train_val(blob_cache):
    s = Splits.from_cache(open_cache(blob_cache))
    return np.concatenate([s.X_train, s.X_val]), np.concatenate([s.y_train, s.y_val]), s


def test_out_of_fold_logits_come_from_copies_that_never_saw_the_row(blob_cache):
    X, y, _ = _train_val(blob_cache)
    spy = _Spy(head="fc", epochs=3, device="cpu")
    assert clone(spy).fit(X, y).logits(X)[:, -1].all()  # the spy sees what it was fitted on
    bag = FoldBag(spy, 4).fit(X, y)
    assert (bag.oof_logits_[:, -1] == 0).all() and (bag.oof_logits_[:, :-1] != UNSEEN_LOGIT).all()  # filled, blind
    assert len(bag.estimators_) == len(bag.fit_seconds_) == 4
    for est, rows in zip(bag.estimators_, bag.train_rows_):  # each copy saw its own rows, about 3/4 of them
        assert est.logits(X[rows])[:, -1].all() and abs(len(rows) - 0.75 * len(y)) <= 4
    held = np.concatenate([np.setdiff1d(np.arange(len(y)), t) for t in bag.train_rows_])
    assert sorted(held) == list(range(len(y)))  # every row held out exactly once
    assert not hasattr(spy, "module_")  # the template stays unfitted: the copies are clones


def test_bag_is_the_mean_of_its_copies_and_learns(blob_cache):
    X, y, s = _train_val(blob_cache)
    bag = FoldBag(TorchHead(head="fc", epochs=5, device="cpu"), 4).fit(X, y)
    assert (bag.oof_logits_.argmax(1) == y).mean() > 0.9  # separable blobs: the copies learn; chance is 0.25
    assert (bag.predict(s.X_test) == s.y_test).mean() > 0.9
    mean = np.mean([est.logits(s.X_test) for est in bag.estimators_], axis=0)
    np.testing.assert_allclose(bag.logits(s.X_test), mean, rtol=1e-5, atol=1e-5)
    assert not np.allclose(bag.estimators_[0].logits(s.X_test), mean, atol=1e-3)  # the copies differ
    np.testing.assert_allclose(bag.predict_proba(s.X_test).sum(1), 1, rtol=1e-6)
    again = FoldBag(TorchHead(head="fc", epochs=5, device="cpu"), 4).fit(X, y)  # the head's seed draws folds, copies
    assert np.array_equal(bag.oof_logits_, again.oof_logits_)
    assert all(map(np.array_equal, bag.train_rows_, again.train_rows_))
    other = FoldBag(TorchHead(head="fc", epochs=5, seed=1, device="cpu"), 4).fit(X, y)
    assert not all(map(np.array_equal, bag.train_rows_, other.train_rows_))


def test_a_class_one_copy_never_saw_gets_the_others_logits():
    y = np.r_[np.repeat([0, 1], 20), 2]
    noise = np.random.default_rng(0).normal(0, 0.3, (41, 2))
    X = (np.r_[np.zeros((20, 2)), np.ones((20, 2)) * 3, [[9.0, 9.0]]] + noise).astype(np.float32)
    bag = FoldBag(TorchHead(head="fc", epochs=5, device="cpu"), 2).fit(X, y)
    assert bag.oof_logits_.shape == (41, 3) and bag.oof_logits_[40, 2] == UNSEEN_LOGIT
    assert (bag.oof_logits_[:40, :2] != UNSEEN_LOGIT).all()
    blind, seen = sorted(bag.estimators_, key=lambda e: len(e.classes_))
    assert list(blind.classes_) == [0, 1] and list(seen.classes_) == [0, 1, 2]
    z = bag.logits(X)  # class 2 from the copy that knows it; the others averaged over both
    np.testing.assert_allclose(z[:, 2], seen.logits(X)[:, 2], rtol=1e-5)
    np.testing.assert_allclose(z[:, :2], (blind.logits(X) + seen.logits(X)[:, :2]) / 2, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="folds must be a whole number from 2 to the 41 rows"):
        FoldBag(TorchHead(device="cpu"), 42).fit(X, y)


def test_a_saved_bag_predicts_alike(blob_cache):
    X, y, s = _train_val(blob_cache)
    bag = FoldBag(TorchHead(head="batchnorm", hidden=8, epochs=3, members=2, device="cpu"), 3).fit(X, y)
    again = head_from_state(bag.to_state())
    assert isinstance(again, FoldBag) and again.folds == 3 and again.head == "batchnorm"
    np.testing.assert_array_equal(again.logits(s.X_test), bag.logits(s.X_test))
    np.testing.assert_array_equal(again.embed(s.X_test), bag.estimators_[0].embed(s.X_test))
    assert again.embed(s.X_test).shape == (len(s.X_test), 8)
    assert len(again.module_) == 3 and again.best_epoch_ == bag.best_epoch_
    assert {row["member"] for row in again.history_} == set(range(6))  # 3 copies of 2 members, one curve each
    single = TorchHead(head="fc", epochs=2, device="cpu").fit(X, y)
    assert isinstance(head_from_state(single.to_state()), TorchHead)


def test_extra_rows_train_every_copy_and_calibrate_none(blob_cache):
    X, y, s = _train_val(blob_cache)
    # rows far from every blob, all of class 0: each copy must train on them, none may be held out
    X_extra = (X[y == 1][:5] + 40).astype(np.float32)
    y_extra = np.zeros(5, dtype=y.dtype)
    spy = _Spy(head="fc", epochs=5, device="cpu")
    bag = FoldBag(spy, 4).fit(X, y, X_extra, y_extra)
    assert bag.oof_logits_.shape[0] == len(y) and (bag.oof_logits_[:, -1] == 0).all()  # calibration: (X, y) only
    for est in bag.estimators_:
        assert est.logits(X_extra)[:, -1].all()  # every copy saw them
    plain = FoldBag(TorchHead(head="fc", epochs=5, device="cpu"), 4)
    np.testing.assert_array_equal(plain.fit(X, y).train_rows_[0], bag.train_rows_[0])  # the folds are the same
    with pytest.raises(ValueError, match="both X_extra and y_extra"):
        FoldBag(TorchHead(head="fc", epochs=1, device="cpu"), 2).fit(X, y, X_extra)
    with pytest.raises(ValueError, match="only classes y has"):
        FoldBag(TorchHead(head="fc", epochs=1, device="cpu"), 2).fit(X, y, X_extra, y_extra + 99)
