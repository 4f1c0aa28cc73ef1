"""A head on two backbones' caches joined: features side by side, and predict runs both backbones."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featpipe.cli import main
from featpipe.extract import extract
from featpipe.harness import fit_head
from featpipe.heads import TorchHead
from featpipe.models import ModelError, load_model
from featpipe.workflows.predictor import predict_images
from featpipe.store import CacheError, join_caches, open_cache

COMMON = dict(weights="none", min_per_class=5, image_size=32, batch_size=8, workers=0, device="cpu",
              dtype="float32", progress=False, runtime="torch")


@pytest.fixture
def two_caches(dataset_dir: Path, tmp_path: Path):
    a = extract(dataset_dir, backbone="mobilenet_v2", cache_dir=tmp_path / "cache", **COMMON).cache
    b = extract(dataset_dir, backbone="resnet50", cache_dir=tmp_path / "cache", **COMMON).cache
    return open_cache(a), open_cache(b), dataset_dir


def test_joined_features_are_the_parts_side_by_side_and_predict_rebuilds_both(two_caches, tmp_path: Path):
    a, b, data = two_caches
    joined = join_caches([a, b])
    assert joined.backbone == "mobilenet_v2+resnet50" and joined.features.shape == (len(a.ids), 1280 + 2048)
    np.testing.assert_array_equal(joined.features[:, :1280], a.features)
    np.testing.assert_array_equal(joined.features[:, 1280:], b.features)
    fit_head(joined, tmp_path / "m.pt", TorchHead(head="fc", epochs=20, batch_size=8, device="cpu"))
    model = load_model(tmp_path / "m.pt")
    assert [p["backbone"] for p in model.provenance["parts"]] == ["mobilenet_v2", "resnet50"]
    test = joined.split == 2
    expected = model.proba(joined.features[test])
    assert (expected.argmax(1) == joined.labels[test]).mean() > 1.5 / len(joined.classes), "above chance"
    preds = predict_images(model, [data / "images" / f"{i}.jpg" for i in joined.ids[test]], device="cpu")
    assert [p.label for p in preds] == [model.classes[i] for i in expected.argmax(1)]
    np.testing.assert_allclose([p.confidence for p in preds], expected.max(1), rtol=1e-4, atol=1e-5)
    model.check_features(joined.attrs)
    with pytest.raises(Exception, match="backbone"):
        model.check_features(a.attrs)  # one part alone is not what the model was trained on


def test_caches_of_other_images_or_splits_are_not_joined(dataset_dir: Path, tmp_path: Path):
    a = open_cache(extract(dataset_dir, backbone="mobilenet_v2", cache_dir=tmp_path / "a", **COMMON).cache)
    b = open_cache(extract(dataset_dir, backbone="resnet50", cache_dir=tmp_path / "b", **COMMON | {"seed": 1}).cache)
    with pytest.raises(CacheError, match="same images, labels and split"):
        join_caches([a, b])


def test_caches_join_by_image_content_not_file_times(dataset_dir: Path, tmp_path: Path):
    """A dataset copied again in place (same bytes, new mtimes: another dataset fingerprint) still joins with a
    cache made before the copy, and the model trained before it still scores the cache; a changed image does not."""
    a = open_cache(extract(dataset_dir, backbone="mobilenet_v2", cache_dir=tmp_path / "c", **COMMON).cache)
    fit_head(a, tmp_path / "m.pt", TorchHead(head="fc", epochs=2, batch_size=8, device="cpu"))
    images = sorted((dataset_dir / "images").glob("*.jpg"))
    for path in images:
        os.utime(path, (path.stat().st_atime + 3600, path.stat().st_mtime + 3600))
    b = open_cache(extract(dataset_dir, backbone="resnet50", cache_dir=tmp_path / "c", **COMMON).cache)
    assert b.attrs["dataset_fingerprint"] != a.attrs["dataset_fingerprint"]
    assert b.images_digest == a.images_digest
    assert join_caches([a, b]).features.shape[1] == 1280 + 2048
    again = open_cache(extract(dataset_dir, backbone="mobilenet_v2", cache_dir=tmp_path / "c", **COMMON).cache)
    assert again.attrs["dataset_fingerprint"] == b.attrs["dataset_fingerprint"]  # restamped in place
    load_model(tmp_path / "m.pt").check_labels(again.provenance(), again.classes)
    kept = open_cache(b.path)
    Image.open(images[0]).convert("RGB").rotate(90).save(images[0])  # one image's content changes
    changed = open_cache(extract(dataset_dir, backbone="resnet50", cache_dir=tmp_path / "c", **COMMON).cache)
    assert changed.images_digest != kept.images_digest
    with pytest.raises(CacheError, match="same images, labels and split"):
        join_caches([again, changed])
    with pytest.raises(ModelError, match="another version of the dataset"):
        load_model(tmp_path / "m.pt").check_labels(changed.provenance(), changed.classes)


def test_cli_fit_head_and_report_on_backbones_a_plus_b(two_caches, tmp_path: Path):
    a, _, _ = two_caches
    out = tmp_path / "joined.pt"
    args = ["fit-head", "--cache-dir", str(a.path.parent), "--backbone", "mobilenet_v2+resnet50", "--head", "fc",
            "--epochs", "3", "--batch-size", "8", "--device", "cpu", "--out", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert load_model(out).provenance["feature_dim"] == 1280 + 2048
    r = CliRunner().invoke(main, ["report", "--model", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, args + ["--augment", "seller"])
    assert r.exit_code != 0 and "views are stored per cache" in r.output, r.output


def test_cli_sweep_over_a_backbone_and_a_joined_pair(two_caches, tmp_path: Path):
    import csv

    a, _, _ = two_caches
    out = tmp_path / "sweep.csv"
    r = CliRunner().invoke(main, ["sweep", "--cache-dir", str(a.path.parent), "--backbones",
                                  "mobilenet_v2,mobilenet_v2+resnet50", "--lrs", "0.01", "--optimizers", "adam",
                                  "--heads", "fc", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    with open(out) as fh:
        backbones = {row["backbone"] for row in csv.DictReader(fh)}
    assert backbones == {"mobilenet_v2", "mobilenet_v2+resnet50"}
