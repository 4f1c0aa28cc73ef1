"""Bad input, damaged files, full disks, signals and races: one clear line or a recovery, never a
silent wrong answer. bench/drill.py replays the same faults through the CLI on real photos."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_cache, make_dataset, run_cli

from featpipe.cli import check_writable, main
from featpipe.dataset import DatasetError, fingerprint, load_dataset, read_styles
from featpipe.errors import UserError
from featpipe.harness import fit_head
from featpipe.heads import TorchHead
from featpipe.store import CacheError, cache_lock, find_cache, open_cache, write_cache

EXTRACT = ["--weights", "none", "--min-per-class", "5", "--image-size", "32", "--batch-size", "2", "--workers", "0",
           "--device", "cpu", "--no-progress", "--runtime", "torch", "--dtype", "float32"]


def _run_extract(data: Path, cache_dir: Path, slow_disk: float = 0.0) -> subprocess.Popen:
    return run_cli(["extract", "--data", str(data), "--cache-dir", str(cache_dir), *EXTRACT], slow_disk)


def test_an_unclosed_quote_is_an_error_naming_its_line(tmp_path: Path):
    csv = tmp_path / "styles.csv"
    csv.write_text('id,articleType,name\n1,Tshirts,"fine, quoted"\n2,Tops,"never closed\n3,Tops,a\n4,Tops,b\n')
    with pytest.raises(DatasetError, match=r"line 3 opens a quote .* merge lines 3-5"):
        read_styles(csv)
    csv.write_text('id,articleType,name\n1,Tshirts,"fine, quoted"\n2,Tops,unquoted, commas, kept\n')
    assert read_styles(csv)[1] == [["1", "Tshirts", "fine, quoted"], ["2", "Tops", "unquoted, commas, kept"]]


def test_a_latin1_csv_is_an_error_not_a_replacement_character(tmp_path: Path):
    csv = tmp_path / "styles.csv"
    csv.write_bytes("id,articleType\n1,Tshirts\n2,Caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"line 3 is not UTF-8 .*0xe9.*save it as UTF-8"):
        read_styles(csv)


def test_fingerprint_sees_new_content_of_the_same_size(tmp_path: Path):
    ds = load_dataset(make_dataset(tmp_path / "data", warts=False), min_per_class=5)
    image = ds.image_path(ds.ids[0])
    other = ds.image_path(ds.ids[-1]).read_bytes()
    size = image.stat().st_size
    stat_before = fingerprint(ds)
    image.write_bytes((other + bytes(size))[:size])  # other content, same size, a new mtime
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert fingerprint(ds) != stat_before

    stat_now, content_now = fingerprint(ds), fingerprint(ds, "content")
    stamp = image.stat()
    image.write_bytes(bytes(reversed(image.read_bytes())))  # same size again, and the old time stamp put back
    os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert fingerprint(ds) == stat_now  # what stat cannot see ...
    assert fingerprint(ds, "content") != content_now  # ... content does
    with pytest.raises(DatasetError, match="stat or content"):
        fingerprint(ds, "md5")


def test_second_extract_waits_for_the_lock_and_finds_the_cache(tmp_path: Path):
    data = make_dataset(tmp_path / "data", per_class=6, warts=False)
    cache_dir = tmp_path / "cache"
    first = _run_extract(data, tmp_path / "ref")
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    (name,) = [p.name for p in (tmp_path / "ref").glob("*.h5")]
    cache_dir.mkdir()
    with cache_lock(cache_dir / name):
        waiting = _run_extract(data, cache_dir)
        time.sleep(8)  # long enough to import, read the dataset and reach the lock
        assert waiting.poll() is None, waiting.communicate()
        assert not list(cache_dir.glob("*.shards")), "it must not write while another process holds the lock"
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert "being extracted by pid" in err and "18 images extracted" in out, (out, err)
    assert np.array_equal(open_cache(cache_dir / name).features, open_cache(tmp_path / "ref" / name).features)


def test_sigterm_is_one_line_and_the_rerun_resumes(tmp_path: Path):
    data = make_dataset(tmp_path / "data", per_class=30, warts=False)
    cache_dir = tmp_path / "cache"
    proc = _run_extract(data, cache_dir, slow_disk=0.1)  # 45 batches: 4.5 s at the least
    deadline = time.time() + 120
    while len(list(cache_dir.glob("*.shards/part-*.h5"))) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    assert proc.poll() is None, "the extraction finished before the test could stop it"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert len(list(cache_dir.glob("*.shards/part-*.h5"))) < 45, "it stopped, not finished"
    assert err.strip().splitlines()[-1] == ("featpipe: error: stopped by SIGTERM; finished work is kept: "
                                            "rerun the same command to resume")
    again = _run_extract(data, cache_dir)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and "resumed after" in out, err


def test_a_failed_write_leaves_the_old_cache_and_no_temporary_file(tmp_path: Path, monkeypatch):
    path = make_cache(tmp_path / "c" / "mobilenet_v2-articleType-x.h5")
    before = path.read_bytes()
    cache = open_cache(path)

    def full_disk(self, data):
        raise OSError(28, "No space left on device", str(self))
    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_cache(path, {"features": cache.features, "ids": cache.ids, "labels": cache.labels,
                           "split": cache.split}, cache.meta, cache.classes, {}, cache.attrs)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_os_errors_and_unwritable_outputs_are_one_line(blob_cache: Path, tmp_path: Path):
    runner = CliRunner()
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(UserError, match="cannot write .*a path component is a file"):
        check_writable(not_a_dir / "sub" / "m.pt")
    r = runner.invoke(main, ["fit-head", "--cache-dir", str(blob_cache.parent), "--out", str(not_a_dir / "m.pt")])
    assert r.exit_code == 2 and "cannot write" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["compare", "--cache-dir", str(blob_cache.parent), "--out-dir", str(not_a_dir)])
    assert r.exit_code == 2 and "cannot write" in r.output
    r = runner.invoke(main, ["fit-head", "--cache-dir", str(not_a_dir)])
    assert r.exit_code == 2 and r.output.strip() == (f"featpipe: error: --cache-dir {not_a_dir} is a file, not a folder; "
                                                     "give a folder for the caches")


def test_verbose_shows_the_traceback_of_a_user_error(tmp_path: Path):
    quiet = CliRunner().invoke(main, ["fit-head", "--cache-dir", str(tmp_path)])
    loud = CliRunner().invoke(main, ["-v", "fit-head", "--cache-dir", str(tmp_path)])
    assert quiet.exit_code == loud.exit_code == 2
    assert "Traceback" not in quiet.output and "Traceback" in loud.output
    assert loud.output.strip().splitlines()[-1] == quiet.output.strip()


def test_a_featpipe_bug_is_not_reported_as_a_user_error(blob_cache: Path, monkeypatch):
    import featpipe.harness

    def broken(*args, **kwargs):
        raise ValueError("internal inconsistency")
    monkeypatch.setattr(featpipe.harness, "fit_head", broken)
    r = CliRunner().invoke(main, ["fit-head", "--cache-dir", str(blob_cache.parent)])
    assert r.exit_code == 1 and isinstance(r.exception, ValueError) and "featpipe: error" not in r.output


def test_truncated_cache_in_cache_dir_is_named(blob_cache: Path):
    broken = blob_cache.with_name("mobilenet_v2-articleType-broken.h5")
    broken.write_bytes(blob_cache.read_bytes()[:500])
    assert find_cache(blob_cache.parent) == blob_cache  # the intact one is still found
    blob_cache.unlink()
    with pytest.raises(CacheError, match="unreadable .*mobilenet_v2-articleType-broken.h5"):
        find_cache(blob_cache.parent)


def test_similar_with_a_model_refuses_a_cache_of_other_classes(blob_cache: Path, tmp_path: Path):
    from featpipe.models import ModelError
    from featpipe.search import find_similar

    model = fit_head(open_cache(blob_cache), tmp_path / "m.pt", TorchHead(head="fc", epochs=2, device="cpu"))
    assert len(find_similar(open_cache(blob_cache), 3, query_id=1, model=model)) == 3
    other = open_cache(make_cache(tmp_path / "o" / "mobilenet_v2-articleType-o.h5", n_classes=3))
    with pytest.raises(ModelError, match="classes are not the model's"):
        find_similar(other, 3, query_id=1, model=model)
