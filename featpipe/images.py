"""Image files -> uint8 tensors the backbone can take, decoded in DataLoader workers.

Workers return uint8 (4x smaller than float) and the float conversion and normalisation happen
on the batch, on the compute device.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageFile

from .backbones import Preprocessing

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error to report, not grey pixels

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, CMYK, palette and alpha images -> RGB; transparency is flattened onto white."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(path: str | Path, pre: Preprocessing) -> torch.Tensor:
    """Decode, convert to RGB and resize; raises OSError/ValueError for unreadable files."""
    with Image.open(path) as img:
        img.load()
        rgb = to_rgb(img)
    size = (pre.image_size, pre.image_size)
    if rgb.size != size:
        rgb = rgb.resize(size, _RESAMPLE[pre.interpolation])
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)


class ImageFiles(torch.utils.data.Dataset):
    """Paths -> (uint8 CHW image, ok flag, error text); a bad file yields zeros and ok=False."""

    def __init__(self, paths: Sequence[str | Path], pre: Preprocessing):
        self.paths = [str(p) for p in paths]
        self.pre = pre

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool, str]:
        try:
            return load_image(self.paths[i], self.pre), True, ""
        except Exception as exc:  # PIL raises many types for broken files
            blank = torch.zeros(3, self.pre.image_size, self.pre.image_size, dtype=torch.uint8)
            return blank, False, f"{type(exc).__name__}: {exc}"


def image_loader(paths: Sequence[str | Path], pre: Preprocessing, batch_size: int, workers: int, pin: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        ImageFiles(paths, pre),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


def normalize_batch(batch: torch.Tensor, pre: Preprocessing, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NCHW -> normalised float on `device`, channels_last for faster convolutions."""
    x = batch.to(device, non_blocking=True).to(dtype).div_(255.0)
    mean = torch.tensor(pre.mean, device=device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=device, dtype=dtype).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)
