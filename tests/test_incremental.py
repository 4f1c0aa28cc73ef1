"""Extraction over a dataset that changed since its cache was built: only new and changed images run."""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import make_dataset, make_image
from featpipe.dataset import hashed_split
from featpipe.extract import extract
from featpipe.store import CacheError, open_cache

# random-init weights in float32: their tiny features still differ image by image, and float32 keeps them
SMALL = dict(backbone="mobilenet_v2", weights="none", min_per_class=5, image_size=32, batch_size=4, workers=0,
             device="cpu", dtype="float32", progress=False, runtime="torch")


def grow(root: Path, n_new: int, change: list[int], remove: list[int], seed: int = 7) -> list[int]:
    """Add `n_new` images (new ids), rewrite the images of `change` with other pixels, and drop the rows
    of `remove` from styles.csv; returns the new ids."""
    rng = np.random.default_rng(seed)
    lines = (root / "styles.csv").read_text().splitlines()
    kept = [lines[0]] + [line for line in lines[1:] if int(line.split(",")[0]) not in remove]
    start = max(int(line.split(",")[0]) for line in lines[1:]) + 1
    classes = ("Tshirts", "Watches", "Heels")
    new_ids = list(range(start, start + n_new))
    for k, i in enumerate(new_ids):
        cls = classes[k % 3]
        make_image(cls, rng).save(root / "images" / f"{i}.jpg", quality=90)
        kept.append(f"{i},Men,Apparel,Topwear,{cls},Red,Summer,2013,Casual,New {cls} {i}")
    for i in change:
        path = root / "images" / f"{i}.jpg"
        with Image.open(path) as img:
            img.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(path, quality=80)
    (root / "styles.csv").write_text("\n".join(kept) + "\n")
    return new_ids


def rows_by_id(cache) -> dict[int, np.ndarray]:
    return dict(zip(cache.ids.tolist(), cache.features))


def test_update_extracts_only_new_and_changed_images_and_equals_a_fresh_build(tmp_path: Path):
    data = make_dataset(tmp_path / "data", per_class=10, warts=False)
    first = extract(data, cache_dir=tmp_path / "cache", **SMALL)
    before = open_cache(first.cache)
    assert before.features.std(0).max() > 0, "features must differ between images for equality to mean anything"
    old_split = dict(zip(before.ids.tolist(), before.split.tolist()))

    new_ids = grow(data, n_new=9, change=[1001, 1012], remove=[1003, 1025])
    update = extract(data, cache_dir=tmp_path / "cache", **SMALL)
    assert update.update is not None
    assert {k: update.update[k] for k in ("new", "changed", "removed", "reused")} == \
        {"new": 9, "changed": 2, "removed": 2, "reused": 26}
    assert update.done_now == 11 and update.total == 37
    assert "9 new, 2 changed, 2 removed, 26 reused" in str(update)

    after = open_cache(update.cache)
    assert sorted(after.ids.tolist()) == sorted(set(before.ids.tolist()) - {1003, 1025} | set(new_ids))
    for i, s in zip(after.ids.tolist(), after.split.tolist()):
        if i in old_split:
            assert s == old_split[i], f"image {i} changed split"
    fresh = dict(zip(new_ids, hashed_split(np.array(new_ids), (0.8, 0.1, 0.1), 0).tolist()))
    assert {i: s for i, s in zip(after.ids.tolist(), after.split.tolist()) if i in fresh} == fresh

    old, now = rows_by_id(before), rows_by_id(after)
    for i in now:
        if i in old and i not in (1001, 1012):
            assert np.array_equal(now[i], old[i]), f"reused image {i} must keep its features bit for bit"
    assert not np.array_equal(now[1001], old[1001]), "a changed image is extracted again"

    scratch = open_cache(extract(data, cache_dir=tmp_path / "scratch", **SMALL).cache)
    assert np.array_equal(scratch.ids, after.ids)
    assert np.array_equal(scratch.features, after.features), "an update must equal a build from scratch"
    assert np.array_equal(scratch.labels, after.labels)
    assert after.attrs["updates"][-1]["new"] == 9

    again = extract(data, cache_dir=tmp_path / "cache", **SMALL)
    assert again.already_complete


def test_update_keeps_shards_immutable_and_drops_unused_ones(tmp_path: Path):
    data = make_dataset(tmp_path / "data", per_class=8, warts=False)
    first = extract(data, cache_dir=tmp_path / "cache", **SMALL)
    shards = Path(str(first.cache) + ".shards")
    before = {p.name: p.read_bytes() for p in shards.glob("part-*.h5")}
    assert len(before) == 6  # 24 images, batches of 4
    # every image of the first shard (ids 1000-1003) removed: that shard is of no use any more
    grow(data, n_new=2, change=[], remove=[1000, 1001, 1002, 1003])
    extract(data, cache_dir=tmp_path / "cache", **SMALL)
    after = {p.name: p.read_bytes() for p in shards.glob("part-*.h5")}
    assert "part-0000001.h5" not in after and len(after) == 6
    assert all(after[n] == before[n] for n in after if n in before), "shards are written once"
    with h5py.File(first.cache, "r") as f:  # the manifest lists exactly the shards on disk
        assert sorted(v.decode() for v in f["shards/name"][...]) == sorted(after)


def test_a_missing_shard_is_refused_not_read_as_blanks(tmp_path: Path):
    data = make_dataset(tmp_path / "data", per_class=8, warts=False)
    summary = extract(data, cache_dir=tmp_path / "cache", **SMALL)
    shards = Path(str(summary.cache) + ".shards")
    (shards / "part-0000002.h5").unlink()
    with pytest.raises(CacheError, match="shard files are missing"):
        open_cache(summary.cache)


