"""featpipe serve and the loaded predictor: cold start, latency, throughput under concurrency, a soak with
malformed uploads, and a bundle served from another folder with the dataset, cache and weights hidden.

    python bench/serve.py --model runs/mobilenet_v2+efficientnet_lite0-batchnorm.pt \
        --data ../shared/data/fashion-product-images-small --labels ../shared/data/other-shops/labels.csv

Everything runs on 127.0.0.1 with request loops bounded in count and time. Each server is `featpipe serve`
in its own process; clients are threads with one keep-alive connection each, sending pre-encoded bodies.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

FEATPIPE = [sys.executable, "-c", "from featpipe.cli import main; main()"]
UPLOAD_MB = 4  # the soak's server limit (--max-upload-mb): its 'too large' uploads are just over it


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class Client:
    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post(self, body: bytes, ctype: str) -> tuple[int, dict]:
        for attempt in range(2):  # a connection the server closed (after a 413) is opened again
            try:
                self.conn.request("POST", "/predict", body, {"Content-Type": ctype})
                r = self.conn.getresponse()
                payload = r.read()
                if r.getheader("connection", "").lower() == "close":
                    self.conn.close()
                return r.status, json.loads(payload or b"{}")
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                if attempt:
                    raise
        raise AssertionError("unreachable")


def start_server(cmd: list[str], env: dict, cwd: str | None = None) -> tuple[subprocess.Popen, int, float]:
    """A `featpipe serve ... --port 0` command line started: (process, port, seconds to its first answer)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    port = None
    while port is None:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise SystemExit(f"featpipe serve exited with {proc.returncode}")
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        port = int(m.group(1)) if m else None
    threading.Thread(target=lambda: proc.stderr.read(), daemon=True).start()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/health")
    conn.getresponse().read()
    return proc, port, time.perf_counter() - t0


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def malformed(good: list[bytes], rng: random.Random, limit: int) -> list[tuple[str, bytes, int]]:
    """(kind, body, expected status): truncated, not an image, too large, a decompression bomb."""
    bomb = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(bomb, format="PNG")  # 100 MP of zeros in a small file
    big = np.random.default_rng(0).integers(0, 255, limit + 1024, dtype=np.uint8).tobytes()
    cut = rng.choice(good)
    return [("truncated", cut[: len(cut) // 2], 422), ("not an image", b"%PDF-1.4 not a photo" * 20, 422),
            ("too large", big, 413), ("decompression bomb", bomb.getvalue(), 422)]


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q))


