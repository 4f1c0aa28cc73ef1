import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from featpipe.extract import extract
from featpipe.store import CacheError, find_cache, open_cache

SMALL = dict(backbone="mobilenet_v2", weights="none", min_per_class=5, image_size=32, batch_size=8, workers=0,
             device="cpu", dtype="float32", progress=False, runtime="torch")  # random init: float16 would round to 0


def test_cache_schema_is_self_describing(dataset_dir: Path, tmp_path: Path):
    summary = extract(dataset_dir, cache_dir=tmp_path / "cache", **SMALL)
    assert summary.skipped == {"missing_image": 1, "rare_class": 2, "unreadable_image": 2}
    with h5py.File(summary.cache, "r") as f:  # plain h5py, as any user would
        n = f["ids"].shape[0]
        assert n == summary.total == 41
        assert f["features"].shape == (n, 1280) and f["features"].dtype == np.float32
        assert f["labels"].shape == f["split"].shape == (n,)
        assert [c.decode() for c in f["classes"][...]] == ["Heels", "Tshirts", "Watches"]
        assert f["meta/productDisplayName"].shape == (n,)
        reasons = sorted(r.decode() for r in f["skipped/reason"][...])
        assert reasons.count("unreadable_image") == 2 and reasons.count("missing_image") == 1
        for key in ("backbone", "weights_id", "preprocessing", "versions", "dataset_fingerprint", "feature_dim"):
            assert key in f.attrs
        assert f.attrs["complete"]
        assert np.isfinite(f["features"][...]).all()
    cache = open_cache(summary.cache)
    assert cache.attrs["preprocessing"]["image_size"] == 32
    assert "Shirt, Tie, and Socks, Set" in cache.meta["productDisplayName"]
    X, y = cache.subset(("train", "val"))
    assert X.dtype == np.float32 and len(X) == len(y) == int((cache.split < 2).sum())


def test_rerun_is_a_noop_and_overwrite_rebuilds(dataset_dir: Path, tmp_path: Path):
    first = extract(dataset_dir, cache_dir=tmp_path, **SMALL)
    again = extract(dataset_dir, cache_dir=tmp_path, **SMALL)
    assert again.already_complete and "nothing to do" in str(again) and again.cache == first.cache
    rebuilt = extract(dataset_dir, cache_dir=tmp_path, overwrite=True, **SMALL)
    assert rebuilt.done_now == 43 and rebuilt.update is None


def test_other_settings_write_another_cache_and_lookup_needs_a_choice(dataset_dir: Path, tmp_path: Path):
    a = extract(dataset_dir, cache_dir=tmp_path, **SMALL)
    b = extract(dataset_dir, cache_dir=tmp_path, **(SMALL | {"image_size": 40}))
    assert a.cache != b.cache
    with pytest.raises(CacheError, match="choose one with --cache"):
        find_cache(tmp_path, "mobilenet_v2")
    with pytest.raises(CacheError, match="no complete vgg16 cache"):
        find_cache(tmp_path, "vgg16")
    assert find_cache(tmp_path, "mobilenet_v2", cache=b.cache) == b.cache


def test_unfinished_run_on_other_data_is_discarded(dataset_dir: Path, tmp_path: Path):
    summary = extract(dataset_dir, cache_dir=tmp_path, **SMALL)
    shards = Path(str(summary.cache) + ".shards")
    summary.cache.unlink()
    with pytest.raises(CacheError, match="no such cache"):
        open_cache(summary.cache)
    (shards / "config.json").write_text('{"dataset_fingerprint": "an earlier version"}')
    with pytest.raises(CacheError, match="in progress or was interrupted"):
        open_cache(summary.cache)
    again = extract(dataset_dir, cache_dir=tmp_path, **SMALL)
    assert again.done_now == 43 and again.resumed_from == 0, "parts of another version of the data are not reused"
    assert len(list(shards.glob("part-*.h5"))) == 6, "the discarded parts are deleted"


