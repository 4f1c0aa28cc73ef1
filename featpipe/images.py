"""Image files -> batches of resized photos the backbone's runtime takes.

Images are decoded and resized into HWC uint8; a batch is (N, H, W, C) uint8, and each runtime
normalises it itself (`runtimes`): a quarter of the bytes of a float batch to build, copy or send to a
GPU. Seen as NCHW, an HWC batch *is* channels_last. Two ways to feed the backbone, chosen by `workers`:

- workers > 0 (the default on CUDA): DataLoader worker processes prepare batches while the GPU runs.
- workers = 0 (the default on CPU): the calling process decodes each batch with a thread pool between
  forward passes. On a CPU the forward pass already has every core; a worker process beside it
  pre-empts one of its OpenMP threads while the other spins at the next barrier, so decoding costs
  twice its own time (BENCHMARKS.md, extraction throughput, runs the command both ways).
"""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from .augment import Augment
from .backbones import Preprocessing

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error to report, not grey pixels

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale (8 and 16 bit), CMYK, palette and alpha images -> RGB; transparency is flattened onto white."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        # 16-bit grayscale (PNG decodes it as I or I;16): PIL's convert would clip it to white, so scale it
        levels = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


def open_rgb(path: str | Path) -> Image.Image:
    """Decode, turn upright and convert to RGB; raises OSError/ValueError for unreadable files."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))  # phone photos carry their rotation in EXIF


def load_image(path: str | Path, pre: Preprocessing, augment: Augment | None = None) -> np.ndarray:
    """Decode, convert to RGB, optionally augment at the photo's own size, and resize to uint8 HWC;
    raises OSError/ValueError for unreadable files."""
    rgb = open_rgb(path)
    if augment is not None:
        rgb = augment(rgb)
    size = (pre.image_size, pre.image_size)
    if rgb.size != size:
        rgb = rgb.resize(size, _RESAMPLE[pre.interpolation])
    return np.array(rgb, dtype=np.uint8)  # a writable copy: torch warns on read-only buffers


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


def _try_load(path: str | Path, pre: Preprocessing, augment: Augment | None = None) -> tuple[np.ndarray | None, str]:
    """load_image, or (None, error text) for a file PIL cannot read: reported, never raised."""
    try:
        return load_image(path, pre, augment), ""
    except Exception as exc:  # PIL raises many types for broken files
        return None, f"{type(exc).__name__}: {exc}"


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
        pixels, error = _try_load(self.paths[i], self.pre, self.augments[i])
        if pixels is None:
            return torch.zeros(self.pre.image_size, self.pre.image_size, 3, dtype=torch.uint8), False, error
        return torch.from_numpy(pixels), True, ""


def threaded_batches(paths: Sequence[str | Path], pre: Preprocessing, batch_size: int, threads: int,
                     augments: Sequence[Augment | None] | None = None,
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """The DataLoader's batches, decoded on demand in this process by `threads` threads.

    Pillow releases the GIL while it resizes, so two threads decode a batch in about half the time
    (one task per thread measured faster than one per image). A bad file gives a blank image, ok=False
    and its error text, as in the workers."""
    size, threads = pre.image_size, max(1, threads)
    augments = list(augments) if augments is not None else [None] * len(paths)
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(paths), batch_size):
            chunk, views = paths[start:start + batch_size], augments[start:start + batch_size]
            pixels = np.empty((len(chunk), size, size, 3), dtype=np.uint8)
            errors = [""] * len(chunk)

            def fill(first: int) -> None:  # every threads-th image: one task per thread, not per image
                for j in range(first, len(chunk), threads):
                    image, errors[j] = _try_load(chunk[j], pre, views[j])
                    pixels[j] = 0 if image is None else image

            list(pool.map(fill, range(threads)))
            yield torch.from_numpy(pixels), torch.tensor([not e for e in errors]), errors


def image_loader(paths: Sequence[str | Path], pre: Preprocessing, batch_size: int, workers: int, pin: bool,
                 augments: Sequence[Augment | None] | None = None) -> Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Batches of (NHWC uint8 images, ok flags, error texts) in input order.

    workers = 0 decodes in this process with torch's thread count between forward passes (CPU);
    workers > 0 prepares batches in that many DataLoader processes beside the forward pass (CUDA).
    augments: an augmentation (or None) per path, e.g. `augment.View`s."""
    if workers == 0:
        return threaded_batches(paths, pre, batch_size, torch.get_num_threads(), augments)
    return torch.utils.data.DataLoader(
        ImageFiles(paths, pre, augments),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=False,
        prefetch_factor=4,
    )
