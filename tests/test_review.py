"""The review loop: the decision journal, the review session, and the review page over a real socket and in a
real browser (Chromium driven by Selenium), killed and restarted mid-review."""
from __future__ import annotations

import csv
import http.client
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image
from click.testing import CliRunner

from conftest import train_small_model
from featpipe.cli import main

pytestmark = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("openvino", "fastapi", "httpx",
                                                                             "filelock")),
                                reason="needs the openvino and serve extras")
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model on a small synthetic catalogue and two shops' folders of photos to review: the catalogue's
    photos encoded again, as a seller's copies would be (the same bytes as a test image could not train)."""
    root = tmp_path_factory.mktemp("review")
    train_small_model(root)
    images = sorted((root / "data" / "images").glob("*.jpg"))
    for shop, part in (("shop-a", images[0:48:4]), ("shop-b", images[1:48:4])):
        (root / shop).mkdir()
        for p in part:
            with Image.open(p) as im:
                im.convert("RGB").save(root / shop / p.name, quality=85)
    return root


def folders(root: Path) -> list[str]:
    return [str(root / "shop-a"), str(root / "shop-b")]


# -- the journal and the session ---------------------------------------------------------------------------------
def test_the_journal_keeps_each_decision_once_across_writers_and_drops_a_torn_line(tmp_path):
    from featpipe.workflows.journal import DecisionJournal

    path = tmp_path / "r.journal.jsonl"
    one, two = DecisionJournal(path), DecisionJournal(path)  # two processes' views of one file
    ids = [f"d{i}" for i in range(40)]

    def write(journal, i):
        return journal.append({"id": ids[i % 40], "n": i})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: write(one if i % 2 else two, i), range(120)))
    lines = path.read_text().splitlines()
    assert sorted(json.loads(x)["id"] for x in lines) == sorted(ids)
    first, _ = two.append({"id": "d3", "n": -1})  # a retry: the first record stands
    assert first["n"] != -1 and len(path.read_text().splitlines()) == 40
    with open(path, "ab") as fh:
        fh.write(b'{"id":"half-writ')  # a writer killed mid-line: never acknowledged
    again = DecisionJournal(path)
    assert len(again.entries) == 40 and path.read_bytes().endswith(b"\n")
    again.append({"id": "after"})
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()][-1] == "after"
    with pytest.raises(Exception, match="decision id"):
        again.append({"id": "../../etc"})


def test_a_session_resumes_without_embedding_again_and_writes_what_fit_head_reads(trained, tmp_path, monkeypatch):
    from featpipe import Predictor
    from featpipe.labelled import read_labels
    from featpipe.workflows.review import ReviewSession

    root = trained
    predictor = Predictor.load(root / "m.pt")
    out = tmp_path / "reviews.csv"
    session = ReviewSession(predictor, folders(root), out)
    queue = session.queue("review", 50)
    assert len(queue) >= 8 and {q["source"] for q in queue} == {"shop-a", "shop-b"}
    a, b, c, d = (q["index"] for q in queue[:4])
    alone = predictor.predict([session.paths[a]])[0]  # the page suggests what `featpipe predict` says
    assert (queue[0]["suggestion"], queue[0]["confidence"], queue[0]["reason"]) == (
        alone.label, round(alone.confidence, 6), alone.reason)
    classes = predictor.classes
    session.decide("x1", a, "label", classes[0], reviewer="ana")
    session.decide("x2", b, "label", classes[1])
    session.decide("x3", b, "label", classes[2])  # a second look at b: the last decision wins
    session.decide("x4", c, "skip")
    session.decide("x5", d, "not_ours")
    assert session.decide("x1", a, "label", classes[2]) == (session.last[session.files[a]], False)  # a retry
    with pytest.raises(Exception, match="not one of the model's"):
        session.decide("x6", a, "label", "Martians")
    assert [q["index"] for q in session.queue("review", 50)][-1] == c  # skipped ones come last

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("embedded again")

    monkeypatch.setattr(predictor.pipeline, "embed", no_forward_pass)
    resumed = ReviewSession(predictor, folders(root), out)  # as a second process on the same --out would
    session.decide("x7", d, "label", classes[1])
    assert d not in resumed.labels()
    resumed.sync()
    assert resumed.labels()[d] == classes[1]
    session.decide("x8", d, "not_ours")
    resumed.sync()
    assert resumed.labels() == {a: classes[0], b: classes[2]}
    assert [q["index"] for q in resumed.queue("review", 3)] == [q["index"] for q in session.queue("review", 3)]
    labels = read_labels(out, session.label_root)  # the csv names photos under the folder holding them all
    assert [p.resolve() for p in labels.paths] == [session.paths[a].resolve(), session.paths[b].resolve()]
    assert labels.labels == [classes[0], classes[2]]
    p = resumed.progress()
    assert (p["labelled"], p["skipped"], p["not_ours"], p["progressive"]["n"]) == (2, 1, 1, 2)


