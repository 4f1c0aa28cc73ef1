"""`featpipe evaluate`: scoring a model on a labelled folder, as users do with their own photos."""
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import SHARED_WEIGHTS, make_image
from featpipe.cli import main
from featpipe.dataset import DatasetError
from featpipe.extract import extract
from featpipe.harness import fit_head
from featpipe.heads import TorchHead
from featpipe.labelled import read_labels, score_folder
from featpipe.models import load_model
from featpipe.workflows.predictor import Predictor
from featpipe.store import open_cache

needs_weights = pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason="../shared weights not present")


def _folder(root: Path, cache_path: Path) -> Path:
    """A labelled folder: training photos of the three classes the model knows (so a fitted head gets
    most right), one photo of a class it lacks, and one listed file that is missing."""
    cache = open_cache(cache_path)
    (root / "images").mkdir(parents=True)
    lines = ["file,articleType,source"]
    for k in np.flatnonzero(cache.split == 0):
        name = f"images/{cache.ids[k]}.jpg"
        (root / name).write_bytes((Path(cache.attrs["dataset_root"]) / name).read_bytes())
        lines.append(f"{name},{cache.classes[cache.labels[k]]},shop-b")
    make_image("Rare", np.random.default_rng(7)).save(root / "images" / "rare.jpg")
    lines.append("images/rare.jpg,Rare,shop-b")
    lines.append("images/gone.jpg,Heels,shop-b")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


@pytest.fixture
def trained(dataset_dir: Path, tmp_path: Path) -> Path:
    s = extract(dataset_dir, weights=str(SHARED_WEIGHTS), cache_dir=tmp_path / "c", min_per_class=5, image_size=224,
                batch_size=16, device="cpu", dtype="float32", progress=False, runtime="torch")
    fit_head(open_cache(s.cache), tmp_path / "m.pt", TorchHead(head="fc", epochs=30, batch_size=8, device="cpu"))
    return tmp_path / "m.pt", s.cache


@needs_weights
def test_evaluate_scores_a_labelled_folder(trained, tmp_path: Path):
    model_path, cache_path = trained
    labels = _folder(tmp_path / "shop", cache_path)
    result = score_folder(Predictor(load_model(model_path), device="cpu"), read_labels(labels))
    s = result.summary
    n = len(result.predictions)
    assert s["images"] == n and s["unreadable"] == 1 and s["unknown_label"] == 1
    assert s["accuracy"] > 0.7  # photos it was fitted on (chance 1/3), and one it cannot get right
    assert s["top3"] >= s["accuracy"]
    right = sum(p.label == t for p, t in zip(result.predictions, result.truth) if p.decision != "error")
    assert s["accuracy"] == pytest.approx(right / (n - 1))
    auto = [p for p in result.predictions if p.decision == "auto"]
    assert s["auto"] == len(auto) and s["auto_coverage"] == pytest.approx(len(auto) / (n - 1))
    assert {r["class"] for r in result.per_class} == {"Tshirts", "Watches", "Heels", "Rare"}
    assert result.unknown_labels == {"Rare": 1}

    sheet, out = tmp_path / "mistakes.png", tmp_path / "preds.csv"
    r = CliRunner().invoke(main, ["evaluate", "--model", str(model_path), "--labels", str(labels), "--device", "cpu",
                                  "--sheet", str(sheet), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert f"accuracy {s['accuracy']:.4f}" in r.stdout and "| Watches |" in r.stdout
    assert "1 unreadable" in r.stderr and "gone.jpg" in r.stderr and "Rare (1)" in r.stderr
    assert sheet.stat().st_size > 0  # the Rare photo is always a mistake
    assert len(out.read_text().splitlines()) == n + 1 and out.read_text().splitlines()[0].startswith("truth,path,label")


def test_labels_file_problems_are_one_line(tmp_path: Path):
    bad = tmp_path / "labels.csv"
    bad.write_text("path,label\nimages/a.jpg,Tshirts\n")
    with pytest.raises(DatasetError, match="no column file or articleType"):
        read_labels(bad)
    bad.write_text("file,articleType\nimages/a.jpg,Tshirts\nimages/b.jpg,\n")
    with pytest.raises(DatasetError, match="line 3 has no file name or no articleType"):
        read_labels(bad)
    bad.write_bytes("file,articleType\nimages/a.jpg,T\xe9shirts\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="not UTF-8"):
        read_labels(bad)
    r = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path / "m.pt"), "--labels", str(tmp_path / "no.csv")])
    assert r.exit_code == 2 and "no such model file" in r.output
    ok = tmp_path / "ok.csv"
    ok.write_text("file,articleType,other\nimages/a.jpg,Tshirts,x\n\n")
    data = read_labels(ok, root=tmp_path / "elsewhere")
    assert data.paths == [tmp_path / "elsewhere" / "images" / "a.jpg"] and data.labels == ["Tshirts"]


