from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_cache
from featpipe.cli import main
from featpipe.harness import fit_head
from featpipe.heads import TorchHead
from featpipe.search import SimilarityIndex, find_similar, precision_at_k, recall_at_k
from featpipe.store import open_cache


def test_a_cached_id_finds_itself_first(blob_cache: Path):
    cache = open_cache(blob_cache)
    for approximate in (False, True):
        hits = find_similar(cache, k=5, query_id=int(cache.ids[7]), approximate=approximate)
        assert hits[0]["id"] == cache.ids[7] and hits[0]["score"] == pytest.approx(1.0, abs=1e-3)
        assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
        assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    assert list(blob_cache.parent.glob("*.raw.hnsw")), "the approximate index is stored beside the cache"


def test_filters_restrict_neighbours(blob_cache: Path):
    cache = open_cache(blob_cache)
    q = int(cache.ids[3])
    hits = find_similar(cache, k=10, query_id=q, same=("gender",))
    want = cache.meta["gender"][3]
    assert all(h["gender"] == want for h in hits)
    hits = find_similar(cache, k=10, query_id=q, where={"gender": "Men"}, approximate=True)
    assert all(h["gender"] == "Men" for h in hits)


def test_exact_matches_brute_force_and_hnsw_recall():
    rng = np.random.default_rng(0)
    cat, queries = rng.normal(size=(3000, 24)), rng.normal(size=(50, 24))
    index = SimilarityIndex(cat)
    exact = index.exact(queries, 10)
    cat_n = cat / np.linalg.norm(cat, axis=1, keepdims=True)
    brute = np.argsort(-(queries @ cat_n.T), axis=1)[:, :10]
    assert np.array_equal(exact.rows, brute)
    index.build_approximate()
    assert recall_at_k(index.approximate(queries, 10).rows, exact.rows) >= 0.95
    assert precision_at_k(np.array([[0, 1]]), np.array([1]), np.array([1, 2])) == 0.5


def test_head_space_search(blob_cache: Path, tmp_path: Path):
    cache = open_cache(blob_cache)
    model = fit_head(cache, tmp_path / "m.pt", TorchHead(head="batchnorm", hidden=16, epochs=5, batch_size=32, device="cpu"))
    hits = find_similar(cache, k=5, query_id=int(cache.ids[0]), model=model)
    assert hits[0]["id"] == cache.ids[0]
    other = fit_head(cache, tmp_path / "m2.pt", TorchHead(head="batchnorm", hidden=16, epochs=5, batch_size=32,
                                                          seed=1, device="cpu"))
    bag = fit_head(cache, tmp_path / "bag.pt", TorchHead(head="batchnorm", hidden=16, epochs=5, batch_size=32,
                                                        device="cpu"), cross_fit_folds=2)  # searches its first copy's
    for m in (model, other, bag):
        assert find_similar(cache, k=5, query_id=int(cache.ids[0]), model=m, approximate=True)[0]["id"] == cache.ids[0]
    assert len(list(blob_cache.parent.glob("*.hnsw"))) == 3, "each model's embedding gets its own stored index"


def test_bad_queries_are_clear(blob_cache: Path, tmp_path: Path):
    runner = CliRunner()
    base = ["similar", "--cache", str(blob_cache)]
    r = runner.invoke(main, base + ["--id", "1", "-k", "100000"])
    assert r.exit_code == 2 and "the catalogue has 240 candidate item(s)" in r.output
    r = runner.invoke(main, base + ["--id", "999999"])
    assert r.exit_code == 2 and "is not in" in r.output
    r = runner.invoke(main, base + ["--id", "1", "--same", "colour"])
    assert r.exit_code == 2 and "unknown metadata column 'colour'" in r.output
    r = runner.invoke(main, base)
    assert r.exit_code == 2 and "give exactly one query" in r.output
    vgg = make_cache(tmp_path / "v" / "vgg16-articleType-x.h5", backbone="vgg16")
    fit_head(open_cache(vgg), tmp_path / "vgg.pt", TorchHead(head="fc", epochs=1, device="cpu"))
    r = runner.invoke(main, base + ["--id", "1", "--model", str(tmp_path / "vgg.pt")])
    assert r.exit_code == 2 and "trained on backbone='vgg16'" in r.output