def run_clients(port: int, jobs: list, clients: int, seconds: float, max_requests: int) -> list[tuple]:
    """`clients` threads take jobs (name, body, ctype, expected) round-robin until `seconds` or `max_requests`."""
    results: list[tuple] = []
    lock = threading.Lock()
    counter = iter(range(max_requests))
    deadline = time.perf_counter() + seconds

    def work() -> None:
        client = Client(port)
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            name, body, ctype, expected = jobs[i % len(jobs)]
            t = time.perf_counter()
            status, payload = client.post(body, ctype)
            with lock:
                results.append((name, status, payload, time.perf_counter() - t, expected))

    threads = [threading.Thread(target=work) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--labels", type=Path, default=None, help="other-shops labels.csv: its photos join the pool")
    ap.add_argument("--photos", type=int, default=512, help="photos in the pool (and in predict DIR's folder)")
    ap.add_argument("--latency-requests", type=int, default=300)
    ap.add_argument("--load-seconds", type=float, default=30)
    ap.add_argument("--soak-seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args()
    rng = random.Random(0)
    work = Path(tempfile.mkdtemp(prefix="featpipe-serve-bench-"))
    catalogue = sorted((args.data / "images").glob("*.jpg"))
    pool = rng.sample(catalogue, args.photos)
    if args.labels and args.labels.is_file():
        pool = pool[: args.photos * 3 // 4] + sorted(args.labels.parent.joinpath("images").glob("*"))[: args.photos // 4]
    folder = work / "photos"
    folder.mkdir()
    for i, p in enumerate(pool):
        shutil.copyfile(p, folder / f"{i:04d}{p.suffix.lower()}")
    files = sorted(folder.iterdir())
    print(f"{len(files)} photos ({len(files) - args.photos // 4 if args.labels else len(files)} catalogue, the rest "
          f"other shops' photos); model {args.model}; {os.cpu_count()} cores")
    print()

    # -- cold processes: an empty network store (conversion and compilation), then a warm one -----------------
    home = work / "home"
    env = os.environ | {"FEATPIPE_CACHE_HOME": str(home)}
    rows = []
    for label in ("empty network store (first run on a machine)", "networks cached (every later run)",
                  "networks cached (again)"):
        t = time.perf_counter()
        out = subprocess.run([*FEATPIPE, "predict", "--model", args.model, "--format", "json", str(files[0])],
                             env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        rows.append((label, time.perf_counter() - t))
    print("| `featpipe predict` of one photo, a fresh process | wall s |")
    print("|---|---|")
    for label, s in rows:
        print(f"| {label} | {s:.1f} |")
    print()

    # -- predict DIR's batch throughput, in one process, model loaded -----------------------------------------
    os.environ["FEATPIPE_CACHE_HOME"] = str(home)
    from featpipe import Predictor

    predictor = Predictor.load(args.model)
    predictor.predict(files[:8])
    t = time.perf_counter()
    expected = {Path(p.path).name: p.as_row() for p in predictor.predict(files)}
    batch_ips = len(files) / (time.perf_counter() - t)
    del predictor

    # -- one server: first answer, latency, throughput, soak --------------------------------------------------
    proc, port, first = start_server([*FEATPIPE, "serve", "--model", args.model, "--port", "0", "--max-upload-mb",
                                      str(UPLOAD_MB)], env)
    stop(proc)
    proc, port, again = start_server([*FEATPIPE, "serve", "--model", args.model, "--port", "0", "--max-upload-mb",
                                      str(UPLOAD_MB)], env)
    print(f"`featpipe serve`, networks cached: first answer {first:.1f} s after the process started the first time "
          f"(the catalogue embedded in the head's space, for /similar, and stored), {again:.1f} s the next time.")
    print()
    good = {f.name: f.read_bytes() for f in files}
    jobs = [(n, *multipart(n, b), 200) for n, b in good.items()]
    lat = [r[3] for r in run_clients(port, jobs, 1, 120, args.latency_requests)]
    load = run_clients(port, jobs, args.clients, args.load_seconds, 100_000)
    load_ips = len(load) / args.load_seconds
    assert all(r[1] == 200 for r in load)
    print("| measure | value |")
    print("|---|---|")
    print(f"| one client, one photo per request: p50 / p99 latency ({len(lat)} requests) | "
          f"{percentile(lat, 50) * 1000:.0f} ms / {percentile(lat, 99) * 1000:.0f} ms |")
    print(f"| {args.clients} concurrent clients: photos/s over {args.load_seconds:.0f} s | {load_ips:.1f} |")
    print(f"| `predict DIR` in one process ({len(files)} photos, model loaded): photos/s | {batch_ips:.1f} |")
    print(f"| {args.clients} clients / predict DIR | {load_ips / batch_ips:.0%} |")
    print()

    bad = malformed(list(good.values()), rng, UPLOAD_MB * 1024 * 1024)
    soak_jobs = []
    for i in range(200):  # 5% malformed, spread through the sequence
        if i % 20 == 7:
            kind, body, status = bad[(i // 20) % len(bad)]
            soak_jobs.append((kind, *multipart(f"{kind}.png", body), status))
        else:
            soak_jobs.append(jobs[rng.randrange(len(jobs))])
    before = rss_mb(proc.pid)
    soak = run_clients(port, soak_jobs, args.clients, args.soak_seconds, 1_000_000)
    after = rss_mb(proc.pid)
    good_r = [r for r in soak if r[4] == 200]
    bad_r = [r for r in soak if r[4] != 200]
    same = sum(r[1] == 200 and [r[2]["predictions"][0][k] for k in ("label", "confidence", "decision", "top_k")]
               == [expected[r[0]][k] for k in ("label", "confidence", "decision", "top_k")] for r in good_r)
    refused = sum(400 <= r[1] < 500 and r[1] == r[4] and "\n" not in r[2].get("detail", "\n") for r in bad_r)
    kinds = sorted({r[0] for r in bad_r})
    print(f"Soak: {args.clients} clients for {args.soak_seconds:.0f} s against a server with --max-upload-mb {UPLOAD_MB}, "
          f"one photo per request, 5% malformed "
          f"({', '.join(kinds)}).")
    print()
    print("| requests | good answered 200, equal to predict's (label, confidence, decision, top-k) | malformed "
          "refused with the expected 4xx and a one-line reason | server RSS after warm-up -> end |")
    print("|---|---|---|---|")
    print(f"| {len(soak)} | {same} of {len(good_r)} | {refused} of {len(bad_r)} | {before:.0f} MB -> {after:.0f} MB "
          f"({(after - before) / before:+.1%}) |")
    print()
    stop(proc)

    # -- the bundle, from another folder, the dataset, cache and weights out of reach ---------------------------
    bundle = work / "made" / "bundle"
    t = time.perf_counter()
    out = subprocess.run([*FEATPIPE, "bundle", "--model", args.model, "--out", str(bundle)], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    made = time.perf_counter() - t
    moved = Path(shutil.copytree(bundle, work / "elsewhere" / "copied-bundle"))
    shutil.rmtree(bundle.parent)
    fresh = {k: v for k, v in os.environ.items() if k != "FEATPIPE_WEIGHTS_PATH"} | {
        "FEATPIPE_CACHE_HOME": str(work / "fresh-home")}
    script = (f"mount -t tmpfs none {Path('../shared').resolve()} && mount -t tmpfs none {Path('cache').resolve()} "
              f"&& mount -t tmpfs none {Path(args.model).parent.resolve()} && exec \"$@\"")
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *FEATPIPE, "serve", "--model",
           str(moved), "--port", "0"]
    sproc, port, bundle_first = start_server(cmd, fresh, str(work / "elsewhere"))
    answers = run_clients(port, jobs, 4, 600, len(jobs))
    stop(sproc)
    same = sum(r[1] == 200 and r[2]["predictions"][0]["label"] == expected[r[0]]["label"]
               and r[2]["predictions"][0]["confidence"] == expected[r[0]]["confidence"] for r in answers)
    size = sum(p.stat().st_size for p in moved.rglob("*") if p.is_file()) / 1e6
    print(f"Bundle: written in {made:.0f} s ({size:.0f} MB), copied to another folder and served from there in a "
          "mount namespace where ../shared, the cache folder and the model's folder are empty, with an empty network "
          f"store (networks compiled on start): ready in {bundle_first:.1f} s; {same} of {len(answers)} photos "
          "answered with the same label and confidence as the model file.")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