def _reviewed(root: Path, cache_path: Path, n: int = 6) -> Path:
    """Catalogue training photos of Tshirts that reviewers tagged Heels, so what the head learns from them cannot
    be mistaken for what the catalogue taught it, and one listed photo that is missing."""
    cache = open_cache(cache_path)
    (root / "images").mkdir(parents=True)
    lines = ["file,articleType"]
    for k in np.flatnonzero((cache.split == 0) & (cache.labels == cache.classes.index("Tshirts")))[:n]:
        name = f"images/{cache.ids[k]}.jpg"
        (root / name).write_bytes((Path(cache.attrs["dataset_root"]) / name).read_bytes())
        lines.append(f"{name},Heels")
    lines.append("images/gone.jpg,Heels")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


@needs_weights
@pytest.mark.parametrize("cross_fit", [[], ["--cross-fit", "3"]])
def test_fit_head_trains_on_labelled_photos(trained, tmp_path: Path, cross_fit: list[str]):
    model_path, cache_path = trained
    labels = _reviewed(tmp_path / "reviewed", cache_path)
    cache = open_cache(cache_path)
    fit = ["fit-head", "--cache", str(cache_path), "--head", "fc", "--epochs", "30", "--batch-size", "8",
           "--device", "cpu", *cross_fit]
    r = CliRunner().invoke(main, [*fit, "--out", str(tmp_path / "plain.pt")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*fit, "--out", str(tmp_path / "reviewed.pt"), "--labelled", str(labels),
                                  "--labelled-repeat", "10"])
    assert r.exit_code == 0, r.output
    assert f"labelled photos: {labels} (6 photos, 1 unreadable skipped) x 10" in r.stdout
    plain, reviewed = load_model(tmp_path / "plain.pt"), load_model(tmp_path / "reviewed.pt")
    n_catalogue = int((cache.split <= 1).sum()) if cross_fit else int((cache.split == 0).sum())
    assert plain.metrics["n_train"] == n_catalogue and reviewed.metrics["n_train"] == n_catalogue + 60
    # calibration and test scores stay on the catalogue's rows
    assert reviewed.metrics["n_calibration"] == plain.metrics["n_calibration"]
    assert reviewed.metrics["n_test"] == plain.metrics["n_test"]
    photos = read_labels(labels)
    before = score_folder(Predictor(plain, device="cpu"), photos).predictions
    after = score_folder(Predictor(reviewed, device="cpu"), photos).predictions
    assert [p.label for p in before[:6]].count("Heels") == 0  # the catalogue taught Tshirts
    # what the reviewers said, for all but at most one: each photo is also in the catalogue as a Tshirt, and the
    # head keeps the epoch with the best loss on the catalogue's validation rows
    assert [p.label for p in after[:6]].count("Heels") >= 5


@needs_weights
def test_labelled_photos_with_labels_outside_the_catalogue_are_refused(trained, tmp_path: Path):
    _, cache_path = trained
    labels = _reviewed(tmp_path / "reviewed", cache_path)
    lines = labels.read_text().splitlines()
    lines[4] = lines[4].replace(",Heels", ",Heel")
    labels.write_text("\n".join(lines) + "\n")
    args = ["fit-head", "--cache", str(cache_path), "--head", "fc", "--device", "cpu",
            "--out", str(tmp_path / "new.pt")]
    r = CliRunner().invoke(main, [*args, "--labelled", str(labels)])
    assert r.exit_code == 2 and "line 5: 'Heel' is not one of the catalogue's 3 classes" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "new.pt").exists()
    labels.write_text("file,articleType\nimages/none.jpg,Heels\n")
    r = CliRunner().invoke(main, [*args, "--labelled", str(labels)])
    assert r.exit_code == 2 and "none of its 1 photos could be read (line 2: " in r.output
    r = CliRunner().invoke(main, [*args, "--labelled", str(labels), "--finetune"])
    assert r.exit_code == 2 and "leave --labelled out" in r.output
