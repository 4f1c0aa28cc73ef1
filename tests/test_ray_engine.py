"""--engine ray: a Ray Data actor pool on a local cluster gives the local engine's cache, and resumes its runs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from conftest import SHARED_WEIGHTS, make_dataset  # noqa: E402
from featpipe.extract import extract  # noqa: E402
from featpipe.store import Journal, open_cache  # noqa: E402

SMALL = dict(backbone="mobilenet_v2", weights="none", min_per_class=5, image_size=32, batch_size=4, workers=0,
             device="cpu", dtype="float32", progress=False, runtime="torch")


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    """One local Ray cluster for this module's tests (starting one takes seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_engine_equals_the_local_engine(dataset_dir: Path, tmp_path: Path):
    local = open_cache(extract(dataset_dir, cache_dir=tmp_path / "local", **SMALL).cache)
    summary = extract(dataset_dir, cache_dir=tmp_path / "ray", engine="ray", shard_size=8, **SMALL)
    assert summary.done_now == 43 and summary.skipped["unreadable_image"] == 2
    distributed = open_cache(summary.cache)
    assert local.features.std(0).max() > 0
    assert np.array_equal(local.ids, distributed.ids) and np.array_equal(local.split, distributed.split)
    assert np.array_equal(local.features, distributed.features), "same pipeline, same padding: bit-equal"
    assert distributed.attrs["engine"] == "ray"
    import h5py

    sizes = []
    for part in Path(f"{summary.cache}.shards").glob("part-*.h5"):
        with h5py.File(part, "r") as f:
            sizes.append(len(f["ids"]))
    assert sum(sizes) == 43 and len(sizes) > 1, "the results of actor calls come back as separate shards"


@pytest.mark.parametrize("runtime", ["openvino", "openvino-int8"])
def test_ray_actors_run_the_network_the_driver_converted(dataset_dir: Path, tmp_path: Path, runtime: str):
    """OpenVINO runtimes: the driver converts (or reads the calibrated INT8 model) once and sends the IR;
    the actors' features equal the local engine's bit for bit."""
    pytest.importorskip("openvino")
    if runtime == "openvino-int8":
        pytest.importorskip("nncf")
    if not SHARED_WEIGHTS.is_file():
        pytest.skip("../shared weights not present")
    # real weights: a random-init network's features are too small for INT8, which rounds them all to 0
    small = SMALL | {"runtime": runtime, "calibration_images": 16, "weights": str(SHARED_WEIGHTS), "image_size": 64}
    local = open_cache(extract(dataset_dir, cache_dir=tmp_path / "local", **small).cache)
    distributed = open_cache(extract(dataset_dir, cache_dir=tmp_path / "ray", engine="ray", shard_size=8, **small).cache)
    assert local.features.std(0).max() > 0
    assert np.array_equal(local.features, distributed.features)


def test_a_network_the_driver_cannot_convert_is_its_one_line_error(dataset_dir: Path, tmp_path: Path, monkeypatch):
    """The actors wait for the driver's network; when converting it fails, they stop waiting and the user
    sees the driver's own error, not a hang or an actor's traceback."""
    pytest.importorskip("openvino")
    import featpipe.ray_engine as ray_engine
    from featpipe.errors import UserError

    def broken(*args, **kwargs):
        raise UserError("cannot convert this network")

    monkeypatch.setattr(ray_engine, "portable_network", broken)
    with pytest.raises(UserError, match="cannot convert this network"):
        extract(dataset_dir, cache_dir=tmp_path / "ray", engine="ray", shard_size=8, **(SMALL | {"runtime": "openvino"}))


def test_ray_engine_resumes_a_local_run_that_died(dataset_dir: Path, tmp_path: Path, monkeypatch):
    clean = open_cache(extract(dataset_dir, cache_dir=tmp_path / "clean", **SMALL).cache)
    write = Journal.write
    calls = []

    def dying_write(self, *args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies after three batches are safely on disk
        calls.append(1)
        return write(self, *args, **kwargs)

    monkeypatch.setattr(Journal, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        extract(dataset_dir, cache_dir=tmp_path / "run", **SMALL)
    monkeypatch.setattr(Journal, "write", write)
    resumed = extract(dataset_dir, cache_dir=tmp_path / "run", engine="ray", shard_size=8, **SMALL)
    assert resumed.resumed_from == 12 and resumed.done_now == 43 - 12
    assert np.array_equal(open_cache(resumed.cache).features, clean.features)


def test_ray_engine_update_extracts_only_new_images(tmp_path: Path):
    from test_incremental import grow

    data = make_dataset(tmp_path / "data", per_class=8, warts=False)
    extract(data, cache_dir=tmp_path / "cache", engine="ray", **SMALL)
    grow(data, n_new=5, change=[1002], remove=[1010])
    update = extract(data, cache_dir=tmp_path / "cache", engine="ray", **SMALL)
    assert (update.update["new"], update.update["changed"], update.update["removed"]) == (5, 1, 1)
    assert update.done_now == 6
    scratch = open_cache(extract(data, cache_dir=tmp_path / "scratch", **SMALL).cache)
    assert np.array_equal(open_cache(update.cache).features, scratch.features)


def test_a_user_error_inside_an_actor_is_one_line(dataset_dir: Path, tmp_path: Path):
    from featpipe.store import CacheError

    with pytest.raises(CacheError, match="float16"):  # random-init features round to 0 in float16
        extract(dataset_dir, cache_dir=tmp_path / "c", engine="ray", **(SMALL | {"dtype": "float16"}))


def test_cli_extract_engine_ray(dataset_dir: Path, tmp_path: Path):
    from click.testing import CliRunner

    from featpipe.cli import main

    args = ["extract", "--data", str(dataset_dir), "--weights", "none", "--min-per-class", "5", "--image-size", "32",
            "--batch-size", "4", "--device", "cpu", "--dtype", "float32", "--runtime", "torch", "--no-progress",
            "--cache-dir", str(tmp_path / "c"), "--engine", "ray", "--shard-size", "8"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "43 images extracted" in r.output and open_cache(next((tmp_path / "c").glob("*.h5"))).attrs["engine"] == "ray"
    r = CliRunner().invoke(main, args[:-4] + ["--engine", "spark"])
    assert r.exit_code == 2 and "--engine" in r.output
