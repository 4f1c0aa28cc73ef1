from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone

from featpipe.heads import TorchHead, _hold_out, fit_stack, signed_power
from featpipe.store import open_cache


@pytest.fixture
def blobs(blob_cache: Path):
    c = open_cache(blob_cache)
    return [a for s in ("train", "val", "test") for a in c.subset(s)]


@pytest.mark.parametrize("head", ["fc", "batchnorm"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_heads_learn_a_separable_problem(blobs, head, optimizer):
    Xtr, ytr, Xv, yv, Xte, yte = blobs
    est = TorchHead(head=head, optimizer=optimizer, lr=0.01, epochs=15, batch_size=32, hidden=32, device="cpu")
    est.fit(Xtr, ytr, Xv, yv)
    assert (est.predict(Xte) == yte).mean() >= 0.98
    proba = est.predict_proba(Xte)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-5)
    assert len(est.history_) == 15 and est.classes_.tolist() == [0, 1, 2, 3]


def test_hinge_loss_makes_a_linear_svm(blobs):
    Xtr, ytr, Xv, yv, Xte, yte = blobs
    est = TorchHead(head="fc", loss="hinge", optimizer="adam", lr=0.01, epochs=15, batch_size=32, device="cpu")
    assert (est.fit(Xtr, ytr, Xv, yv).predict(Xte) == yte).mean() >= 0.98


def test_best_epoch_is_the_lowest_validation_loss(blobs):
    Xtr, ytr, Xv, yv, *_ = blobs
    # a learning rate this large makes validation loss jump around, so the last epoch is rarely the best
    est = TorchHead(head="fc", optimizer="sgd", lr=5.0, momentum=0.9, epochs=12, batch_size=16, device="cpu",
                    standardize=False).fit(Xtr, ytr, Xv, yv)
    losses = [h["val_loss"] for h in est.history_]
    assert est.best_epoch_ == int(np.nanargmin(losses)) + 1
    import torch
    from torch.nn import functional as F

    logits = torch.from_numpy(est.logits(Xv))
    assert F.cross_entropy(logits, torch.from_numpy(yv).long()).item() == pytest.approx(min(losses), rel=1e-4)


def test_sklearn_contract(blobs):
    Xtr, ytr, *_ = blobs
    est = TorchHead(head="batchnorm", hidden=16, epochs=2, lr=0.05, class_weight="balanced", label_smoothing=0.1,
                    schedule="cosine", device="cpu")
    params = est.get_params()
    assert params["hidden"] == 16 and params["schedule"] == "cosine"
    twin = clone(est)
    assert twin.get_params() == params and not hasattr(twin, "module_")
    est.fit(Xtr, ytr)  # no validation data: val_fraction of train is held out
    assert hasattr(est, "classes_") and hasattr(est, "history_") and not hasattr(twin, "classes_")
    assert est.embed(Xtr[:5]).shape == (5, 16)
    assert 0.0 <= est.score(Xtr, ytr) <= 1.0


def test_same_seed_same_model_and_global_rng_untouched(blobs):
    import torch

    Xtr, ytr, Xv, yv, Xte, _ = blobs
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    fits = [TorchHead(head="batchnorm", hidden=16, epochs=2, device="cpu", seed=3).fit(Xtr, ytr, Xv, yv) for _ in range(2)]
    assert torch.rand(1) == before, "fitting must not consume or reseed the global RNG"
    np.testing.assert_array_equal(fits[0].logits(Xte), fits[1].logits(Xte))
    other = TorchHead(head="batchnorm", hidden=16, epochs=2, device="cpu", seed=4).fit(Xtr, ytr, Xv, yv)
    assert not np.array_equal(other.logits(Xte), fits[0].logits(Xte))


def test_state_round_trip(blobs):
    Xtr, ytr, Xv, yv, Xte, _ = blobs
    est = TorchHead(head="batchnorm", hidden=16, epochs=3, device="cpu").fit(Xtr, ytr, Xv, yv)
    again = TorchHead.from_state(est.to_state())
    np.testing.assert_allclose(again.logits(Xte), est.logits(Xte), rtol=1e-6)
    assert again.get_params() == est.get_params() and again.best_epoch_ == est.best_epoch_


def test_power_normalisation_is_part_of_the_head(blobs):
    """power=p trains and predicts on sign(x)|x|^p: the same model as power 1 on transformed features, with
    the standardisation statistics of the transformed features."""
    import torch

    x = torch.tensor([-4.0, 0.0, 0.25, 9.0], requires_grad=True)
    y = signed_power(x, 0.5)
    np.testing.assert_allclose(y.detach().numpy(), [-2, 0, 0.5, 3])
    y.sum().backward()  # finite everywhere, 0 included: fine-tuning back-propagates through it
    assert torch.isfinite(x.grad).all() and x.grad[2] == pytest.approx(1.0)
    Xtr, ytr, Xv, yv, Xte, _ = blobs
    root = lambda X: np.sign(X) * np.sqrt(np.abs(X))  # noqa: E731
    kw = dict(head="batchnorm", hidden=16, epochs=3, device="cpu")
    est = TorchHead(power=0.5, **kw).fit(Xtr, ytr, Xv, yv)
    plain = TorchHead(**kw).fit(root(Xtr), ytr, root(Xv), yv)
    np.testing.assert_allclose(est.mean_, root(Xtr).mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(est.logits(Xte), plain.logits(root(Xte)), rtol=1e-4, atol=1e-4)
    assert not np.allclose(est.logits(Xte), plain.logits(Xte), atol=1e-2)  # the transform changes what it reads
    again = TorchHead.from_state(est.to_state())  # a model file keeps it
    np.testing.assert_array_equal(again.logits(Xte), est.logits(Xte))


def test_clipping_keeps_what_the_head_reads_inside_the_training_range(blobs):
    """clip=True: every feature of a scored row is clipped to the training rows' [min, max] (not the
    validation rows'), so a row far outside it scores as its clipped self; without clip it does not."""
    Xtr, ytr, Xv, yv, Xte, _ = blobs
    kw = dict(head="batchnorm", hidden=16, epochs=3, power=0.5, device="cpu")
    est = TorchHead(clip=True, **kw).fit(Xtr, ytr, Xv, yv)
    np.testing.assert_array_equal(est.data_min_, Xtr.min(0))
    np.testing.assert_array_equal(est.data_max_, Xtr.max(0))
    assert (Xv > Xtr.max(0)).any() or (Xv < Xtr.min(0)).any(), "the fixture must reach past the range to test it"
    far = Xte * 50.0  # a photo unlike any the head trained on
    clipped = np.clip(far, Xtr.min(0), Xtr.max(0))
    np.testing.assert_array_equal(est.logits(far), est.logits(clipped))
    assert not np.allclose(est.logits(far), est.logits(Xte), atol=1e-2)  # clipping is not a no-op on this input
    # the same weights without clipping read the far row as it is
    free = TorchHead.from_state(est.to_state())
    free.clip = False
    assert not np.allclose(free.logits(far), est.logits(far), atol=1e-2)
    np.testing.assert_array_equal(free.logits(clipped), est.logits(clipped))  # inside the range both read alike
    again = TorchHead.from_state(est.to_state())  # a model file keeps the range
    assert again.clip
    np.testing.assert_array_equal(again.logits(far), est.logits(far))


def test_a_model_file_from_before_clipping_loads_without_it(blobs):
    Xtr, ytr, Xv, yv, Xte, _ = blobs
    est = TorchHead(head="fc", epochs=2, device="cpu").fit(Xtr, ytr, Xv, yv)
    state = est.to_state()
    del state["data_min"], state["data_max"]
    del state["params"]["clip"]
    again = TorchHead.from_state(state)
    assert not again.clip
    np.testing.assert_array_equal(again.logits(Xte * 50), est.logits(Xte * 50))


def test_an_ensemble_averages_the_logits_of_members_with_successive_seeds(blobs):
    Xtr, ytr, Xv, yv, Xte, yte = blobs
    kw = dict(head="batchnorm", hidden=16, epochs=4, optimizer="adam", lr=0.01, power=0.5, clip=True, device="cpu")
    ens = TorchHead(members=3, seed=5, **kw).fit(Xtr, ytr, Xv, yv)
    alone = [TorchHead(seed=s, **kw).fit(Xtr, ytr, Xv, yv) for s in (5, 6, 7)]
    member_logits = [a.logits(Xte * 50) for a in alone]  # far outside the range: the members' clipping counts
    assert not np.allclose(member_logits[0], member_logits[1], atol=1e-3)  # members differ: not three copies
    np.testing.assert_allclose(ens.logits(Xte * 50), np.mean(member_logits, 0), rtol=1e-5, atol=1e-5)
    assert (ens.predict(Xte) == yte).mean() >= 0.98
    assert ens.best_epoch_ == [a.best_epoch_ for a in alone]
    assert [h["member"] for h in ens.history_] == [0] * 4 + [1] * 4 + [2] * 4
    np.testing.assert_array_equal(ens.embed(Xte), alone[0].embed(Xte))  # the first member's hidden layer
    again = TorchHead.from_state(ens.to_state())  # a model file rebuilds every member
    np.testing.assert_array_equal(again.logits(Xte * 50), ens.logits(Xte * 50))
    assert again.best_epoch_ == ens.best_epoch_


def test_an_ensemble_without_validation_data_holds_out_the_same_rows_for_every_member(blobs):
    Xtr, ytr, _, _, Xte, _ = blobs
    kw = dict(head="fc", epochs=2, device="cpu")
    ens = TorchHead(members=2, **kw).fit(Xtr, ytr)
    X, X_val, y, y_val = _hold_out(Xtr, ytr, 0.1, 0)  # the rows the first member, seed 0, holds out alone
    given = TorchHead(members=2, **kw).fit(X, y, X_val, y_val)
    np.testing.assert_array_equal(ens.mean_, given.mean_)
    np.testing.assert_allclose(ens.logits(Xte), given.logits(Xte), rtol=1e-6, atol=1e-6)


def test_a_stack_refuses_an_ensemble(blobs):
    Xtr, ytr, *_ = blobs
    with pytest.raises(ValueError, match="members > 1"):
        fit_stack([TorchHead(members=2, device="cpu")], Xtr, ytr)


@pytest.mark.parametrize("param, value, match", [("head", "mlp", "unknown head"), ("optimizer", "lamb", "unknown optimizer"),
                                                 ("class_weight", "auto", "class_weight"), ("power", 0, "power"),
                                                 ("members", 0, "members"), ("members", 1.5, "members")])
def test_bad_params_are_clear(blobs, param, value, match):
    Xtr, ytr, *_ = blobs
    with pytest.raises(ValueError, match=match):
        TorchHead(**{param: value}).fit(Xtr, ytr)


def test_wrong_feature_size_is_refused(blobs):
    Xtr, ytr, *_ = blobs
    est = TorchHead(head="fc", epochs=1, device="cpu").fit(Xtr, ytr)
    with pytest.raises(ValueError, match="X has 10 features, but TorchHead is expecting 32"):
        est.predict(np.zeros((2, 10), np.float32))


OPTIMIZER_VARIANTS = [dict(optimizer="sgd", lr=0.05, momentum=0.5), dict(optimizer="adam", lr=0.01, schedule="cosine"),
                      dict(optimizer="sgd", lr=0.01, weight_decay=1e-3)]


@pytest.mark.parametrize("kinds", [
    [dict(head="fc")] * 3,
    [dict(head="batchnorm")] * 3,
    # heads of several architectures in one stack, interleaved: their first layers are one matrix
    [dict(head="fc"), dict(head="batchnorm"), dict(head="batchnorm", hidden=24, dropout=0.1), dict(head="fc")],
], ids=["fc", "batchnorm", "mixed"])
def test_a_stack_ends_where_separate_fits_end(blobs, kinds):
    Xtr, ytr, Xv, yv, Xte, _ = blobs
    shared = dict(hidden=16, dropout=0.3, epochs=4, batch_size=32, class_weight="balanced", device="cpu", seed=5)
    variants = [shared | kind | OPTIMIZER_VARIANTS[i % 3] for i, kind in enumerate(kinds)]
    stacked = fit_stack([TorchHead(**v) for v in variants], Xtr, ytr, Xv, yv)
    for v, est in zip(variants, stacked):
        alone = TorchHead(**v).fit(Xtr, ytr, Xv, yv)
        assert est.get_params() == alone.get_params()  # returned in the order given
        assert est.best_epoch_ == alone.best_epoch_ and len(est.history_) == 4
        for a, b in zip(est.history_, alone.history_):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        for name, t in alone.module_.state_dict().items():
            np.testing.assert_allclose(est.module_.state_dict()[name], t, rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(est.logits(Xte), alone.logits(Xte), rtol=1e-4, atol=1e-5)
    # the conditions really differ: same start, different optimizers, different ends
    assert not np.allclose(stacked[0].logits(Xte), stacked[1].logits(Xte))


def test_a_stack_refuses_heads_that_differ_beyond_layers_and_optimizer(blobs):
    Xtr, ytr, *_ = blobs
    with pytest.raises(ValueError, match="these differ: batch_size, epochs$"):
        fit_stack([TorchHead(hidden=16, epochs=2), TorchHead(head="fc", hidden=32, epochs=3, batch_size=64)], Xtr, ytr)


@pytest.mark.parametrize("loss, smoothing", [("cross_entropy", 0.0), ("cross_entropy", 0.1), ("hinge", 0.0)])
@pytest.mark.parametrize("weighted", [False, True])
def test_per_head_losses_are_torchs_means(loss, smoothing, weighted):
    import torch
    from torch.nn import functional as F

    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(40, 3, 7, generator=g), torch.randint(0, 7, (40,), generator=g)
    weight = torch.rand(7, generator=g) + 0.1 if weighted else None
    per_head = TorchHead(loss=loss, label_smoothing=smoothing)._loss(logits, y, weight)
    for k in range(3):
        expected = (F.multi_margin_loss(logits[:, k], y, weight=weight) if loss == "hinge" else
                    F.cross_entropy(logits[:, k], y, weight=weight, label_smoothing=smoothing))
        assert per_head[k].item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_bias_before_batchnorm_gets_its_exact_zero_gradient(blobs):
    """Adam would otherwise turn that bias's rounding noise into full-size steps."""
    import torch

    from featpipe.heads import build_head

    Xtr, ytr, Xv, yv, *_ = blobs
    est = TorchHead(head="batchnorm", hidden=16, optimizer="adam", lr=0.1, epochs=2, device="cpu", seed=2)
    est.fit(Xtr, ytr, Xv, yv)
    start = build_head("batchnorm", Xtr.shape[1], len(est.classes_), 16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(est.module_.state_dict()["0.0.bias"], start.state_dict()["0.0.bias"])
    assert not torch.equal(est.module_.state_dict()["0.0.weight"], start.state_dict()["0.0.weight"])
