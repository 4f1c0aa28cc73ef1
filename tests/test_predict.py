import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featpipe.calibrate import choose_threshold, coverage_and_precision, expected_calibration_error, fit_temperature, softmax
from featpipe.cli import main
from featpipe.extract import extract
from featpipe.harness import fit_head
from featpipe.heads import TorchHead
from featpipe.models import load_model
from featpipe.workflows.predictor import predict_images
from featpipe.store import open_cache


@pytest.fixture
def trained(dataset_dir: Path, tmp_path: Path):
    summary = extract(dataset_dir, backbone="mobilenet_v2", weights="none", cache_dir=tmp_path / "cache",
                      min_per_class=5, image_size=32, batch_size=8, workers=0, device="cpu", dtype="float32", runtime="torch",
                      progress=False)
    cache = open_cache(summary.cache)
    fit_head(cache, tmp_path / "m.pt", TorchHead(head="fc", epochs=20, batch_size=8, device="cpu"))
    return cache, tmp_path / "m.pt", dataset_dir


def test_predict_on_images_matches_the_head_on_cached_features(trained):
    cache, model_path, data = trained
    model = load_model(model_path)
    paths = [data / "images" / f"{i}.jpg" for i in cache.ids]
    preds = predict_images(model, paths, top_k=2, device="cpu")
    expected = model.proba(cache.features.astype(np.float32))
    got_labels = [p.label for p in preds]
    assert got_labels == [model.classes[i] for i in expected.argmax(1)]
    np.testing.assert_allclose([p.confidence for p in preds], expected.max(1), rtol=1e-4, atol=1e-5)
    assert all(len(p.top_k) == 2 and p.decision in ("auto", "review") for p in preds)


def test_predict_runs_a_bag_from_its_model_file(trained, tmp_path: Path):
    cache, _, data = trained
    fit_head(cache, tmp_path / "bag.pt", TorchHead(head="fc", epochs=20, batch_size=8, device="cpu"), cross_fit_folds=2)
    model = load_model(tmp_path / "bag.pt")
    assert len(model.head.estimators_) == 2
    preds = predict_images(model, [data / "images" / f"{i}.jpg" for i in cache.ids], device="cpu")
    expected = model.proba(cache.features.astype(np.float32))
    assert [p.label for p in preds] == [model.classes[i] for i in expected.argmax(1)]
    np.testing.assert_allclose([p.confidence for p in preds], expected.max(1), rtol=1e-4, atol=1e-5)


def test_unreadable_files_do_not_stop_the_batch(trained, tmp_path: Path):
    _, model_path, data = trained
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00garbage")
    r = CliRunner().invoke(main, ["predict", "--model", str(model_path), "--format", "json", "--device", "cpu",
                                  str(data / "images" / "1000.jpg"), str(bad), str(tmp_path / "missing.jpg")])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["decision"] for row in rows][1:] == ["error", "error"]
    assert rows[1]["confidence"] is None and "NaN" not in r.stdout
    assert rows[0]["label"] and {"path", "label", "confidence", "decision", "top_k"} <= set(rows[0])
    assert "1 review" in r.stderr or "1 auto" in r.stderr


def test_predict_csv_and_folder_input(trained, tmp_path: Path):
    _, model_path, data = trained
    out = tmp_path / "tags.csv"
    r = CliRunner().invoke(main, ["predict", "--model", str(model_path), "--format", "csv", "--out", str(out),
                                  "--device", "cpu", str(data / "images")])
    assert r.exit_code == 0, r.output
    lines = out.read_text().splitlines()
    assert lines[0].startswith("path,label,confidence,decision,top_k")
    assert len(lines) == 1 + len(list((data / "images").iterdir()))


def test_missing_model_is_clear(trained, tmp_path: Path):
    _, model_path, data = trained
    r = CliRunner().invoke(main, ["predict", "--model", str(tmp_path / "nope.pt"), str(data / "images")])
    assert r.exit_code == 2 and "no such model file" in r.output


def test_threshold_holds_its_precision_on_held_out_data():
    """Calibrated scores (P(correct | c) = c): a threshold chosen on one validation sample must give an
    accepted set whose true precision, measured on a very large held-out sample, reaches the target in
    nearly every repetition; the plain point estimate misses it about half the time."""
    rng = np.random.default_rng(0)

    def draw(n):
        conf = rng.beta(60, 1, n)
        return conf, rng.random(n) < conf

    big_conf, big_correct = draw(2_000_000)
    bounded, naive = [], []
    for _ in range(20):
        conf, correct = draw(5000)
        t = choose_threshold(conf, correct, target=0.99, alpha=0.05)
        assert np.isfinite(t) and 0.9 < t < 1
        bounded.append(coverage_and_precision(big_conf, big_correct, t)[1])
        hits = correct[np.argsort(-conf)]
        point = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        naive_t = np.sort(conf)[::-1][np.flatnonzero(point >= 0.99)[-1]]
        naive.append(coverage_and_precision(big_conf, big_correct, naive_t)[1])
    assert np.mean(np.array(bounded) >= 0.99) >= 0.9
    assert np.mean(np.array(naive) >= 0.99) < np.mean(np.array(bounded) >= 0.99)
    assert choose_threshold(np.full(10, 0.5), np.zeros(10, bool)) == float("inf")


def test_temperature_scaling_reduces_calibration_error():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 5000)
    logits = rng.normal(0, 1, (5000, 5))
    logits[np.arange(5000), y] += 1.5
    sharp = logits * 4  # overconfident
    t = fit_temperature(sharp, y)
    assert 2.5 < t < 6
    assert expected_calibration_error(softmax(sharp, t), y) < expected_calibration_error(softmax(sharp), y) / 2


def test_temperature_stays_bounded_when_every_mistake_is_confident():
    # two confident mistakes among eight: validation NLL keeps falling as T grows, so an unbounded fit
    # ran away to ~1e9 and made every confidence 1/classes
    logits = np.tile([[30.0, 0.0, 0.0]], (8, 1))
    y = np.array([0, 0, 0, 0, 0, 0, 1, 2])
    t = fit_temperature(logits, y)
    assert 1.0 < t <= 20.0
    assert softmax(logits, t).max() > 0.7  # still ranks: confidences did not collapse to 1/3
