import csv
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.base import clone

from conftest import make_cache
from featpipe.bagging import FoldBag
from featpipe.cli import main
from featpipe.calibrate import choose_threshold, fit_temperature, softmax
from featpipe.errors import UserError
from featpipe.harness import Splits, compare, fit_head, sweep
from featpipe.heads import TorchHead
from featpipe.models import ModelError, load_model
from featpipe.store import CacheError, open_cache


def test_fit_head_writes_a_model_that_round_trips(blob_cache: Path, tmp_path: Path):
    cache = open_cache(blob_cache)
    model = fit_head(cache, tmp_path / "m.pt", TorchHead(head="batchnorm", hidden=16, epochs=5, batch_size=32, device="cpu"))
    assert model.metrics["accuracy"] >= 0.95
    assert (tmp_path / "m.curves.csv").is_file() and (tmp_path / "m.curves.png").stat().st_size > 0
    again = load_model(tmp_path / "m.pt")
    s = Splits.from_cache(cache)
    np.testing.assert_allclose(again.proba(s.X_test), model.proba(s.X_test), rtol=1e-6)
    assert again.classes == cache.classes and again.provenance["backbone"] == "mobilenet_v2"
    assert again.threshold == model.threshold and again.temperature == model.temperature
    with open(tmp_path / "m.curves.csv") as fh:
        assert {"epoch", "train_loss", "val_loss", "train_acc", "val_acc"} <= set(next(csv.reader(fh)))


def test_fit_head_cross_fit_deploys_the_bag_calibrated_on_out_of_fold_logits(tmp_path: Path):
    # overlapping blobs, so that there are mistakes to calibrate on
    cache = open_cache(make_cache(tmp_path / "c" / "mobilenet_v2-articleType-x.h5", separation=0.6))
    head = TorchHead(head="batchnorm", hidden=16, epochs=5, batch_size=32, device="cpu")
    model = fit_head(cache, tmp_path / "m.pt", clone(head), cross_fit_folds=3)
    s = Splits.from_cache(cache)
    X, y = np.concatenate([s.X_train, s.X_val]), np.concatenate([s.y_train, s.y_val])
    bag = FoldBag(clone(head), 3).fit(X, y)
    m = model.metrics
    assert m["n_train"] == m["n_calibration"] == len(y) and m["calibrated_on"] == "3-fold cross-fit over train + val"
    assert 0.4 < m["accuracy"] < 0.99  # chance is 0.25
    # the model is the bag of the three folds' heads, calibrated on their out-of-fold logits
    assert isinstance(model.head, FoldBag) and len(model.head.estimators_) == 3
    np.testing.assert_allclose(model.head.logits(s.X_test), bag.logits(s.X_test), rtol=1e-5)
    assert model.temperature == pytest.approx(fit_temperature(bag.oof_logits_, y))
    p = softmax(bag.oof_logits_, model.temperature)
    assert model.threshold == choose_threshold(p.max(1), p.argmax(1) == y, 0.99, 0.05)
    assert m["accuracy"] == pytest.approx((bag.predict(s.X_test) == s.y_test).mean())
    again = load_model(tmp_path / "m.pt")  # the model file rebuilds every copy
    np.testing.assert_array_equal(again.proba(s.X_test), model.proba(s.X_test))
    on_val = fit_head(cache, tmp_path / "v.pt", clone(head))
    assert on_val.metrics["n_calibration"] == len(s.y_val) and on_val.metrics["calibrated_on"] == "validation split"
    assert isinstance(on_val.head, TorchHead)
    with pytest.raises(UserError, match=f"--cross-fit 1: needs 2 to {len(y)} folds"):
        fit_head(cache, tmp_path / "x.pt", clone(head), cross_fit_folds=1)


def test_sweep_gives_every_condition_as_if_fitted_alone(blob_cache: Path):
    cache = open_cache(blob_cache)
    rows = sweep([cache], lrs=(0.1, 0.01), optimizers=("adam", "sgd"), heads=("fc", "batchnorm"), epochs=2,
                 hidden=16, device="cpu", stack_size=3)
    assert len(rows) == 8
    assert {(r["head"], r["optimizer"], r["lr"]) for r in rows} == {
        (h, o, lr) for h in ("fc", "batchnorm") for o in ("adam", "sgd") for lr in (0.1, 0.01)}
    assert all(r["seconds"] > 0 and r["best_epoch"] in (1, 2) for r in rows)
    # stacks of 3 over the grid in order: fc only, fc with batchnorm, batchnorm only
    assert [r["stack_size"] for r in rows] == [3] * 6 + [2] * 2 and len({r["stack"] for r in rows}) == 3
    s = Splits.from_cache(cache)
    for r in rows:  # stacked conditions end where separate fits end
        alone = TorchHead(head=r["head"], optimizer=r["optimizer"], lr=r["lr"], epochs=2, hidden=16, device="cpu")
        alone.fit(s.X_train, s.y_train, s.X_val, s.y_val)
        assert alone.best_epoch_ == r["best_epoch"]
        assert alone.history_[alone.best_epoch_ - 1]["val_loss"] == pytest.approx(r["val_loss"], rel=1e-4)


