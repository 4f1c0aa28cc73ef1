"""Bad input and damaged files get one clear line, never a silently wrong answer."""
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_cache
from featpipe.cli import main
from featpipe.harness import fit_head
from featpipe.heads import TorchHead
from featpipe.models import ModelError, load_model
from featpipe.store import CacheError, open_cache


@pytest.fixture
def fitted(blob_cache: Path, tmp_path: Path) -> Path:
    fit_head(open_cache(blob_cache), tmp_path / "m.pt", TorchHead(head="fc", epochs=5, device="cpu"))
    return tmp_path / "m.pt"


def test_report_refuses_a_cache_whose_classes_mean_something_else(fitted: Path, tmp_path: Path):
    other = make_cache(tmp_path / "o" / "mobilenet_v2-articleType-o.h5", n_classes=3)  # a subset of the classes
    r = CliRunner().invoke(main, ["report", "--model", str(fitted), "--cache", str(other)])
    assert r.exit_code == 2 and "3 classes are not the model's 4" in r.output and "class3" in r.output
    renamed = tmp_path / "r" / "mobilenet_v2-articleType-r.h5"
    make_cache(renamed)
    with h5py.File(renamed, "a") as f:
        f.attrs["target"] = "baseColour"
    r = CliRunner().invoke(main, ["report", "--model", str(fitted), "--cache", str(renamed)])
    assert r.exit_code == 2 and "predicts 'articleType'" in r.output
    with h5py.File(renamed, "a") as f:
        f.attrs["target"] = "articleType"
        f.attrs["dataset_fingerprint"] = "another"
    r = CliRunner().invoke(main, ["report", "--model", str(fitted), "--cache", str(renamed)])
    assert r.exit_code == 2 and "another version of the dataset" in r.output
    r = CliRunner().invoke(main, ["report", "--model", str(fitted), "--out-dir", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output  # its own cache is fine


def test_a_damaged_model_file_is_refused(fitted: Path):
    model = load_model(fitted)
    assert model.proba(np.zeros((1, 32), np.float32)).shape == (1, 4)
    data = bytearray(fitted.read_bytes())
    weights = model.head.module_.state_dict()
    first = next(t for t in weights.values() if t.numel() > 64)
    raw = first.detach().contiguous().numpy().tobytes()
    at = bytes(data).find(raw[:64])  # the stored bytes of a weight matrix
    assert at > 0
    data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])
    fitted.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="damaged"):
        load_model(fitted)
    r = CliRunner().invoke(main, ["predict", "--model", str(fitted), str(fitted)])
    assert r.exit_code == 2 and "damaged" in r.output


def test_a_damaged_cache_is_refused(blob_cache: Path):
    cache = open_cache(blob_cache)
    with h5py.File(blob_cache, "r") as f:
        offset = f["features"].id.get_offset() if f["features"].chunks is None else \
            f["features"].id.get_chunk_info(0).byte_offset
    data = bytearray(blob_cache.read_bytes())
    data[offset + 10:offset + 42] = bytes(b ^ 0x55 for b in data[offset + 10:offset + 42])
    blob_cache.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="damaged"):
        open_cache(blob_cache)
    assert cache.features.shape[0] == 240


def test_non_finite_features_in_a_cache_are_refused(tmp_path: Path):
    path = make_cache(tmp_path / "c" / "mobilenet_v2-articleType-n.h5")
    with h5py.File(path, "a") as f:
        feats = f["features"][...]
        feats[3, 0] = np.nan
        del f["features"]
        f.create_dataset("features", data=feats)
    with pytest.raises(CacheError, match="NaN or Inf"):
        open_cache(path)


@pytest.mark.parametrize("args, message", [
    (["fit-head", "--epochs", "0"], "--epochs"),
    (["fit-head", "--lr", "-1"], "--lr"),
    (["fit-head", "--target-precision", "1.5"], "--target-precision"),
    (["fit-head", "--dropout", "1"], "--dropout"),
    (["fit-head", "--device", "tpu"], "use auto, cpu, cuda or cuda:N"),
    (["extract", "--data", ".", "--batch-size", "0"], "--batch-size"),
    (["extract", "--data", ".", "--image-size", "0"], "--image-size"),
    (["extract", "--data", ".", "--workers", "-1"], "--workers"),
    (["predict", "--model", "m.pt", "--top-k", "0", "x.jpg"], "--top-k"),
    (["similar", "--id", "1", "-k", "0"], "-k"),
])
def test_numeric_options_are_checked_before_any_work(args, message, blob_cache: Path):
    r = CliRunner().invoke(main, args + (["--cache", str(blob_cache)] if args[0] in ("fit-head",) else []))
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
