"""torch's side of image batches: normalising uint8 pixels into the backbone's float input, and DataLoader
worker processes that decode batches beside a GPU. Decoding itself is `images`, which needs no torch."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from .images import Preprocessing, load_image, try_load

if TYPE_CHECKING:
    from .augment import Augment


def normalise(pixels: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 (..., H, W, C) -> (x / 255 - mean) / std, float32, in place on one float copy.

    The multiply-add runs over rows of W*C values with the per-channel constants tiled along them:
    over a last dimension of 3 it measured twice as slow, and a uint8 input to the multiply-add itself
    slower still. The torch runtime calls it on the batch's device."""
    width = pixels.shape[-2]
    std = torch.tensor(pre.std, dtype=torch.float32)
    shift, scale = (-torch.tensor(pre.mean) / std).repeat(width), (1.0 / (255.0 * std)).repeat(width)
    x = pixels.float()
    rows = x.view(-1, x.shape[-2] * x.shape[-1])
    torch.addcmul(shift.to(x.device), rows, scale.to(x.device), out=rows)
    return x


def preprocess(path: str | Path, pre: Preprocessing) -> torch.Tensor:
    """One image file -> normalised float32 HWC."""
    return normalise(torch.from_numpy(load_image(path, pre)), pre)


class ImageFiles(torch.utils.data.Dataset):
    """Paths -> (uint8 HWC image, ok flag, error text); a bad file yields zeros and ok=False.
    augments: one picklable callable (or None) per path, applied to the decoded photo."""

    def __init__(self, paths: Sequence[str | Path], pre: Preprocessing, augments: Sequence[Augment | None] | None = None):
        self.paths = [str(p) for p in paths]
        self.pre = pre
        self.augments = list(augments) if augments is not None else [None] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool, str]:
        pixels, error = try_load(self.paths[i], self.pre, self.augments[i])
        if pixels is None:
            return torch.zeros(self.pre.image_size, self.pre.image_size, 3, dtype=torch.uint8), False, error
        return torch.from_numpy(pixels), True, ""


def worker_batches(paths: Sequence[str | Path], pre: Preprocessing, batch_size: int, workers: int, pin: bool,
                   augments: Sequence[Augment | None] | None = None) -> torch.utils.data.DataLoader:
    """Batches of (NHWC uint8 images, ok flags, error texts) in input order, prepared by `workers`
    DataLoader processes while the forward pass runs (for CUDA; `pin` for a faster copy to the GPU)."""
    return torch.utils.data.DataLoader(
        ImageFiles(paths, pre, augments),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=False,
        prefetch_factor=4,
    )