def test_overturned_spot_checks_switch_a_source_off_and_send_its_photos_to_review(trained, tmp_path):
    from featpipe import Predictor
    from featpipe.workflows.review import ReviewSession
    from featpipe.workflows.sources import SourceGate

    predictor = Predictor.load(trained / "m.pt")
    predictor.model.threshold = 0.0  # everything auto-tagged: a stand-in for a confident model
    gate = SourceGate(probation_rate=1.0)
    session = ReviewSession(predictor, folders(trained), tmp_path / "r.csv", gate=gate)
    assert session.queue("review", 100) == []
    spot = [q for q in session.queue("spot", 100) if q["source"] == "shop-a"]
    assert spot and all(q["status"] == "auto" for q in spot)
    n = 0
    for q in spot:  # every auto-tag of shop-a overturned
        wrong = next(c for c in predictor.classes if c != q["suggestion"])
        session.decide(f"s{n}", q["index"], "label", wrong)
        n += 1
        if not gate.allows_auto("shop-a")[0]:
            break
    assert not gate.allows_auto("shop-a")[0] and gate.allows_auto("shop-b")[0]
    status = gate.status("shop-a")
    assert (status["all_checks"], status["all_correct"], status["switch_offs"]) == (n, 0, 1)
    waiting = session.queue("review", 100)
    assert waiting and {q["source"] for q in waiting} == {"shop-a"} and all(q["reason"] for q in waiting)
    again = ReviewSession(predictor, folders(trained), tmp_path / "r.csv", gate=SourceGate(probation_rate=1.0))
    assert not again.gate.allows_auto("shop-a")[0]  # the gate is rebuilt from the journal


# -- the page over a real socket ---------------------------------------------------------------------------------
def start_review(root: Path, out: Path, photos: list[str] | None = None) -> tuple[str, subprocess.Popen]:
    """`featpipe review` in its own process on a free port; (its URL with the token, the process)."""
    cmd = [sys.executable, "-c", "from featpipe.cli import main; main()", "review", "--model", str(root / "m.pt"),
           *(photos or folders(root)), "--out", str(out), "--port", "0", "--cv-folds", "2"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    url, deadline = None, time.monotonic() + 180
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"featpipe review: (http://\S+)", proc.stderr.readline())
        url = found.group(1) if found else None
    assert url, f"the review server did not start (exit {proc.poll()})"
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain, so the server never blocks on it
    return url, proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@pytest.fixture
def server(trained, tmp_path):
    url, proc = start_review(trained, tmp_path / "reviews.csv")
    yield url, proc, tmp_path / "reviews.csv"
    stop(proc)


def split(url: str) -> tuple[str, str]:
    base, token = url.split("/?token=")
    return base, token


def test_the_page_refuses_requests_without_the_token_and_paths_that_leave_their_folder(trained, server, tmp_path):
    import httpx

    url, proc, out = server
    base, token = split(url)
    outside = tmp_path / "secret.jpg"
    shutil.copy(next((trained / "shop-a").glob("*.jpg")), outside)
    with httpx.Client(base_url=base, timeout=60) as client:
        assert client.get("/").status_code == 200  # the page itself: it reads the token from its URL
        assert client.get("/static/review.js").status_code == 200
        decision = {"id": "t1", "index": 0, "kind": "skip"}
        for headers in ({}, {"X-Review-Token": "wrong"}):
            for method, path in (("POST", "/api/decisions"), ("POST", "/api/retrain"), ("GET", "/api/state"),
                                 ("GET", "/photo/0"), ("GET", "/reviews.csv")):
                r = client.request(method, path, headers=headers, json=decision if method == "POST" else None)
                assert r.status_code == 403 and "token" in r.json()["detail"], (path, headers, r.text)
        assert not (out.with_name(out.name + ".journal.jsonl")).exists() or "t1" not in out.with_name(
            out.name + ".journal.jsonl").read_text()
        good = {"X-Review-Token": token}
        assert client.get("/photo/0", headers=good).status_code == 200
        assert client.get("/photo/0", params={"token": token}).status_code == 200  # as <img src> asks
        assert client.get("/photo/9999", headers=good).status_code == 404
        assert client.get("/photo/..%2F..%2Fetc%2Fpasswd", headers=good).status_code in (404, 422)  # an index only
        catalogue = client.get("/catalogue/1000.jpg", headers=good)
        assert catalogue.status_code == 200 and catalogue.content[:2] == b"\xff\xd8"

    def raw(path: str) -> tuple[int, str]:
        """A request line exactly as given: clients would normalise '..' away before sending it."""
        conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=30)
        conn.request("GET", path, headers={"X-Review-Token": token})
        r = conn.getresponse()
        body = r.read().decode(errors="replace")
        conn.close()
        return r.status, body

    for path in ("/catalogue/../../../etc/passwd", "/catalogue/..%2F..%2Fweights.pth", "/catalogue/%2Fetc%2Fpasswd",
                 "/catalogue//etc/passwd", "/static/../review_app.py", "/static/..%2F..%2Fcli.py",
                 "/static/%2Fetc%2Fpasswd"):
        status, body = raw(path)
        assert status in (403, 404) and "root:" not in body and "import" not in body, (path, status, body)
    assert raw("/catalogue/..%2F..%2Fweights.pth")[0] == 403
    assert raw("/catalogue/%2Fetc%2Fpasswd")[0] == 403
    assert raw("/catalogue/9999999.jpg")[0] == 404

    # a symbolic link inside a served folder that points outside it
    link = trained / "data" / "images" / "link-out.jpg"
    link.symlink_to(outside)
    try:
        assert raw("/catalogue/link-out.jpg")[0] == 403
    finally:
        link.unlink()
    assert raw("/api/state")[0] == 200  # still serving after every refusal


