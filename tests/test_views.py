"""Augmented views: deterministic pixels, a resumable views file beside the cache, heads that train on them."""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SHARED_WEIGHTS, make_dataset
from PIL import Image

from featpipe.augment import View, background_mask, seller_view, view_generator
from featpipe.errors import UserError
from featpipe.cli import main
from featpipe.extract import extract
from featpipe.harness import Splits, fit_head
from featpipe.heads import TorchHead
from featpipe.store import CacheError, open_cache
from featpipe.views import extract_views, open_views

SMALL = dict(backbone="mobilenet_v2", weights="none", min_per_class=5, image_size=32, batch_size=8, workers=0,
             device="cpu", dtype="float32", progress=False, runtime="torch")


def _studio_shot() -> Image.Image:
    """A red product on a white studio background, with a white logo inside it."""
    a = np.full((80, 60, 3), 250, np.uint8)
    a[15:65, 12:48] = (200, 30, 30)
    a[30:36, 25:35] = 252
    return Image.fromarray(a)


def test_background_mask_keeps_the_product_and_its_white_logo():
    mask = background_mask(_studio_shot())
    assert mask[40, 30] > 0.99 and mask[33, 30] > 0.99  # product and the logo inside it
    assert mask[2, 2] < 0.01 and mask[78, 58] < 0.01  # studio background


def test_a_view_is_a_pure_function_of_policy_seed_view_and_image():
    shot = _studio_shot()
    a, b = View("seller", 0, 1, 42)(shot), View("seller", 0, 1, 42)(shot)
    assert a.size == shot.size and np.array_equal(np.asarray(a), np.asarray(b))
    others = [np.asarray(View("seller", s, v, i)(shot)) for s, v, i in ((1, 1, 42), (0, 2, 42), (0, 1, 43))]
    assert all(np.abs(o.astype(int) - np.asarray(a)).mean() > 5 for o in others)
    # across many views the background changes: the product is not always on white
    corners = [np.asarray(seller_view(shot, view_generator(0, v, 7)))[0, 0] for v in range(20)]
    assert np.mean([c.min() < 200 for c in corners]) > 0.5


def test_views_file_is_resumable_bit_equal_and_refused_when_stale(tmp_path: Path, monkeypatch):
    data = make_dataset(tmp_path / "data", per_class=12, warts=False)
    cache = open_cache(extract(data, cache_dir=tmp_path / "cache", **SMALL).cache)
    n_train = int((cache.split == 0).sum())
    whole = extract_views(cache, 2, batch_size=8, device="cpu", progress=False)
    assert whole.rows == 2 * n_train
    first = open_views(cache, "seller")
    assert sorted(first.ids.tolist()) == sorted(np.repeat(cache.ids[cache.split == 0], 2).tolist())
    v0, v1 = first.features[first.view == 0], first.features[first.view == 1]
    assert np.abs(v0 - v1).mean() > 0.1 * np.abs(v0).mean()  # relative: random-init features are ~1e-9

    whole.path.unlink()
    module = importlib.import_module("featpipe.extract")
    real = module.iter_features

    def dies_after_two_batches(*args, **kwargs):
        for n, batch in enumerate(real(*args, **kwargs)):
            if n == 2:
                raise KeyboardInterrupt
            yield batch
    monkeypatch.setattr(module, "iter_features", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        extract_views(cache, 2, batch_size=8, device="cpu", progress=False)
    monkeypatch.setattr(module, "iter_features", real)
    resumed = extract_views(cache, 2, batch_size=8, device="cpu", progress=False)
    assert resumed.done_now == 2 * n_train - 16
    again = open_views(cache, "seller")
    assert np.array_equal(again.features, first.features) and np.array_equal(again.ids, first.ids)

    rebuilt = open_cache(extract(data, cache_dir=tmp_path / "cache", overwrite=True, **SMALL).cache)
    with pytest.raises(CacheError, match="another build"):
        open_views(rebuilt, "seller")
    fresh = open_cache(extract(data, cache_dir=tmp_path / "other", **SMALL).cache)
    with pytest.raises(CacheError, match="0 view sets for --augment seller"):
        open_views(fresh, "seller")


@pytest.mark.shared
def test_heads_train_on_clean_features_plus_views(tmp_path: Path):
    if not SHARED_WEIGHTS.is_file():
        pytest.skip("needs ../shared")
    data = make_dataset(tmp_path / "data", per_class=20, warts=False)
    # real weights: features that separate the classes, so the accuracy below means something
    real = SMALL | {"weights": str(SHARED_WEIGHTS), "image_size": 64, "dtype": "float16"}
    cache = open_cache(extract(data, cache_dir=tmp_path / "cache", **real).cache)
    extract_views(cache, 2, batch_size=8, device="cpu", progress=False)
    views = open_views(cache, "seller")
    s = Splits.from_cache(cache, views)
    n_train = int((cache.split == 0).sum())
    assert len(s.X_train) == 3 * n_train and len(s.X_val) == int((cache.split == 1).sum())
    assert np.array_equal(s.y_train[n_train:], views.labels(cache))
    model = fit_head(cache, tmp_path / "m.pt", TorchHead(head="fc", epochs=20, device="cpu"), views=views)
    assert model.metrics["n_train"] == 3 * n_train and model.metrics["train_views"] == "seller x2"
    assert model.metrics["accuracy"] > 0.6  # three classes: chance is 1/3
    with pytest.raises(UserError, match="--cross-fit calibrates on the clean photos"):
        fit_head(cache, tmp_path / "m.pt", TorchHead(head="fc", epochs=1, device="cpu"), views=views, cross_fit_folds=2)


def test_cli_extract_views_then_fit_head_on_them(tmp_path: Path):
    data = make_dataset(tmp_path / "data", per_class=12, warts=False)
    common = ["--weights", "none", "--min-per-class", "5", "--image-size", "32", "--batch-size", "8", "--device",
              "cpu", "--no-progress", "--runtime", "torch", "--dtype", "float32", "--cache-dir", str(tmp_path / "c")]
    r = CliRunner().invoke(main, ["extract", "--data", str(data), *common, "--views", "1", "--augment", "seller"])
    assert r.exit_code == 0, r.output
    assert "views extracted" in r.output
    r = CliRunner().invoke(main, ["fit-head", "--cache-dir", str(tmp_path / "c"), "--head", "fc", "--epochs", "2",
                                  "--device", "cpu", "--augment", "seller", "--out", str(tmp_path / "m.pt")])
    assert r.exit_code == 0, r.output
    assert "views: seller x1" in r.output
    r = CliRunner().invoke(main, ["fit-head", "--cache-dir", str(tmp_path / "c"), "--head", "fc", "--epochs", "2",
                                  "--device", "cpu", "--augment", "seller", "--views", "3"])
    assert r.exit_code == 2 and "no such views" in r.output
