"""The study's benchmark model, as a reference row beside the heads: a small CNN trained on the photos
themselves at their native 60x80 (two convolution layers, Adam at 1e-3, 10 epochs). The study reported
84.7% for it against ~90% claimed for frozen ImageNet features; trained here on featpipe's own split,
it answers that question with numbers measured the same way as the heads' (BENCHMARKS.md).

It is deliberately plain: an `nn.Module` and a training loop that keeps the epoch with the lowest
validation loss. Confidence is calibrated like the heads' (temperature on validation logits), so its
auto-tag coverage at 99% precision compares directly.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .images import Preprocessing, open_rgb
from .loader import normalise

NATIVE = (60, 80)  # (width, height) of the catalogue's photos


class SimpleCNN(nn.Module):
    """conv 3x3 -> ReLU -> max-pool, twice, then dropout and one linear layer to the classes."""

    def __init__(self, n_classes: int, width: int = 32, size: tuple[int, int] = NATIVE, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        w, h = size
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width * (h // 4) * (w // 4), n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_pixels(paths: Sequence[str | Path], size: tuple[int, int] = NATIVE, threads: int = 2
                ) -> tuple[np.ndarray, np.ndarray]:
    """Photos as uint8 (N, H, W, 3) at `size` (width, height), and ok flags: an unreadable file is a
    black image with ok False (the caller counts and reports it)."""
    w, h = size
    pixels = np.zeros((len(paths), h, w, 3), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)

    def load(i: int) -> None:
        try:
            img = open_rgb(paths[i])
        except Exception:  # PIL raises many types for broken files
            return
        pixels[i] = np.asarray(img if img.size == size else img.resize(size, Image.Resampling.BICUBIC))
        ok[i] = True

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(load, range(len(paths))))
    return pixels, ok


def _batches(pixels: np.ndarray, order: np.ndarray, batch_size: int, pre: Preprocessing):
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        yield rows, normalise(torch.from_numpy(pixels[rows]), pre).permute(0, 3, 1, 2)


@dataclass
class SimpleCNNResult:
    model: SimpleCNN
    best_epoch: int
    history: list[dict] = field(default_factory=list)


def logits(model: nn.Module, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The model's class scores for uint8 (N, H, W, 3) photos."""
    model.eval()
    out = []
    with torch.inference_mode():
        for _, x in _batches(pixels, np.arange(len(pixels)), batch_size, Preprocessing()):
            out.append(model(x).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.classifier[-1].out_features), np.float32)


def train_simple_cnn(pixels: np.ndarray, labels: np.ndarray, split: np.ndarray, n_classes: int, epochs: int = 10,
                     batch_size: int = 64, lr: float = 1e-3, seed: int = 0) -> SimpleCNNResult:
    """Train on split 0 with Adam, and keep the weights of the epoch with the lowest loss on split 1."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pre = Preprocessing()  # ImageNet mean and std, as for the backbones
    model = SimpleCNN(n_classes, size=(pixels.shape[2], pixels.shape[1]))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    y = torch.from_numpy(labels.astype(np.int64))
    train, val = np.flatnonzero(split == 0), np.flatnonzero(split == 1)
    best, history = (np.inf, 0, copy.deepcopy(model.state_dict())), []
    for epoch in range(1, epochs + 1):
        model.train()
        total, correct, seen = 0.0, 0, 0
        for rows, x in _batches(pixels, rng.permutation(train), batch_size, pre):
            opt.zero_grad()
            out = model(x)
            loss = loss_fn(out, y[rows])
            loss.backward()
            opt.step()
            total += loss.item() * len(rows)
            correct += int((out.argmax(1) == y[rows]).sum())
            seen += len(rows)
        val_logits = torch.from_numpy(logits(model, pixels[val]))
        val_loss = float(loss_fn(val_logits, y[val]))
        history.append({"epoch": epoch, "train_loss": total / seen, "train_acc": correct / seen, "val_loss": val_loss,
                        "val_acc": float((val_logits.argmax(1) == y[val]).float().mean())})
        if val_loss < best[0]:
            best = (val_loss, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    model.eval()
    return SimpleCNNResult(model, best[1], history)
