"""Image files -> batches of resized photos the backbone's runtime takes, with numpy and Pillow only.

Images are decoded and resized into HWC uint8; a batch is (N, H, W, C) uint8, and each runtime
normalises it itself (`runtimes`): a quarter of the bytes of a float batch to build, copy or send to a
GPU. Seen as NCHW, an HWC batch *is* channels_last. Nothing here imports torch, so a process that only
decodes and runs OpenVINO (a Ray actor) does not pay for importing it; `loader` adds torch's side
(DataLoader worker processes, normalising tensors).

On a CPU the calling process decodes each batch with a thread pool between forward passes
(`threaded_batches`): the forward pass already has every core, and a worker process beside it pre-empts
one of its OpenMP threads while the other spins at the next barrier, so decoding costs twice its own time
(BENCHMARKS.md, extraction throughput, runs the command both ways).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .files import open_regular

if TYPE_CHECKING:
    from .augment import Augment

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error to report, not grey pixels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
Batch = tuple[np.ndarray, np.ndarray, list[str]]  # (N, H, W, C) uint8 images, ok flags, error texts


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns a file into the backbone's input; stored in the cache and model files."""

    image_size: int = 224
    resize: str = "squash"  # straight resize to a square, as the study did
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def decode_threads() -> int:
    """Threads to decode with when the caller does not say: the cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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


def open_rgb(path: str | Path | BinaryIO, max_pixels: int | None = None) -> Image.Image:
    """Decode, turn upright and convert to RGB; raises OSError/ValueError for unreadable files, and for one
    of more than `max_pixels` pixels before anything is decoded (a decompression bomb: a small file that
    claims a huge image). A path is opened only if it is a regular file: a named pipe or device is refused,
    never waited on."""
    with (open_regular(path) if isinstance(path, (str, os.PathLike)) else nullcontext(path)) as fh, \
            Image.open(fh) as img:
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise ValueError(f"{img.width}x{img.height} pixels is over the limit of {max_pixels}")
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))  # phone photos carry their rotation in EXIF


def load_image(path: str | Path | BinaryIO, pre: Preprocessing, augment: Augment | None = None,
               max_pixels: int | None = None) -> np.ndarray:
    """Decode, convert to RGB, optionally augment at the photo's own size, and resize to uint8 HWC;
    raises OSError/ValueError for unreadable files (`open_rgb`)."""
    rgb = open_rgb(path, max_pixels)
    if augment is not None:
        rgb = augment(rgb)
    size = (pre.image_size, pre.image_size)
    if rgb.size != size:
        rgb = rgb.resize(size, _RESAMPLE[pre.interpolation])
    return np.array(rgb, dtype=np.uint8)


def try_load(path: str | Path, pre: Preprocessing, augment: Augment | None = None) -> tuple[np.ndarray | None, str]:
    """load_image, or (None, error text) for a file PIL cannot read: reported, never raised."""
    try:
        return load_image(path, pre, augment), ""
    except Exception as exc:  # PIL raises many types for broken files
        return None, f"{type(exc).__name__}: {exc}"


def pad_batch(images: np.ndarray, size: int) -> np.ndarray:
    """`images` followed by blank ones up to `size`: a shorter batch run on a network compiled for `size`."""
    blank = np.zeros((size - len(images), *images.shape[1:]), images.dtype)
    return np.concatenate([images, blank]) if len(blank) else images


def threaded_batches(paths: Sequence[str | Path], pre: Preprocessing, batch_size: int, threads: int,
                     augments: Sequence[Augment | None] | None = None,
                     ) -> Iterator[Batch]:
    """Batches of `paths` in input order, decoded on demand in this process by `threads` threads.

    Pillow releases the GIL while it resizes, so threads overlap most of the work (one task per thread
    measured faster than one per image). A bad file gives a blank image, ok=False and its error text.
    augments: an augmentation (or None) per path, e.g. `augment.View`s."""
    size, threads = pre.image_size, max(1, threads)
    augments = list(augments) if augments is not None else [None] * len(paths)
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(paths), batch_size):
            chunk, views = paths[start:start + batch_size], augments[start:start + batch_size]
            pixels = np.empty((len(chunk), size, size, 3), dtype=np.uint8)
            errors = [""] * len(chunk)

            def fill(first: int) -> None:  # every threads-th image: one task per thread, not per image
                for j in range(first, len(chunk), threads):
                    image, errors[j] = try_load(chunk[j], pre, views[j])
                    pixels[j] = 0 if image is None else image

            list(pool.map(fill, range(threads)))
            yield pixels, np.array([not e for e in errors], dtype=bool), errors
