"""Trust: no test photo that trained, no input overwritten, no hang, labelled paths confined to their root.
bench/drill.py replays the same cases through the CLI on real photos."""
from __future__ import annotations

import csv
import os
import shutil
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_dataset, make_image, run_cli

from featpipe.cli import main
from featpipe.extract import extract
from featpipe.harness import fit_head
from featpipe.heads import TorchHead
from featpipe.store import SPLIT_CODES, open_cache

# random-init weights in float32: their tiny features still differ image by image, and float32 keeps them
SMALL = dict(backbone="mobilenet_v2", weights="none", min_per_class=5, image_size=32, batch_size=8, workers=0,
             device="cpu", dtype="float32", progress=False, runtime="torch")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """(cache, model) of a small catalogue on random-init weights: the pipeline runs on photos in seconds."""
    root = tmp_path_factory.mktemp("small")
    cache = extract(make_dataset(root / "data", per_class=12, warts=False), cache_dir=root / "cache", **SMALL).cache
    fit_head(open_cache(cache), root / "m.pt", TorchHead(head="fc", epochs=2, device="cpu"))
    return cache, root / "m.pt"


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


# -- 3. no output is one of the inputs ----------------------------------------------------------------------------
def test_an_output_onto_an_input_is_refused_before_any_work(small, tmp_path: Path):
    cache, model = small
    (tmp_path / "shop").mkdir()
    photo = tmp_path / "shop" / "a.jpg"
    make_image("Tshirts", np.random.default_rng(1)).save(photo)
    labels = tmp_path / "shop" / "labels.csv"
    labels.write_text("file,articleType\na.jpg,Tshirts\n")
    (tmp_path / "link.pt").symlink_to(cache)
    os.link(photo, tmp_path / "hard.jpg")
    kept = {p: p.read_bytes() for p in (cache, model, photo, labels)}
    runner = CliRunner()
    fit = ["fit-head", "--cache", str(cache), "--head", "fc", "--device", "cpu"]
    _one_line_error(runner.invoke(main, [*fit, "--out", str(cache)]), "--out", "is --cache")
    _one_line_error(runner.invoke(main, [*fit, "--out", str(tmp_path / "link.pt")]), "--out", "is --cache")
    _one_line_error(runner.invoke(main, [*fit, "--labelled", str(labels), "--out", str(labels)]),
                    "--out", "is --labelled")
    evaluate = ["evaluate", "--model", str(model), "--labels", str(labels), "--device", "cpu"]
    _one_line_error(runner.invoke(main, [*evaluate, "--out", str(labels)]), "--out", "is --labels")
    _one_line_error(runner.invoke(main, [*evaluate, "--sheet", str(tmp_path / "hard.jpg")]),
                    "--sheet", "is a photo of --labels")
    _one_line_error(runner.invoke(main, [*evaluate, "--out", str(tmp_path / "p.csv"), "--sheet",
                                         str(tmp_path / "p.csv")]), "--sheet", "is --out")
    _one_line_error(runner.invoke(main, ["predict", "--model", str(model), "--out", str(photo), str(tmp_path / "shop")]),
                    "--out", "is IMAGE")
    _one_line_error(runner.invoke(main, ["predict", "--model", str(model), "--out", str(model), str(photo)]),
                    "--out", "is --model")
    first = open_cache(cache).ids[0]
    catalogue_photo = Path(open_cache(cache).attrs["dataset_root"]) / "images" / f"{first}.jpg"
    _one_line_error(runner.invoke(main, ["similar", "--cache", str(cache), "--id", str(first), "-k", "2",
                                         "--sheet", str(catalogue_photo)]), "--sheet", "is a catalogue image")
    assert all(p.read_bytes() == data for p, data in kept.items())


# -- 4. only regular files are opened; nothing blocks; SIGTERM is one line --------------------------------------
def test_a_named_pipe_or_device_among_photos_is_skipped_and_counted_never_opened(small, tmp_path: Path):
    cache, model = small
    shop = tmp_path / "shop"
    shop.mkdir()
    make_image("Tshirts", np.random.default_rng(1)).save(shop / "a.jpg")
    os.mkfifo(shop / "pipe.jpg")
    (shop / "folder.jpg").mkdir()
    p = run_cli(["predict", "--model", str(model), "--format", "csv", "--device", "cpu", str(shop), "/dev/zero"])
    out, err = p.communicate(timeout=120)  # a pipe opened for reading would wait here for a writer forever
    assert p.returncode == 0, err
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.splitlines())}
    assert set(rows) == {"a.jpg", "pipe.jpg", "folder.jpg", "zero"}
    assert "not a regular file but a named pipe" in rows["pipe.jpg"]["error"]
    assert "but a folder" in rows["folder.jpg"]["error"] and "but a device" in rows["zero"]["error"]
    assert rows["a.jpg"]["decision"] != "error"
    assert "4 images: " in err and "3 unreadable" in err

    labelled = shop / "labels.csv"
    labelled.write_text("file,articleType\na.jpg,Tshirts\npipe.jpg,Heels\n")
    p = run_cli(["fit-head", "--cache", str(cache), "--head", "fc", "--epochs", "1", "--device", "cpu",
                 "--labelled", str(labelled), "--out", str(tmp_path / "m.pt")])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert f"labelled photos: {labelled} (1 photos, 1 unreadable skipped)" in out