def test_a_photo_linked_from_outside_its_folder_is_not_served(trained, tmp_path):
    import httpx

    shop = tmp_path / "shop-c"
    shop.mkdir()
    shutil.copy(next((trained / "shop-a").glob("*.jpg")), shop / "inside.jpg")
    (tmp_path / "private").mkdir()
    shutil.copy(next((trained / "shop-b").glob("*.jpg")), tmp_path / "private" / "secret.jpg")
    (shop / "sneaky.jpg").symlink_to(tmp_path / "private" / "secret.jpg")
    url, proc = start_review(trained, tmp_path / "r.csv", [str(shop)])
    try:
        base, token = split(url)
        with httpx.Client(base_url=base, headers={"X-Review-Token": token}, timeout=60) as client:
            names = {q["name"]: q["index"] for q in client.get("/api/queue", params={"limit": 10}).json()["items"]}
            assert client.get(f"/photo/{names['inside.jpg']}").status_code == 200
            r = client.get(f"/photo/{names['sneaky.jpg']}")
            assert r.status_code == 403 and "outside" in r.json()["detail"]
    finally:
        stop(proc)


def test_remote_binding_needs_allow_remote(trained, tmp_path):
    r = CliRunner().invoke(main, ["review", "--model", str(trained / "m.pt"), str(trained / "shop-a"),
                                  "--out", str(tmp_path / "r.csv"), "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "--allow-remote" in r.output


def test_fifty_concurrent_decisions_are_each_recorded_once(trained, server):
    import httpx

    url, proc, out = server
    base, token = split(url)
    headers = {"X-Review-Token": token}
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        items = client.get("/api/queue", params={"limit": 50}).json()["items"]
        classes = client.get("/api/state").json()["classes"]
    decisions = [{"id": uuid.uuid4().hex, "index": items[i % len(items)]["index"], "kind": "label",
                  "label": classes[i % len(classes)]} for i in range(50)]

    def post(d):
        with httpx.Client(base_url=base, headers=headers, timeout=60) as c:
            return c.post("/api/decisions", json=d).json()["recorded"]

    with ThreadPoolExecutor(50) as pool:
        first = list(pool.map(post, decisions))
        again = list(pool.map(post, decisions))  # every one retried, as a client whose answer was lost would
    assert all(first) and not any(again)
    lines = [json.loads(x) for x in out.with_name(out.name + ".journal.jsonl").read_text().splitlines()]
    assert sorted(x["id"] for x in lines) == sorted(d["id"] for d in decisions)
    rows = out.read_text().splitlines()[1:]
    assert len(rows) == len({d["index"] for d in decisions})  # one label per photo, the last one


def test_retrain_from_the_page_reranks_the_queue_and_compares_old_and_new(trained, server):
    import httpx

    url, proc, out = server
    base, token = split(url)
    with httpx.Client(base_url=base, headers={"X-Review-Token": token}, timeout=60) as client:
        state = client.get("/api/state").json()
        old_digest = state["progress"]["model"]["digest"]
        assert state["retrain_command"].startswith("featpipe fit-head --cache ")
        assert f"--labelled {out}" in state["retrain_command"]
        for i, item in enumerate(client.get("/api/queue", params={"limit": 6}).json()["items"]):
            client.post("/api/decisions", json={"id": f"r{i}", "index": item["index"], "kind": "label",
                                                "label": item["suggestion"]})
        assert client.post("/api/retrain").status_code == 200
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            job = client.get("/api/state").json()["retrain"]
            if job["state"] in ("done", "failed"):
                break
            time.sleep(1)
        assert job["state"] == "done", job
        result = job["result"]
        assert result["reviewed"] == 6 and result["folds"] == 2
        assert 0 <= result["new_cv_accuracy"] <= 1 and result["old_accuracy"] == 1.0
        assert client.get("/api/state").json()["progress"]["model"]["digest"] != old_digest
        assert Path(result["model"]).is_file()
        assert client.get("/api/queue").status_code == 200
    # the command the page shows trains the same head from the reviews csv
    command = shlex.split(state["retrain_command"])
    assert command[:2] == ["featpipe", "fit-head"]
    r = CliRunner().invoke(main, command[1:])
    assert r.exit_code == 0, r.output
    assert f"labelled photos: {out} (6 photos) x 10" in r.output
    assert f"test accuracy {result['new_test_accuracy']:.4f}" in r.output


# -- a real browser ----------------------------------------------------------------------------------------------
@pytest.fixture
def browser():
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_a_browser_labels_with_the_keyboard_and_every_acknowledged_decision_survives_a_kill(trained, tmp_path,
                                                                                          browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out = tmp_path / "reviews.csv"
    url, proc = start_review(trained, out)
    wait = WebDriverWait(browser, 60)

    def current() -> str:
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-current"))
        return browser.find_element(By.TAG_NAME, "body").get_attribute("data-current")

    files: dict[int, str] = {}  # photo index -> its file as the csv names it, as the page showed it

    def press(key: str) -> tuple[int, str]:
        """Press 1/2/3 on the photo shown; the photo and the label it stood for, once the page says saved."""
        index = current()
        files[int(index)] = browser.find_element(By.ID, "photo").get_attribute("data-file")
        label = browser.find_element(By.CSS_SELECTOR, f"#top button:nth-child({key})").get_attribute("data-label")
        saved = int(browser.find_element(By.ID, "message").get_attribute("data-saved") or 0)
        browser.find_element(By.TAG_NAME, "body").send_keys(key)
        wait.until(lambda d: int(d.find_element(By.ID, "message").get_attribute("data-saved") or 0) == saved + 1)
        return int(index), label

    try:
        browser.get(url)
        clicked = [press(k) for k in "12312"]
        assert len({i for i, _ in clicked}) == 5
        if os.environ.get("FEATPIPE_SCREENSHOT_DIR"):
            folder = Path(os.environ["FEATPIPE_SCREENSHOT_DIR"])
            folder.mkdir(parents=True, exist_ok=True)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#similar img"))
            browser.save_screenshot(str(folder / "review.png"))
        browser.refresh()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#recent li")) == 5)
        recorded = [(int(li.get_attribute("data-index")), li.get_attribute("data-label"))
                    for li in browser.find_elements(By.CSS_SELECTOR, "#recent li")]
        assert recorded[::-1] == clicked
        assert current() not in {str(i) for i, _ in clicked}

        base, token = split(url)
        assert exported(out) == sorted((files[i], label) for i, label in clicked)
        assert _get(base, token, "/reviews.csv") == out.read_text()  # the page's download is the file
        waiting = json.loads(_get(base, token, "/api/queue?limit=500"))["items"]
        assert not {i for i, _ in clicked} & {q["index"] for q in waiting}

        # a second tab sees the same queue
        first_tab, shown = browser.current_window_handle, current()
        browser.switch_to.new_window("tab")
        browser.get(url)
        assert current() == shown
        browser.switch_to.window(first_tab)

        # SIGKILL mid-review: what the page acknowledged is in the journal, once, after a restart
        more = [press(k) for k in "21"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        url2, proc = start_review(trained, out)
        base2, token2 = split(url2)
        journal = [json.loads(x) for x in out.with_name(out.name + ".journal.jsonl").read_text().splitlines()]
        acknowledged = clicked + more
        assert len(journal) == len(acknowledged) == len({e["id"] for e in journal})
        state = json.loads(_get(base2, token2, "/api/state"))
        assert state["progress"]["labelled"] == 7
        assert sorted((e["index"], e["label"]) for e in state["recent"]) == sorted(acknowledged)
        assert exported(out) == sorted((files[i], label) for i, label in acknowledged)
        browser.get(url2)
        assert int(current()) not in {i for i, _ in acknowledged}
    finally:
        stop(proc)


def exported(out: Path) -> list[tuple[str, str]]:
    """(file, label) of each row of a reviews csv, as fit-head --labelled reads them."""
    with open(out, newline="") as fh:
        return sorted((row["file"], row["articleType"]) for row in csv.DictReader(fh))


def _get(base: str, token: str, path: str) -> str:
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=30)
    conn.request("GET", path, headers={"X-Review-Token": token})
    body = conn.getresponse().read().decode()
    conn.close()
    return body
