"""Partial fine-tuning: activations cached beside the cache, the last blocks trained on them, and a model file
that rebuilds the fine-tuned network for predict. Real ImageNet weights: a random-init network's activations
are ~1e-9 and would round to zero in float16."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SHARED_WEIGHTS, make_dataset

from featpipe.backbones import load_backbone, split_backbone
from featpipe.cli import main
from featpipe.errors import UserError
from featpipe.extract import extract
from featpipe.finetune import extract_activations, fit_finetune, open_activations
from featpipe.heads import TorchHead
from featpipe.models import ModelError, load_model
from featpipe.workflows.predictor import predict_images
from featpipe.search import embed_space
from featpipe.store import CacheError, open_cache

pytestmark = pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason="needs ../shared/weights (ImageNet MobileNetV2)")
SMALL = dict(backbone="mobilenet_v2", min_per_class=5, image_size=64, batch_size=8, workers=0, device="cpu",
             dtype="float32", progress=False, runtime="torch")


def test_the_split_network_composes_to_the_whole():
    model, _ = load_backbone("mobilenet_v2", str(SHARED_WEIGHTS))
    bottom, top = split_backbone(model, "mobilenet_v2")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(top(bottom(x)), model(x))
    with pytest.raises(UserError, match="supported for mobilenet_v2"):
        split_backbone(model, "vgg16")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    data = make_dataset(tmp / "data", per_class=16, warts=False)
    cache = open_cache(extract(data, weights=str(SHARED_WEIGHTS), cache_dir=tmp / "cache", **SMALL).cache)
    with pytest.raises(CacheError, match="--activations"):
        open_activations(cache)
    summary = extract_activations(cache, batch_size=8, device="cpu", progress=False)
    assert summary.rows == len(cache.ids)
    acts = open_activations(cache)
    model = fit_finetune(cache, acts, tmp / "ft.pt", _head(), top_lr=1e-3)
    return cache, acts, model, tmp


def _head(**params) -> TorchHead:
    return TorchHead(**dict(head="batchnorm", hidden=32, optimizer="adam", lr=1e-2, epochs=15, batch_size=16,
                            device="cpu") | params)


def test_one_seed_gives_one_finetuned_model(finetuned):
    """Dropout included: fine-tuning twice with the same seed gives the same network."""
    cache, acts, model, tmp = finetuned
    torch.manual_seed(12345)  # whatever the caller's global RNG holds
    again = fit_finetune(cache, acts, tmp / "again.pt", _head(), top_lr=1e-3)
    assert model.digest() == again.digest()


def test_activations_are_the_bottom_of_the_network_the_cache_ran(finetuned):
    cache, acts, _, _ = finetuned
    _, top = split_backbone(load_backbone("mobilenet_v2", str(SHARED_WEIGHTS))[0], "mobilenet_v2")
    assert acts.features.dtype == torch.float16 and acts.features.shape[0] == len(cache.ids)
    with torch.inference_mode():
        again = top(acts.features.float()).numpy()
    # the frozen top on the stored activations gives the cache's features, up to float16 rounding
    np.testing.assert_allclose(again, cache.features, rtol=0.02, atol=0.02 * np.abs(cache.features).max())


def test_finetuning_trains_the_blocks_keeps_their_batchnorm_and_beats_chance(finetuned):
    cache, _, model, _ = finetuned
    original = split_backbone(load_backbone("mobilenet_v2", str(SHARED_WEIGHTS))[0], "mobilenet_v2")[1].state_dict()
    tuned = model.provenance["finetune"]["state_dict"]
    weights = [k for k in original if k.endswith("weight") and original[k].dim() > 1]
    assert any(not torch.equal(tuned[k], original[k]) for k in weights)  # the blocks were trained ...
    stats = [k for k in original if "running_" in k]
    assert stats and all(torch.equal(tuned[k], original[k]) for k in stats)  # ... their BatchNorm statistics not
    assert model.metrics["accuracy"] > 0.6  # 3 classes: chance is 1/3
    assert model.metrics["train_views"] == "finetune features.16"
    # stopped at the latest 3 epochs (the default patience) after its best one
    assert model.metrics["best_epoch"] <= len(model.head.history_) <= model.metrics["best_epoch"] + 3


def test_the_model_file_reads_the_blocks_output_as_training_did(finetuned):
    """With power normalisation and clipping (the tuned preset's), the head in the model file transforms the
    fine-tuned blocks' output as the network did in training: its validation loss is the one training kept.
    The clipping range is the cached training features' (the blocks' output before fine-tuning)."""
    from torch.nn import functional as F

    cache, acts, _, tmp = finetuned
    model = fit_finetune(cache, acts, tmp / "power.pt", _head(power=0.5, clip=True, epochs=4), top_lr=1e-3)
    train_features = cache.subset("train")[0]
    np.testing.assert_array_equal(model.head.data_max_, train_features.max(0))
    _, top = split_backbone(load_backbone("mobilenet_v2", str(SHARED_WEIGHTS))[0], "mobilenet_v2")
    top.load_state_dict(model.provenance["finetune"]["state_dict"])
    val = np.flatnonzero(cache.split == 1)
    with torch.inference_mode():
        out = top(acts.features[torch.as_tensor(val)].float()).numpy()
        assert (out > model.head.data_max_).any(), "the fixture must reach past the range for clipping to count"
        logits = model.head.logits(out)
    y = torch.as_tensor(np.searchsorted(model.head.classes_, cache.labels[val]))
    kept = model.head.history_[model.head.best_epoch_ - 1]["val_loss"]
    assert F.cross_entropy(torch.from_numpy(logits), y).item() == pytest.approx(kept, rel=1e-4)
    assert model.head.power == 0.5 and model.head.clip


def test_predict_rebuilds_the_finetuned_network_from_the_model_file(finetuned):
    cache, acts, model, tmp = finetuned
    loaded = load_model(tmp / "ft.pt")
    test = np.flatnonzero(cache.split == 2)
    paths = [Path(cache.attrs["dataset_root"]) / "images" / f"{i}.jpg" for i in cache.ids[test]]
    got = predict_images(loaded, paths, top_k=1, device="cpu")
    # the same network assembled by hand: fine-tuned blocks on the stored activations, then the head
    _, top = split_backbone(load_backbone("mobilenet_v2", str(SHARED_WEIGHTS))[0], "mobilenet_v2")
    top.load_state_dict(model.provenance["finetune"]["state_dict"])
    with torch.inference_mode():
        proba = model.proba(top(acts.features[torch.as_tensor(test)].float()).numpy())
    assert [p.label for p in got] == [model.classes[i] for i in proba.argmax(1)]
    np.testing.assert_allclose([p.confidence for p in got], proba.max(1), atol=0.02)
    # a cache's features are not a fine-tuned head's input
    with pytest.raises(ModelError, match="fine-tuned"):
        embed_space(cache, cache.features, loaded)


def test_cli_extracts_activations_and_finetunes(tmp_path: Path):
    data = make_dataset(tmp_path / "data", per_class=12, warts=False)
    common = ["--backbone", "mobilenet_v2", "--weights", str(SHARED_WEIGHTS), "--cache-dir", str(tmp_path / "c"),
              "--min-per-class", "5", "--image-size", "64", "--batch-size", "8", "--device", "cpu", "--no-progress",
              "--runtime", "torch"]
    r = CliRunner().invoke(main, ["extract", "--data", str(data), *common, "--activations"])
    assert r.exit_code == 0, r.output
    assert "images extracted" in r.output
    fit = ["fit-head", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "m.pt"), "--device", "cpu",
           "--optimizer", "adam", "--lr", "0.01", "--epochs", "5", "--batch-size", "16", "--finetune"]
    r = CliRunner().invoke(main, fit)
    assert r.exit_code == 0, r.output
    assert "views: finetune features.16" in r.output
    r = CliRunner().invoke(main, [*fit, "--augment", "seller"])
    assert r.exit_code == 2 and "leave --augment out" in r.output
    r = CliRunner().invoke(main, [*fit, "--members", "2"])
    assert r.exit_code == 2 and "use --members 1" in r.output
    # the tuned preset's ensemble is for frozen heads: fine-tuning with it trains one network
    r = CliRunner().invoke(main, [*fit, "--preset", "tuned", "--epochs", "2", "--hidden", "64"])
    assert r.exit_code == 0, r.output
    assert load_model(tmp_path / "m.pt").head.members == 1