def test_compare_table_is_complete(tmp_path: Path):
    # enough rows for the default line-up's large-batch settings to take a few hundred steps
    cache = make_cache(tmp_path / "c" / "mobilenet_v2-articleType-x.h5", n_per_class=800)
    rows = compare(open_cache(cache), tmp_path / "cmp", device="cpu", log=lambda *_: None)
    names = [r["model"] for r in rows]
    assert names[:6] == ["fc", "batchnorm", "logreg", "linear_svm", "knn", "lightgbm"]
    assert names[6].startswith("ensemble(")
    for r in rows:
        assert {"accuracy", "weighted_f1", "macro_f1", "fit_seconds", "predict_ms_per_1000"} <= set(r)
        assert r["accuracy"] >= 0.6, r  # chance is 0.25; the line-up's settings are sized for 30k+ rows
    assert max(r["accuracy"] for r in rows) >= 0.95
    for f in ("compare.md", "compare.csv", "compare.png", "report/per_class.csv", "report/confusion.png",
              "report/confused_pairs.csv"):
        assert (tmp_path / "cmp" / f).is_file(), f


def test_cli_fit_head_and_report(blob_cache: Path, tmp_path: Path):
    r = CliRunner().invoke(main, ["fit-head", "--cache-dir", str(blob_cache.parent), "--head", "fc", "--epochs", "3",
                                  "--out", str(tmp_path / "fc.pt"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "test accuracy" in r.output and "auto-tag threshold" in r.output
    r = CliRunner().invoke(main, ["fit-head", "--cache-dir", str(blob_cache.parent), "--head", "fc", "--preset", "tuned",
                                  "--epochs", "2", "--out", str(tmp_path / "tuned.pt"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    params = load_model(tmp_path / "tuned.pt").head.get_params()
    assert params["epochs"] == 2 and params["optimizer"] == "adam" and params["schedule"] == "cosine"
    assert params["clip"] and not load_model(tmp_path / "fc.pt").head.clip  # the tuned preset clips, the study's not
    r = CliRunner().invoke(main, ["fit-head", "--cache-dir", str(blob_cache.parent), "--head", "fc", "--preset", "tuned",
                                  "--no-clip", "--epochs", "2", "--out", str(tmp_path / "free.pt"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert not load_model(tmp_path / "free.pt").head.clip
    # the tuned batchnorm head is a three-member ensemble unless told otherwise
    for extra, members in (([], 3), (["--members", "2"], 2)):
        r = CliRunner().invoke(main, ["fit-head", "--cache-dir", str(blob_cache.parent), "--preset", "tuned",
                                      "--epochs", "2", "--hidden", "16", "--out", str(tmp_path / "ens.pt"),
                                      "--device", "cpu", *extra])
        assert r.exit_code == 0, r.output
        assert load_model(tmp_path / "ens.pt").head.members == members
        assert re.search(rf"best epoch \d(, \d){{{members - 1}}}/2,", r.output), r.output  # one per member
    r = CliRunner().invoke(main, ["fit-head", "--cache-dir", str(blob_cache.parent), "--head", "fc", "--epochs", "2",
                                  "--cross-fit", "3", "--out", str(tmp_path / "cf.pt"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert re.search(r"calibration on \d+ rows \(3-fold cross-fit over train \+ val\)", r.output), r.output
    assert len(load_model(tmp_path / "cf.pt").head.estimators_) == 3
    # with --cross-fit the tuned preset's copies are one member each: the bag is the ensemble
    for extra, members in (([], 1), (["--members", "2"], 2)):
        r = CliRunner().invoke(main, ["fit-head", "--cache-dir", str(blob_cache.parent), "--preset", "tuned",
                                      "--epochs", "2", "--hidden", "16", "--cross-fit", "2", "--out",
                                      str(tmp_path / "bag.pt"), "--device", "cpu", *extra])
        assert r.exit_code == 0, r.output
        assert {est.members for est in load_model(tmp_path / "bag.pt").head.estimators_} == {members}
    r = CliRunner().invoke(main, ["report", "--model", str(tmp_path / "fc.pt")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "fc.report" / "confusion.png").is_file()


def test_bad_inputs_are_clear_errors(blob_cache: Path, tmp_path: Path):
    runner = CliRunner()
    r = runner.invoke(main, ["fit-head", "--cache-dir", str(blob_cache.parent), "--head", "mlp"])
    assert r.exit_code == 2 and "'mlp' is not one of" in r.output
    r = runner.invoke(main, ["fit-head", "--cache-dir", str(tmp_path / "empty"), "--head", "fc"])
    assert r.exit_code == 2 and "no complete mobilenet_v2 cache" in r.output
    incomplete = make_cache(tmp_path / "inc" / "mobilenet_v2-articleType-x.h5", complete=False)
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(incomplete)
    r = runner.invoke(main, ["fit-head", "--cache", str(incomplete), "--head", "fc"])
    assert r.exit_code == 2 and "incomplete" in r.output

    r = runner.invoke(main, ["fit-head", "--cache-dir", str(blob_cache.parent), "--head", "fc", "--cross-fit", "1"])
    assert r.exit_code == 2 and "--cross-fit 1: needs 2 to" in r.output
    r = runner.invoke(main, ["fit-head", "--cache-dir", str(blob_cache.parent), "--finetune", "--cross-fit", "2"])
    assert r.exit_code == 2 and "leave --cross-fit out" in r.output

    fit_head(open_cache(blob_cache), tmp_path / "m.pt", TorchHead(head="fc", epochs=1, device="cpu"))
    vgg = make_cache(tmp_path / "vgg" / "vgg16-articleType-x.h5", backbone="vgg16")
    r = runner.invoke(main, ["report", "--model", str(tmp_path / "m.pt"), "--cache", str(vgg)])
    assert r.exit_code == 2 and "trained on backbone='mobilenet_v2'" in r.output
    with pytest.raises(ModelError, match="no such model file"):
        load_model(tmp_path / "missing.pt")