def test_a_damaged_shard_is_found_before_an_update_reuses_it(tmp_path: Path):
    data = make_dataset(tmp_path / "data", per_class=8, warts=False)
    summary = extract(data, cache_dir=tmp_path / "cache", **SMALL)
    part = Path(str(summary.cache) + ".shards") / "part-0000003.h5"
    raw = bytearray(part.read_bytes())
    raw[-40:-20] = bytes(20)
    part.write_bytes(bytes(raw))
    grow(data, n_new=1, change=[], remove=[])
    with pytest.raises(CacheError, match="checksum"):
        extract(data, cache_dir=tmp_path / "cache", **SMALL)


def test_the_cache_moves_with_its_shards(tmp_path: Path):
    data = make_dataset(tmp_path / "data", per_class=8, warts=False)
    summary = extract(data, cache_dir=tmp_path / "cache", **SMALL)
    expected = open_cache(summary.cache).features
    shutil.move(tmp_path / "cache", tmp_path / "moved")
    moved = open_cache(tmp_path / "moved" / summary.cache.name)
    assert np.array_equal(moved.features, expected)


def test_new_images_split_by_a_stable_hash(tmp_path: Path):
    ids = np.arange(20000)
    split = hashed_split(ids, (0.8, 0.1, 0.1), seed=0)
    assert np.array_equal(split, hashed_split(ids[::-1], (0.8, 0.1, 0.1), seed=0)[::-1]), "order does not matter"
    assert abs((split == 0).mean() - 0.8) < 0.01 and abs((split == 2).mean() - 0.1) < 0.01
    assert not np.array_equal(split, hashed_split(ids, (0.8, 0.1, 0.1), seed=1))


def test_a_flipped_chunk_in_a_shard_is_damaged_through_the_manifest(tmp_path: Path):
    data = make_dataset(tmp_path / "data", per_class=8, warts=False)
    summary = extract(data, cache_dir=tmp_path / "cache", **SMALL)
    part = Path(str(summary.cache) + ".shards") / "part-0000002.h5"
    with h5py.File(part, "r") as f:
        offset = f["features"].id.get_chunk_info(0).byte_offset
    raw = bytearray(part.read_bytes())
    raw[offset + 10:offset + 42] = bytes(b ^ 0x55 for b in raw[offset + 10:offset + 42])
    part.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="damaged"):
        open_cache(summary.cache)


def test_an_image_unreadable_before_is_retried_not_counted_as_new(dataset_dir: Path, tmp_path: Path):
    first = extract(dataset_dir, cache_dir=tmp_path / "cache", **SMALL)
    assert first.skipped["unreadable_image"] == 2
    make_image("Heels", np.random.default_rng(3)).save(dataset_dir / "images" / "1042.jpg")  # the broken file, fixed
    update = extract(dataset_dir, cache_dir=tmp_path / "cache", **SMALL)
    assert (update.update["new"], update.update["retried"], update.done_now) == (0, 2, 2)
    assert "2 unreadable retried" in str(update) and update.skipped["unreadable_image"] == 1
    assert 1042 in open_cache(update.cache).ids


def test_new_timestamps_on_the_same_bytes_reuse_every_feature(tmp_path: Path):
    """A copied or re-laid dataset folder gives every file a new mtime: the stat fingerprint changes, but
    the update compares contents and extracts nothing; augmented views made from the cache stay valid.
    A file whose bytes did change among them is still re-extracted."""
    import os

    from featpipe.views import extract_views, open_views

    data = make_dataset(tmp_path / "data", per_class=10, warts=False)
    first = extract(data, cache_dir=tmp_path / "cache", **SMALL)
    before = open_cache(first.cache)
    extract_views(before, 1, "seller", batch_size=4, workers=0, device="cpu", progress=False)
    images = sorted((data / "images").iterdir())
    for p in images:
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    update = extract(data, cache_dir=tmp_path / "cache", **SMALL)
    assert update.done_now == 0 and not update.already_complete
    assert (update.update["changed"], update.update["reused"], update.update["restamped"]) == (0, 30, 30)
    after = open_cache(update.cache)
    assert np.array_equal(after.features, before.features) and after.attrs["build"] == before.attrs["build"]
    assert after.attrs["extract_seconds"] == pytest.approx(before.attrs["extract_seconds"], abs=0.02)
    open_views(after, "seller", 1)  # still the views of this build
    assert extract(data, cache_dir=tmp_path / "cache", **SMALL).already_complete

    grow(data, n_new=0, change=[1004], remove=[])
    for p in images:
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    again = extract(data, cache_dir=tmp_path / "cache", **SMALL)
    assert (again.update["changed"], again.update["restamped"], again.done_now) == (1, 29, 1)
    assert open_cache(again.cache).attrs["build"] != before.attrs["build"]


def test_extract_seconds_counts_only_the_time_behind_the_features_kept(tmp_path: Path):
    """An update that replaces every image must not add the earlier build's time to its own."""
    data = make_dataset(tmp_path / "data", per_class=10, warts=False)
    extract(data, cache_dir=tmp_path / "cache", **SMALL)
    grow(data, n_new=0, change=[1000 + k for k in range(30)], remove=[])
    update = extract(data, cache_dir=tmp_path / "cache", **SMALL)
    assert update.update["changed"] == 30
    attrs = open_cache(update.cache).attrs
    own = attrs["n_images"] / attrs["images_per_s"]  # this run's forward-pass time, as the cache records it
    assert attrs["extract_seconds"] == pytest.approx(own, rel=0.1)
