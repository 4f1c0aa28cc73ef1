"""Trust: no test photo that trained, no input overwritten, no hang, labelled paths confined to their root.
bench/drill.py replays the same cases through the CLI on real photos."""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_dataset

from featpipe.cli import main
from featpipe.extract import extract
from featpipe.harness import fit_head
from featpipe.heads import TorchHead
from featpipe.store import SPLIT_CODES, open_cache

# random-init weights in float32: their tiny features still differ image by image, and float32 keeps them
SMALL = dict(backbone="mobilenet_v2", weights="none", min_per_class=5, image_size=32, batch_size=8, workers=0,
             device="cpu", dtype="float32", progress=False, runtime="torch")


def _styles_without(data: Path, ids: set[int]) -> str:
    """Rewrite styles.csv without the rows of `ids`; returns the text it had."""
    text = (data / "styles.csv").read_text()
    lines = text.splitlines()
    (data / "styles.csv").write_text("\n".join([lines[0]] + [x for x in lines[1:] if int(x.split(",")[0]) not in ids])
                                     + "\n")
    return text


def _one_line_error(r, *fragments: str) -> str:
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("featpipe: error: "), r.output
    assert "Traceback" not in r.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# -- 1. a photo's split never changes; a model knows the test rows it was scored on ------------------------------
def test_images_that_leave_and_come_back_keep_their_split(tmp_path: Path):
    data = make_dataset(tmp_path / "data", per_class=12, warts=False)
    cache = open_cache(extract(data, cache_dir=tmp_path / "cache", **SMALL).cache)
    before = dict(zip(cache.ids.tolist(), cache.split.tolist()))
    away = set(cache.ids[::2].tolist())
    text = _styles_without(data, away)
    assert set(open_cache(extract(data, cache_dir=tmp_path / "cache", **SMALL).cache).ids.tolist()).isdisjoint(away)
    (data / "styles.csv").write_text(text)
    back = extract(data, cache_dir=tmp_path / "cache", **SMALL)
    assert back.update["new"] == len(away)
    after = open_cache(back.cache)
    assert dict(zip(after.ids.tolist(), after.split.tolist())) == before

    # a copy of a test image under a new id is a test image too: its bytes are already on that side
    test_id = int(after.ids[after.split == SPLIT_CODES["test"]][0])
    shutil.copy(data / "images" / f"{test_id}.jpg", data / "images" / "5000.jpg")
    with open(data / "styles.csv", "a") as fh:
        fh.write(text.splitlines()[1].replace(text.splitlines()[1].split(",")[0], "5000", 1) + "\n")
    copy = open_cache(extract(data, cache_dir=tmp_path / "cache", **SMALL).cache)
    assert copy.split[copy.ids == 5000][0] == SPLIT_CODES["test"]


def test_report_refuses_a_cache_whose_test_split_is_not_the_models(blob_cache: Path, tmp_path: Path):
    model = tmp_path / "m.pt"
    fit_head(open_cache(blob_cache), model, TorchHead(head="fc", epochs=2, device="cpu"))
    r = CliRunner().invoke(main, ["report", "--model", str(model), "--out-dir", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    with h5py.File(blob_cache, "a") as f:  # one training row and one test row trade places: same images
        split = f["split"][...]
        train, test = np.flatnonzero(split == 0)[0], np.flatnonzero(split == 2)[0]
        split[[train, test]] = split[[test, train]]
        f["split"][...] = split
    r = CliRunner().invoke(main, ["report", "--model", str(model), "--out-dir", str(tmp_path / "r")])
    _one_line_error(r, "test split is not the one this model was scored on", "1 of its")
