"""The loaded predictor, networks kept on disk, weights found by digest, bundles, and the HTTP service over a
real socket."""
from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import train_small_model
from featpipe.cli import main

pytestmark = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("openvino", "fastapi", "httpx")),
                                reason="needs the openvino and serve extras")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model on a small synthetic catalogue, its features from OpenVINO and a weights file of its own."""
    root = tmp_path_factory.mktemp("served")
    return root, train_small_model(root)


def photos(root: Path) -> list[Path]:
    return sorted((root / "data" / "images").glob("*.jpg"))


def test_a_photo_gets_the_same_answer_alone_or_in_a_batch(trained):
    from featpipe import Predictor

    root, cache = trained
    predictor = Predictor.load(root / "m.pt")
    together = predictor.predict(photos(root))
    alone = [predictor.predict([p])[0] for p in photos(root)]
    readable = [p for p in together if p.decision != "error"]
    assert len(readable) >= 40 and sum(p.decision == "error" for p in together) == 2  # the corrupt and truncated files
    assert [(p.label, p.confidence) for p in together] == [(p.label, p.confidence) for p in alone]
    # the head is right on these separable classes, as on the cached features
    truth = dict(zip(cache.ids.tolist(), [cache.classes[i] for i in cache.labels]))
    scored = [(truth[int(Path(p.path).stem)], p.label) for p in readable if int(Path(p.path).stem) in truth]
    assert np.mean([t == g for t, g in scored]) > 0.8


def test_networks_are_converted_once_and_reused_without_torch_or_weights(trained, monkeypatch):
    from featpipe import Predictor, runtimes
    from featpipe.features.networks import NetworkStore

    root, _ = trained
    first = Predictor.load(root / "m.pt").predict(photos(root)[:6])
    assert list((NetworkStore().root).glob("mobilenet_v2-*/model.xml"))

    def no_conversion(*args, **kwargs):
        raise AssertionError("the network was converted again")

    monkeypatch.setattr(runtimes, "to_openvino", no_conversion)
    hidden = root / "weights.pth"
    hidden.rename(root / "weights.moved")
    try:
        again = Predictor.load(root / "m.pt").predict(photos(root)[:6])
    finally:
        (root / "weights.moved").rename(hidden)
    assert [(p.label, p.confidence) for p in again] == [(p.label, p.confidence) for p in first]


def test_weights_are_found_by_digest_on_the_search_path(trained, tmp_path, monkeypatch):
    from featpipe import Predictor
    from featpipe.errors import UserError

    root, _ = trained
    monkeypatch.setenv("FEATPIPE_CACHE_HOME", str(tmp_path / "empty-home"))  # nothing converted yet
    elsewhere = tmp_path / "moved"
    elsewhere.mkdir()
    (elsewhere / "decoy.pth").write_bytes(b"not these weights")
    expected = Predictor.load(root / "m.pt").predict(photos(root)[:4])
    (root / "weights.pth").rename(elsewhere / "renamed.pth")
    try:
        monkeypatch.setenv("FEATPIPE_CACHE_HOME", str(tmp_path / "empty-home-2"))
        with pytest.raises(UserError, match=r"sha256:.*FEATPIPE_WEIGHTS_PATH"):
            Predictor.load(root / "m.pt")
        r = CliRunner().invoke(main, ["predict", "--model", str(root / "m.pt"), str(photos(root)[0])])
        assert r.exit_code == 2 and "FEATPIPE_WEIGHTS_PATH" in r.output and "Traceback" not in r.output
        r = CliRunner().invoke(main, ["predict", "--model", str(root / "m.pt"), "--weights-path", str(elsewhere),
                                      "--format", "json", str(photos(root)[0])])
        assert r.exit_code == 0 and json.loads(r.stdout)[0]["confidence"] == round(expected[0].confidence, 6)
        found = Predictor.load(root / "m.pt", search_path=[elsewhere]).predict(photos(root)[:4])
        monkeypatch.setenv("FEATPIPE_CACHE_HOME", str(tmp_path / "empty-home-3"))
        monkeypatch.setenv("FEATPIPE_WEIGHTS_PATH", str(elsewhere))
        by_env = Predictor.load(root / "m.pt").predict(photos(root)[:4])
    finally:
        (elsewhere / "renamed.pth").rename(root / "weights.pth")
    assert [p.confidence for p in found] == [p.confidence for p in expected] == [p.confidence for p in by_env]


def test_a_bundle_runs_where_the_dataset_cache_and_weights_are_not(trained, tmp_path, monkeypatch):
    from featpipe import Predictor
    from featpipe.workflows.bundle import BundleError, write_bundle

    root, cache = trained
    source = Predictor.load(root / "m.pt")
    images = {p.name: p.read_bytes() for p in photos(root)[:8]}
    expected = source.predict(list(images.values()))
    expected_similar = source.similar(int(cache.ids[3]), k=4, where={"gender": "men"})
    r = CliRunner().invoke(main, ["bundle", "--model", str(root / "m.pt"), "--out", str(tmp_path / "made")])
    assert r.exit_code == 0, r.output
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(root / "m.pt", tmp_path / "made")
    moved = shutil.copytree(tmp_path / "made", tmp_path / "elsewhere" / "bundle")
    hidden = root.rename(root.with_name(root.name + "-hidden"))  # dataset, cache, weights and model all gone
    try:
        monkeypatch.setenv("FEATPIPE_CACHE_HOME", str(tmp_path / "fresh-home"))
        monkeypatch.delenv("FEATPIPE_WEIGHTS_PATH", raising=False)
        bundled = Predictor.load(moved)
        got = bundled.predict(list(images.values()))
        got_similar = bundled.similar(int(cache.ids[3]), k=4, where={"gender": "men"})
        one = tmp_path / "one.jpg"
        one.write_bytes(next(iter(images.values())))
        r = CliRunner().invoke(main, ["predict", "--model", str(moved), "--format", "json", str(one)])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)[0]["confidence"] == round(expected[0].confidence, 6)
    finally:
        hidden.rename(root)
    assert [(p.label, p.confidence, p.decision) for p in got] == [(p.label, p.confidence, p.decision) for p in expected]
    assert [h["id"] for h in got_similar] == [h["id"] for h in expected_similar]
    assert int(cache.ids[3]) not in [h["id"] for h in got_similar]  # the query item itself is left out
    binary = next((moved / "networks").glob("*/model.bin"))
    data = bytearray(binary.read_bytes())
    data[len(data) // 2] ^= 0xFF
    binary.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="damaged"):
        Predictor.load(moved)


def test_batcher_gathers_concurrent_requests_and_refuses_when_full():
    from featpipe.service.batching import MicroBatcher, Overloaded

    seen: list[int] = []

    def run(items):
        seen.append(len(items))
        time.sleep(0.05)
        return [x * 10 for x in items]

    async def scenario():
        batcher = MicroBatcher(run, max_batch=4, window=0.02, max_queue=6, timeout=5)
        await batcher.start()
        answers = await asyncio.gather(*(batcher.submit([i]) for i in range(6)))
        with pytest.raises(Overloaded):
            await asyncio.gather(*(batcher.submit([i]) for i in range(8)))
        slow = MicroBatcher(lambda items: time.sleep(0.5) or items, timeout=0.1)
        await slow.start()
        with pytest.raises(TimeoutError):
            await slow.submit([1])
        await batcher.stop()
        await slow.stop()
        return answers

    answers = asyncio.run(scenario())
    assert answers == [[i * 10] for i in range(6)]
    assert max(seen) > 1 and max(seen) <= 4  # gathered, within the batch limit


@pytest.fixture
def server(trained):
    """`featpipe serve` in its own process on a free port, with small limits; yields its URL."""
    root, _ = trained
    cmd = [sys.executable, "-c", "from featpipe.cli import main; main()", "serve", "--model", str(root / "m.pt"),
           "--port", "0", "--max-upload-mb", "0.2", "--max-pixels", "250000", "--drain", "5"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    url = None
    deadline = time.monotonic() + 180
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        line = proc.stderr.readline()
        found = re.search(r"featpipe serve: (http://\S+)", line)
        url = found.group(1) if found else None
    assert url, f"the server did not start (exit {proc.poll()})"
    yield url, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_the_service_answers_over_http_as_predict_does_and_refuses_bad_uploads(trained, server):
    import httpx

    from featpipe import Predictor

    root, cache = trained
    url, proc = server
    predictor = Predictor.load(root / "m.pt")
    expected = predictor.predict(photos(root)[:3], top_k=2)
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health").json()["status"] == "ok"
        info = client.get("/model").json()
        assert info["classes"] == predictor.classes and info["threshold"] == predictor.describe()["threshold"]
        files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in photos(root)[:3]]
        r = client.post("/predict", files=files, params={"top_k": 2})
        assert r.status_code == 200, r.text
        rows = r.json()["predictions"]
        assert [(x["label"], x["decision"], x["confidence"], x["top_k"]) for x in rows] == [
            (p.label, p.decision, round(p.confidence, 6), [{"label": c, "p": round(v, 6)} for c, v in p.top_k])
            for p in expected]

        good = photos(root)[0].read_bytes()
        bomb = io.BytesIO()
        Image.new("L", (1000, 1000)).save(bomb, format="PNG")  # a million pixels in a tiny file; limit 250,000
        noisy = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(noisy, "PNG")
        bad = {"not an image": (b"hello, not a photo", 422), "truncated": (good[: len(good) // 2], 422),
               "bomb": (bomb.getvalue(), 422), "too large": (noisy.getvalue(), 413), "empty": (b"", 422)}
        for name, (body, status) in bad.items():
            r = client.post("/predict", files=[("files", (f"{name}.jpg", body, "image/jpeg"))])
            assert r.status_code == status, (name, r.status_code, r.text)
            detail = r.json()["detail"]
            assert isinstance(detail, str) and "\n" not in detail and detail, (name, detail)
        assert client.post("/predict").status_code == 422  # no file at all
        assert "over the limit" in client.post("/predict", files=[("files", ("b.png", bomb.getvalue()))]).json()["detail"]

        r = client.post("/similar", data={"id": str(cache.ids[0]), "k": "3", "where": "gender=MEN"})
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        assert len(items) == 3 and int(cache.ids[0]) not in [i["id"] for i in items]
        assert all(i["gender"] == "Men" for i in items)
        r = client.post("/similar", data={"id": str(cache.ids[0]), "where": "gender=martian"})
        assert r.status_code == 400 and "Women" in r.json()["detail"]
        r = client.post("/similar", files=[("file", ("q.jpg", good, "image/jpeg"))], data={"k": "2"})
        assert r.status_code == 200 and r.json()["items"][0]["id"] == int(photos(root)[0].stem)
        assert client.post("/similar", data={"k": "2"}).status_code == 400
        # still serving after every refusal
        assert client.post("/predict", files=[("files", ("ok.jpg", good, "image/jpeg"))]).status_code == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
