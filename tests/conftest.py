"""Synthetic datasets in the real download layout, warts included, made fresh by each test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-product-images-small"
SHARED_WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "mobilenet_v2-imagenet.pth"

# Classes differ by colour and a stripe so that even a random-init backbone separates them.
COLOURS = {"Tshirts": (200, 30, 30), "Watches": (30, 200, 30), "Heels": (30, 30, 200), "Rare": (128, 128, 128)}

# featpipe's CLI on a disk that takes $SLOW_DISK seconds per finished batch: a tiny extraction then lasts long
# enough for a test to stop or kill it mid-run however late a busy machine schedules the test's own polling
SLOW_CLI = ("import os, time; from featpipe.store import Journal; write = Journal.write; "
            "Journal.write = lambda *a: (write(*a), time.sleep(float(os.environ['SLOW_DISK']))); "
            "from featpipe.cli import main; main()")


def run_cli(args: list[str], slow_disk: float = 0.0) -> subprocess.Popen:
    """`featpipe ARGS` in a subprocess (text stdout and stderr piped), each journal write `slow_disk` s slower."""
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=os.environ | {"SLOW_DISK": str(slow_disk)})


def make_image(cls: str, rng: np.random.Generator, size=(60, 80)) -> Image.Image:
    w, h = size
    base = np.array(COLOURS[cls], dtype=np.float32)
    arr = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    stripe = {"Tshirts": slice(0, h // 3), "Watches": slice(h // 3, 2 * h // 3), "Heels": slice(2 * h // 3, h), "Rare": slice(0, 1)}[cls]
    arr[stripe] = 255 - arr[stripe]
    return Image.fromarray(arr, "RGB")


def train_small_model(root: Path):
    """A batchnorm head (root/m.pt) on a small synthetic catalogue (root/data), its features from OpenVINO and a
    backbone weights file of its own (root/weights.pth); returns the cache. For the tests of what runs a model:
    predict, serve, review."""
    import torch
    import torchvision

    from featpipe.extract import extract
    from featpipe.harness import fit_head
    from featpipe.heads import TorchHead
    from featpipe.store import open_cache

    data = make_dataset(root / "data", per_class=16)
    torch.manual_seed(1)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), root / "weights.pth")
    summary = extract(data, backbone="mobilenet_v2", weights=str(root / "weights.pth"), cache_dir=root / "cache",
                      min_per_class=5, image_size=64, batch_size=8, workers=0, device="cpu", dtype="float32",
                      runtime="openvino", progress=False)
    cache = open_cache(summary.cache)
    fit_head(cache, root / "m.pt", TorchHead(head="batchnorm", epochs=30, batch_size=8, device="cpu"))
    return cache


def make_dataset(root: Path, per_class: int = 12, seed: int = 0, warts: bool = True) -> Path:
    """styles.csv + images/ with `per_class` images of three classes and, optionally, the real warts."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = [HEADER]
    next_id = 1000
    for cls in ("Tshirts", "Watches", "Heels"):
        for _ in range(per_class):
            make_image(cls, rng).save(root / "images" / f"{next_id}.jpg", quality=90)
            lines.append(f"{next_id},Men,Apparel,Topwear,{cls},Red,Summer,2012,Casual,Plain {cls} {next_id}")
            next_id += 1
    if warts:
        # unquoted commas in the product name
        lines.append(f"{next_id},Women,Apparel,Topwear,Tshirts,Blue,Fall,2011,Casual,Shirt, Tie, and Socks, Set")
        make_image("Tshirts", rng).save(root / "images" / f"{next_id}.jpg")
        next_id += 1
        # grayscale, CMYK, palette with transparency (PNG bytes behind .jpg: still decodable), odd size
        for mode in ("L", "CMYK", "P", "odd"):
            img = make_image("Watches", rng)
            if mode == "odd":
                img = img.resize((73, 101))
            elif mode == "P":
                img = img.convert("P")
                img.info["transparency"] = 0
                img.save(root / "images" / f"{next_id}.jpg", format="PNG", transparency=0)
            if mode != "P":
                img = img.convert(mode) if mode in ("L", "CMYK") else img
                img.save(root / "images" / f"{next_id}.jpg", format="JPEG")
            lines.append(f"{next_id},Men,Accessories,Watches,Watches,Black,Winter,2016,Casual,{mode} watch")
            next_id += 1
        # a row without an image
        lines.append(f"{next_id},Men,Footwear,Shoes,Heels,Black,Winter,2016,Casual,Ghost heel")
        next_id += 1
        # a corrupt file and a truncated JPEG
        (root / "images" / f"{next_id}.jpg").write_bytes(b"this is not a jpeg")
        lines.append(f"{next_id},Women,Footwear,Shoes,Heels,Black,Winter,2016,Casual,Broken heel")
        next_id += 1
        good = root / "images" / f"{next_id}.jpg"
        make_image("Heels", rng).save(good, quality=95)
        data = good.read_bytes()
        good.write_bytes(data[: len(data) // 2])
        lines.append(f"{next_id},Women,Footwear,Shoes,Heels,Black,Winter,2016,Casual,Truncated heel")
        next_id += 1
        # a class below --min-per-class
        for _ in range(2):
            make_image("Rare", rng).save(root / "images" / f"{next_id}.jpg")
            lines.append(f"{next_id},Men,Apparel,Topwear,Rare,Grey,Summer,2012,Casual,Rare thing")
            next_id += 1
    (root / "styles.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


@pytest.fixture(autouse=True, scope="session")
def _own_cache_home(tmp_path_factory):
    """Converted networks and embedded catalogues go to a folder of the test session's, not the user's."""
    os.environ["FEATPIPE_CACHE_HOME"] = str(tmp_path_factory.mktemp("featpipe-home"))


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))


def make_cache(path: Path, n_per_class: int = 60, n_classes: int = 4, dim: int = 32, seed: int = 0,
               backbone: str = "mobilenet_v2", separation: float = 4.0, complete: bool = True) -> Path:
    """A small feature cache of Gaussian blobs (separable at the default separation), no images needed."""
    import json

    from featpipe.images import Preprocessing
    from featpipe.dataset import _stratified_split
    from featpipe.store import write_cache

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, separation, (n_classes, dim))
    labels = np.repeat(np.arange(n_classes), n_per_class).astype(np.int32)
    feats = (centres[labels] + rng.normal(0, 1, (len(labels), dim))).astype(np.float16)
    ids = np.arange(len(labels), dtype=np.int64) + 1
    classes = [f"class{k}" for k in range(n_classes)]
    pre = json.loads(json.dumps(Preprocessing(image_size=32).to_dict()))
    attrs = {"backbone": backbone, "weights": "none", "weights_id": "none(seed=0)", "feature_dim": dim,
             "preprocessing": pre, "target": "articleType", "dataset_root": str(path.parent),
             "dataset_fingerprint": "synthetic", "n_images": len(ids)}
    meta = {"id": [str(i) for i in ids], "articleType": [classes[k] for k in labels],
            "gender": ["Men" if i % 2 else "Women" for i in ids]}
    write_cache(path, {"features": feats, "ids": ids, "labels": labels,
                       "split": _stratified_split(labels, (0.6, 0.2, 0.2), seed)}, meta, classes, {}, attrs)
    if not complete:
        import h5py

        with h5py.File(path, "a") as f:
            f.attrs["complete"] = False
    return path


@pytest.fixture
def blob_cache(tmp_path: Path) -> Path:
    return make_cache(tmp_path / "cache" / "mobilenet_v2-articleType-blobs.h5")