def test_vgg16_small_random_init(dataset_dir: Path, tmp_path: Path):
    summary = extract(dataset_dir, cache_dir=tmp_path, **(SMALL | {"backbone": "vgg16", "dtype": "float32"}))
    cache = open_cache(summary.cache)
    assert cache.features.shape == (41, 4096) and cache.features.dtype == np.float32


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path):
    from conftest import make_dataset, run_cli

    data = make_dataset(tmp_path / "data", per_class=30, warts=False)
    args = ["extract", "--data", str(data), "--weights", "none", "--min-per-class", "5", "--image-size", "64",
            "--batch-size", "2", "--workers", "0", "--device", "cpu", "--no-progress", "--runtime", "torch",
            "--dtype", "float32"]
    killed_dir = tmp_path / "killed"
    # 45 batches: over 2 s in all, and a kill can still land inside a batch's forward pass or write
    proc = run_cli(args + ["--cache-dir", str(killed_dir)], slow_disk=0.05)
    deadline = time.time() + 120
    while len(list(killed_dir.glob("*.shards/part-*.h5"))) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "extraction produced no batches in time"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    parts = list(killed_dir.glob("*.shards/part-*.h5"))
    assert 3 <= len(parts) < 45, "the kill must land mid-run"
    assert not list(killed_dir.glob("*.h5")), "no cache file may exist before completion"

    cli = [sys.executable, "-m", "featpipe.cli", *args]
    resumed = subprocess.run(cli + ["--cache-dir", str(killed_dir)], capture_output=True, text=True, check=True)
    assert "resumed after" in resumed.stdout
    subprocess.run(cli + ["--cache-dir", str(tmp_path / "clean")], capture_output=True, check=True)
    a = open_cache(find_cache(killed_dir, "mobilenet_v2"))
    b = open_cache(find_cache(tmp_path / "clean", "mobilenet_v2"))
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.split, b.split)
    assert np.array_equal(a.features, b.features)  # resumed batches line up with an uninterrupted run's: bit-equal
    assert not list(killed_dir.glob("*.shards/config.json")), "the finished run leaves no journal"


def test_decoding_in_process_matches_worker_processes(dataset_dir: Path):
    """workers=0 (the CPU default: decode between forward passes) yields what DataLoader workers yield."""
    import torch

    from featpipe.backbones import load_backbone
    from featpipe.images import Preprocessing
    from featpipe.embed import iter_features
    from featpipe.runtimes import torch_forward

    paths = sorted((dataset_dir / "images").glob("*.jpg")) + [dataset_dir / "images" / "no-such-file.jpg"]
    pre = Preprocessing(image_size=32)
    forward = torch_forward(load_backbone("mobilenet_v2", "none")[0], torch.device("cpu"), pre)
    runs = [list(iter_features(forward, paths, pre, "cpu", batch_size=8, workers=w)) for w in (0, 1)]
    (inproc, workers) = [(np.concatenate([b[1] for b in r]), np.concatenate([b[2] for b in r]),
                          [e for b in r for e in b[3]]) for r in runs]
    assert [b[0] for b in runs[0]] == [b[0] for b in runs[1]]
    assert np.array_equal(inproc[1], workers[1]) and inproc[2] == workers[2]
    assert (~inproc[1]).sum() == 3 and "no-such-file" in inproc[2][-1]
    np.testing.assert_allclose(inproc[0][inproc[1]], workers[0][workers[1]], rtol=1e-5, atol=1e-6)


def test_features_float16_cannot_hold_are_refused(dataset_dir: Path, tmp_path: Path):
    from featpipe.store import storable

    with pytest.raises(CacheError, match="round to 0 in float16.*--dtype float32"):
        extract(dataset_dir, cache_dir=tmp_path, **(SMALL | {"dtype": "float16"}))  # random init: ~1e-9 features
    ids, ok = np.array([7, 8]), np.array([True, True])
    with pytest.raises(CacheError, match="past float16's range"):
        storable(np.array([[1.0, 7e4], [0.5, 2.0]]), ok, "float16", ids)
    with pytest.raises(CacheError, match=r"NaN or Inf features for image\(s\) 8"):
        storable(np.array([[1.0, 2.0], [np.nan, 2.0]]), ok, "float32", ids)
    fine = storable(np.array([[1.0, 2.0], [np.nan, 2.0]]), np.array([True, False]), "float16", ids)
    assert fine.dtype == np.float16 and fine[0].tolist() == [1.0, 2.0]  # an unreadable image's row is not stored