def test_new_photo_query_and_contact_sheet(dataset_dir: Path, tmp_path: Path):
    from featpipe.extract import extract

    s = extract(dataset_dir, weights="none", cache_dir=tmp_path / "c", min_per_class=5, image_size=32, workers=0,
                device="cpu", dtype="float32", progress=False, runtime="torch")
    photo = dataset_dir / "images" / "1005.jpg"
    sheet = tmp_path / "sheet.png"
    r = CliRunner().invoke(main, ["similar", str(photo), "--cache", str(s.cache), "-k", "3", "--sheet", str(sheet),
                                  "--format", "csv", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[1].split(",")[1] == "1005"  # the photo itself is in the catalogue
    assert sheet.stat().st_size > 0
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    r = CliRunner().invoke(main, ["similar", str(bad), "--cache", str(s.cache), "--device", "cpu"])
    assert r.exit_code == 2 and "unreadable image" in r.output


def test_stored_index_follows_a_changing_catalogue(tmp_path: Path):
    """Add, change and remove items: the stored index is updated (not rebuilt), keeps recall against exact
    search, never returns a removed item, finds a changed item by its new vector, and says when to rebuild."""
    rng = np.random.default_rng(0)
    ids = np.arange(100, 3100)
    cat = rng.normal(size=(3000, 24))
    path = tmp_path / "c.hnsw"
    assert SimilarityIndex(cat, ids).build_approximate(path).built

    keep = np.ones(3000, bool)
    keep[rng.choice(3000, 60, replace=False)] = False  # removed
    changed = np.flatnonzero(keep)[:40]
    cat2 = cat.copy()
    cat2[changed] = rng.normal(size=(40, 24))
    new_ids, new_vecs = np.arange(5000, 5200), rng.normal(size=(200, 24))
    ids2 = np.concatenate([ids[keep], new_ids])
    vecs2 = np.concatenate([cat2[keep], new_vecs])
    index = SimilarityIndex(vecs2, ids2)
    update = index.build_approximate(path)
    assert not update.built and (update.added, update.changed, update.removed) == (200, 40, 60)
    assert not update.rebuild_due and "200 added, 40 changed, 60 deleted" in str(update)

    queries = rng.normal(size=(200, 24))
    exact = index.exact(queries, 10)
    approx = index.approximate(queries, 10)
    assert recall_at_k(approx.rows, exact.rows) >= 0.95
    assert approx.rows.max() < len(ids2), "every hit is a row of the current catalogue"
    first_new = int(np.flatnonzero(ids2 == 5000)[0])
    assert index.approximate(vecs2[first_new:first_new + 1], 1).rows[0, 0] == first_new
    moved = int(np.flatnonzero(ids2 == ids[changed[0]])[0])
    assert index.approximate(vecs2[moved:moved + 1], 1).rows[0, 0] == moved, "a changed item is found by its new vector"

    reloaded = SimilarityIndex(vecs2, ids2)
    again = reloaded.build_approximate(path)
    assert (again.added, again.changed, again.removed) == (0, 0, 0)
    assert np.array_equal(reloaded.approximate(queries, 10).rows, approx.rows), "the update was stored"

    shrunk = SimilarityIndex(vecs2[:2500], ids2[:2500]).build_approximate(path)
    assert shrunk.removed == len(ids2) - 2500 and shrunk.rebuild_due and "--rebuild-index" in str(shrunk)
    assert SimilarityIndex(vecs2[:2500], ids2[:2500]).build_approximate(path, rebuild=True).built
