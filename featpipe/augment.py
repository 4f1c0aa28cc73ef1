"""Augmented views of catalogue photos that look more like what sellers upload.

Catalogue photos are studio shots on near-white backgrounds; sellers photograph products on beds,
floors and tables, off-centre, under other light, with other cameras. A view cuts the product from its
background and composes it onto a generated texture (plain colour, smooth noise, cloth stripes or
checks, wood grain, carpet), then crops, flips, turns, relights, blurs and re-encodes it. Nothing is
downloaded: every texture is drawn from the view's own seeded generator, so a view is a pure function
of (policy, seed, view number, image id) and a resumed extraction recomputes exactly the same pixels.
"""
from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter
from scipy import ndimage

Policy = Callable[[Image.Image, np.random.Generator], Image.Image]  # a photo and a random stream -> a view
Augment = Callable[[Image.Image], Image.Image]  # what the image loader applies to one decoded photo


def view_generator(seed: int, view: int, image_id: int) -> np.random.Generator:
    """The random stream of one view of one image: independent of batch order and of the other views."""
    return np.random.default_rng([seed, view, image_id])


def background_mask(rgb: Image.Image, light: int = 225, grey: int = 20) -> np.ndarray:
    """Float mask, 1 on the product: near-white, near-grey pixels connected to the border are background
    (white parts inside a product, e.g. a logo, are not connected to the border and stay)."""
    a = np.asarray(rgb, dtype=np.int16)
    pale = (a.min(2) > light) & (np.ptp(a, axis=2) < grey)
    regions, _ = ndimage.label(pale)
    border = np.unique(np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]]))
    background = np.isin(regions, border[border > 0])
    return 1.0 - ndimage.gaussian_filter(background.astype(np.float32), 0.7)  # soft edge, no halo


def texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A generated background (H, W, 3) float in [0, 255]."""
    base = rng.uniform(30, 230, 3)
    kind = rng.integers(5)
    y, x = np.mgrid[0:height, 0:width]
    if kind == 0:  # plain colour: a wall, a sheet
        out = np.broadcast_to(base, (height, width, 3))
    elif kind == 1:  # smooth noise: folds of a bed sheet, a floor under uneven light
        n = ndimage.gaussian_filter(rng.normal(size=(height, width)), rng.uniform(2, 8))
        out = base + (n / (n.std() + 1e-6))[..., None] * rng.uniform(5, 30)
    elif kind == 2:  # cloth: stripes or checks of two colours
        freq, angle = rng.uniform(0.1, 0.8), rng.uniform(0, np.pi)
        wave = np.sin(freq * (x * np.cos(angle) + y * np.sin(angle)))
        if rng.random() < 0.5:
            wave = wave * np.sin(freq * (-x * np.sin(angle) + y * np.cos(angle)))
        out = np.where((wave > 0)[..., None], base, rng.uniform(30, 230, 3))
    elif kind == 3:  # wood grain
        warp = ndimage.gaussian_filter(rng.normal(size=(height, width)), 3) * 20
        grain = np.sin((x + warp) * rng.uniform(0.3, 1.0))
        wood = np.array([rng.uniform(90, 180), rng.uniform(50, 120), rng.uniform(20, 70)])
        out = wood * (0.8 + 0.2 * grain[..., None])
    else:  # carpet: fine noise
        out = base + rng.normal(size=(height, width, 3)) * rng.uniform(5, 25)
    return np.clip(out, 0, 255)


def seller_view(rgb: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A catalogue photo as a seller might have taken it; same size as the input."""
    w, h = rgb.size
    out = rgb
    if rng.random() < 0.8:  # onto another background, sometimes smaller in the frame
        mask = background_mask(rgb)
        background = texture(rng, h, w)
        alpha = mask[..., None]
        product = Image.fromarray((np.asarray(rgb) * alpha + background * (1 - alpha)).astype(np.uint8))
        canvas = Image.fromarray(background.astype(np.uint8))
        scale = rng.uniform(0.65, 1.0)
        sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
        paste_mask = Image.fromarray((mask * 255).astype(np.uint8)).resize((sw, sh), Image.Resampling.BILINEAR)
        canvas.paste(product.resize((sw, sh), Image.Resampling.BILINEAR),
                     (int(rng.integers(0, w - sw + 1)), int(rng.integers(0, h - sh + 1))), paste_mask)
        out = canvas
    side = rng.uniform(0.75, 1.0)  # crop a little, as a hand-held camera frames it
    cw, ch = min(w, round(w * side * rng.uniform(0.9, 1.1))), round(h * side)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = out.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle = rng.uniform(-15, 15) + (90 * rng.choice([-1, 1]) if rng.random() < 0.1 else 0)  # landscape shots
    corner = tuple(int(v) for v in np.asarray(out)[0, 0])
    out = out.rotate(angle, resample=Image.Resampling.BILINEAR, expand=abs(angle) > 45, fillcolor=corner)
    out = out.resize((w, h), Image.Resampling.BILINEAR) if out.size != (w, h) else out
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.6, 1.3))
    out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.7, 1.3))
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.5, 1.4))
    cast = np.asarray(out, dtype=np.float32) * rng.uniform(0.88, 1.12, 3)  # white balance
    out = Image.fromarray(np.clip(cast, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    if rng.random() < 0.05:
        out = out.convert("L").convert("RGB")
    if rng.random() < 0.5:
        buf = io.BytesIO()
        out.save(buf, "JPEG", quality=int(rng.integers(30, 90)))
        out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return out


AUGMENTATIONS: dict[str, Policy] = {"seller": seller_view}


@dataclass(frozen=True)
class View:
    """View number `view` of image `image_id` under `policy`: a picklable Augment, so DataLoader workers
    compute the same pixels as the calling process."""

    policy: str
    seed: int
    view: int
    image_id: int

    def __call__(self, rgb: Image.Image) -> Image.Image:
        return AUGMENTATIONS[self.policy](rgb, view_generator(self.seed, self.view, self.image_id))
