"""The study's small CNN: it learns spatial structure from the photos themselves, reproducibly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featpipe.simplecnn import NATIVE, SimpleCNN, load_pixels, logits, train_simple_cnn


def stripes(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """60x80 photos of a random colour whose class is only where a bright stripe is (top, middle or
    bottom): no colour or brightness statistic separates them, so a model must see where."""
    rng = np.random.default_rng(seed)
    w, h = NATIVE
    pixels, labels = [], []
    for cls in range(3):
        for _ in range(n_per_class):
            img = np.broadcast_to(rng.integers(0, 200, 3), (h, w, 3)).astype(np.float32)
            img = img + rng.normal(0, 20, (h, w, 3))
            top = cls * h // 3 + rng.integers(0, h // 3 - 8)
            img[top:top + 8] = 255
            pixels.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(cls)
    split = np.tile(np.r_[np.zeros(n_per_class - 20), np.ones(10), np.full(10, 2)], 3).astype(np.int8)
    return np.stack(pixels), np.array(labels), split


def test_simple_cnn_learns_where_the_stripe_is_and_is_reproducible():
    torch.set_num_threads(1)
    pixels, labels, split = stripes(60, seed=0)
    a = train_simple_cnn(pixels, labels, split, 3, epochs=4, batch_size=16, seed=0)
    test = split == 2
    acc = float((logits(a.model, pixels[test]).argmax(1) == labels[test]).mean())
    assert acc > 0.8, f"test accuracy {acc:.2f}, chance is 1/3"
    assert a.history[-1]["train_loss"] < a.history[0]["train_loss"]
    assert 1 <= a.best_epoch <= 4 and len(a.history) == 4
    best = min(a.history, key=lambda h: h["val_loss"])
    assert best["epoch"] == a.best_epoch, "the epoch with the lowest validation loss is the one kept"
    b = train_simple_cnn(pixels, labels, split, 3, epochs=4, batch_size=16, seed=0)
    np.testing.assert_array_equal(logits(a.model, pixels[test]), logits(b.model, pixels[test]))


def test_model_shape_follows_the_photo_size():
    model = SimpleCNN(5, size=(60, 80))
    assert model(torch.zeros(2, 3, 80, 60)).shape == (2, 5)


def test_load_pixels_squashes_odd_sizes_and_flags_unreadable_files(tmp_path: Path):
    Image.new("RGB", (60, 80), (255, 0, 0)).save(tmp_path / "a.jpg", quality=95)
    Image.new("RGB", (300, 200), (0, 0, 255)).save(tmp_path / "b.jpg", quality=95)
    (tmp_path / "c.jpg").write_bytes(b"not a jpeg")
    pixels, ok = load_pixels([tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "c.jpg"])
    assert pixels.shape == (3, 80, 60, 3) and ok.tolist() == [True, True, False]
    assert pixels[0, ..., 0].mean() > 240 and pixels[1, ..., 2].mean() > 240 and pixels[2].max() == 0