def test_a_named_pipe_in_the_catalogue_is_skipped_with_its_reason(tmp_path: Path):
    data = make_dataset(tmp_path / "data", per_class=6, warts=False)
    (data / "images" / "1001.jpg").unlink()
    os.mkfifo(data / "images" / "1001.jpg")
    p = run_cli(["extract", "--data", str(data), "--cache-dir", str(tmp_path / "cache"), "--weights", "none",
                 "--min-per-class", "5", "--image-size", "32", "--device", "cpu", "--no-progress", "--runtime", "torch",
                 "--dtype", "float32", "--fingerprint", "content"])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "1 not_a_file" in out and 1001 not in open_cache(next((tmp_path / "cache").glob("*.h5"))).ids


def test_ray_leaves_featpipes_sigterm_handler_in_place():
    """ray.init installs its own SIGTERM handler; a SIGTERM would then end `extract --engine ray` in Ray's stack
    dump (exit 134) instead of featpipe's one line and 130."""
    ray = pytest.importorskip("ray")
    from featpipe.ray_engine import connect

    def mine(signum, frame) -> None:
        raise AssertionError("not called")
    previous = signal.signal(signal.SIGTERM, mine)
    started = False
    try:
        started = connect(None)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        if started:
            ray.shutdown()
        signal.signal(signal.SIGTERM, previous)


# -- 2. labelled photos that are the catalogue's validation or test photos ---------------------------------------
def test_labelled_photos_with_the_bytes_of_test_images_are_refused_or_dropped(small, tmp_path: Path):
    cache_path, _ = small
    cache = open_cache(cache_path)
    images = Path(cache.attrs["dataset_root"]) / "images"
    shop = tmp_path / "shop"
    shop.mkdir()
    rows = ["file,articleType"]
    for split in (0, 2):  # a training photo (harmless) then a test photo, under new names
        k = int(np.flatnonzero(cache.split == split)[0])
        shutil.copy(images / f"{cache.ids[k]}.jpg", shop / f"copy-{split}.jpg")
        rows.append(f"copy-{split}.jpg,{cache.classes[cache.labels[k]]}")
    make_image("Heels", np.random.default_rng(5)).save(shop / "own.jpg")
    rows.append("own.jpg,Heels")
    (shop / "labels.csv").write_text("\n".join(rows) + "\n")
    test_id = int(cache.ids[np.flatnonzero(cache.split == 2)[0]])
    fit = ["fit-head", "--cache", str(cache_path), "--head", "fc", "--epochs", "1", "--device", "cpu",
           "--labelled", str(shop / "labels.csv"), "--out", str(tmp_path / "m.pt")]
    r = CliRunner().invoke(main, fit)
    _one_line_error(r, "labels.csv: line 3:", f"test image {test_id}", "--drop-overlap")
    assert not (tmp_path / "m.pt").exists()
    r = CliRunner().invoke(main, [*fit, "--drop-overlap"])
    assert r.exit_code == 0, r.output
    assert "(2 photos, 1 dropped as catalogue validation or test photos) x 10" in r.output


# -- 5. labelled and evaluation csv rows stay inside their root; duplicates -------------------------------------
def test_labelled_rows_are_confined_to_their_root(tmp_path: Path):
    from featpipe.dataset import DatasetError
    from featpipe.labelled import read_labels

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    make_image("Tshirts", np.random.default_rng(1)).save(root / "sub" / "a.jpg")
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"x")
    (root / "out.jpg").symlink_to(secret)
    (root / "in.jpg").symlink_to(root / "sub" / "a.jpg")
    labels = root / "labels.csv"
    messages = []
    for name in ("../secret.jpg", "../nothing.jpg", str(secret), "out.jpg", "sub/../../secret.jpg"):
        labels.write_text(f"file,articleType\nsub/a.jpg,Tshirts\n{name},Tshirts\n")
        with pytest.raises(DatasetError, match="line 3: .* is outside the root folder") as err:
            read_labels(labels)
        messages.append(str(err.value).replace(repr(name), "NAME"))
    assert messages[0] == messages[1], "the message must not say whether the outside file exists"
    labels.write_text(f"file,articleType\nsub/a.jpg,Tshirts\nin.jpg,Tshirts\nsub/./a.jpg,Tshirts\n{secret},Heels\n")
    data = read_labels(labels, allow_outside_root=True)
    assert [p.name for p in data.paths] == ["a.jpg", "secret.jpg"] and data.duplicates == 2
    labels.write_text("file,articleType\nsub/a.jpg,Tshirts\nin.jpg,Heels\n")
    with pytest.raises(DatasetError, match="lines 2 and 3 list the same file 'in.jpg' with labels 'Tshirts' and 'Heels'"):
        read_labels(labels)
    labels.write_text("file,articleType\nsub/a.jpg,Tshirts\nin.jpg,tshirts\n")
    with pytest.raises(DatasetError, match="same file|differ only in case"):
        read_labels(labels)


