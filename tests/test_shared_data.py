"""Checks against the real dataset and weights in ../shared; skipped where they are absent."""
import pytest
import torch

from conftest import SHARED_DATA, SHARED_WEIGHTS
from featpipe.backbones import load_backbone, weights_identity
from featpipe.dataset import load_dataset, read_styles

needs_data = pytest.mark.skipif(not (SHARED_DATA / "styles.csv").is_file(), reason="../shared dataset not present")
needs_weights = pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason="../shared weights not present")


@needs_data
def test_real_csv_keeps_comma_rows_and_gives_the_studys_70_classes():
    header, rows, skipped = read_styles(SHARED_DATA / "styles.csv")
    assert len(rows) == 42283 and not skipped
    name = header.index("productDisplayName")
    assert sum("," in r[name] for r in rows) == 21
    ds = load_dataset(SHARED_DATA)
    assert len(ds.classes) == 70 and len(ds) == 41187
    assert sorted(map(int, ds.skipped["missing_image"])) == [12347, 39401, 39403, 39410, 39425]
    assert (ds.split == 1).sum() > 0 and (ds.split == 2).sum() > 0
    assert (ds.split == 0).mean() == pytest.approx(0.8, abs=0.01)


@needs_weights
def test_shared_mobilenet_weights_load_through_the_file_path():
    model, dim = load_backbone("mobilenet_v2", str(SHARED_WEIGHTS))
    assert dim == 1280
    assert weights_identity("mobilenet_v2", str(SHARED_WEIGHTS)) == (
        "sha256:af3bd10eabeaaad28e18242d8d85f052436408c8ce11081b12283cf58a50318d")
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 1280) and torch.isfinite(out).all()