def test_evaluate_and_fit_head_refuse_rows_outside_the_root(small, tmp_path: Path):
    cache, model = small
    (tmp_path / "shop").mkdir()
    make_image("Tshirts", np.random.default_rng(1)).save(tmp_path / "outside.jpg")
    labels = tmp_path / "shop" / "labels.csv"
    labels.write_text("file,articleType\n../outside.jpg,Tshirts\n")
    r = CliRunner().invoke(main, ["evaluate", "--model", str(model), "--labels", str(labels), "--device", "cpu"])
    _one_line_error(r, "line 2: '../outside.jpg' is outside the root folder", "--allow-outside-root")
    r = CliRunner().invoke(main, ["evaluate", "--model", str(model), "--labels", str(labels), "--device", "cpu",
                                  "--allow-outside-root"])
    assert r.exit_code == 0 and "1 images" in r.output, r.output
    r = CliRunner().invoke(main, ["fit-head", "--cache", str(cache), "--labelled", str(labels), "--device", "cpu",
                                  "--out", str(tmp_path / "m.pt")])
    _one_line_error(r, "line 2: '../outside.jpg' is outside the root folder")


# -- 6. messages that say what is wrong --------------------------------------------------------------------------
def test_messages_say_what_is_wrong_and_what_to_do(small, tmp_path: Path):
    import torch

    cache, model = small
    runner = CliRunner()
    labels = tmp_path / "labels.csv"
    labels.write_text("file,articleType\na.jpg,Tshirts\nb.jpg,Heels\n")  # --root left at the csv's folder by mistake
    r = runner.invoke(main, ["evaluate", "--model", str(model), "--labels", str(labels), "--device", "cpu"])
    _one_line_error(r, "none of its 2 photos could be read (line 2: ", "--root")

    body = torch.load(model, weights_only=True)
    del body["threshold"], body["checksum"]
    torch.save(body, tmp_path / "keyless.pt")
    _one_line_error(runner.invoke(main, ["predict", "--model", str(tmp_path / "keyless.pt"), str(labels)]),
                    "no threshold")
    body = torch.load(model, weights_only=True)
    body["provenance"]["backbone"] = "mobilenet_v9"
    del body["checksum"]
    torch.save(body, tmp_path / "v9.pt")
    line = _one_line_error(runner.invoke(main, ["predict", "--model", str(tmp_path / "v9.pt"), str(labels)]),
                           "backbone 'mobilenet_v9'")
    assert "weights" not in line.split("(")[0]

    first = str(open_cache(cache).ids[0])
    line = _one_line_error(runner.invoke(main, ["similar", "--cache", str(cache), "--id", first, "--where",
                                                "gender=Robots"]), "--where gender=Robots matches no", "Men")
    assert "-k" not in line
    moved = tmp_path / "moved" / "m.pt"
    moved.parent.mkdir()
    body = torch.load(model, weights_only=True)
    body["provenance"]["cache"] = str(tmp_path / "gone" / "c.h5")
    del body["checksum"]
    torch.save(body, moved)
    _one_line_error(runner.invoke(main, ["report", "--model", str(moved)]), "not there", "--cache")

    photo = tmp_path / "two\nlines.jpg"
    make_image("Tshirts", np.random.default_rng(1)).save(photo, format="JPEG")
    r = runner.invoke(main, ["predict", "--model", str(model), "--device", "cpu", str(photo)])
    assert r.exit_code == 0 and len(r.stdout.strip().splitlines()) == 2 and "two\\nlines.jpg" in r.stdout, r.stdout


def test_label_changes_and_labels_differing_in_case(tmp_path: Path):
    from featpipe.dataset import DatasetError

    data = make_dataset(tmp_path / "data", per_class=6, warts=False)
    extract(data, cache_dir=tmp_path / "cache", **SMALL)
    text = (data / "styles.csv").read_text()
    (data / "styles.csv").write_text(text.replace("1001,Men,Apparel,Topwear,Tshirts", "1001,Men,Apparel,Topwear,Heels"))
    update = extract(data, cache_dir=tmp_path / "cache", **SMALL)
    assert "0 new, 1 changed, 0 removed" in str(update) and "1 of the changed with a new label only" in str(update)
    (data / "styles.csv").write_text(text.replace(",Tshirts,Red,Summer,2012,Casual,Plain Tshirts 1001",
                                                  ",tshirts,Red,Summer,2012,Casual,Plain Tshirts 1001"))
    with pytest.raises(DatasetError, match="'Tshirts' .* and 'tshirts' .* differ only in case"):
        extract(data, cache_dir=tmp_path / "cache", **SMALL)
