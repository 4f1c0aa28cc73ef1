"""featpipe review on a large queue: how long its first page takes once the photos' predictions exist.

    python bench/review_load.py --model runs/mobilenet_v2+efficientnet_lite0-batchnorm.pt [--photos 10000]

Writes `--photos` small synthetic JPEGs (once, into --work), starts `featpipe review` on them (the first start
embeds every photo and stores features, predictions and the queue's order beside the reviews csv), stops it, starts
it again with the same --out (a run after the first finds them stored both times), and times what a browser asks
for to show its first photo: the page, its script, the state, the queue and the first photo. Prints each start's
seconds and the first page's, per request and in all (the median of --repeat loads).
"""
from __future__ import annotations

import argparse
import http.client
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

FEATPIPE = [sys.executable, "-c", "from featpipe.cli import main; main()"]


def make_photos(folder: Path, n: int, seed: int = 0) -> None:
    """n 64x64 JPEGs of a random colour with a random band; kept between runs."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == n:
        return
    rng = np.random.default_rng(seed)
    for i in range(n):
        colour, band = rng.integers(0, 256, 3), rng.integers(0, 48)
        arr = np.clip(colour + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
        arr[band:band + 16] = 255 - arr[band:band + 16]
        Image.fromarray(arr).save(folder / f"{i:05d}.jpg", quality=85)


def start(model: str, photos: Path, out: Path) -> tuple[subprocess.Popen, str, str, float]:
    """`featpipe review` on a free port: (process, host:port, token, seconds until it announced its URL)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([*FEATPIPE, "review", "--model", model, str(photos), "--out", str(out), "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        found = re.search(r"featpipe review: http://(\S+)/\?token=(\S+)", proc.stderr.readline())
        if found:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, found.group(1), found.group(2), time.perf_counter() - t0
    raise SystemExit(f"featpipe review exited with {proc.returncode}")


def first_page(address: str, token: str) -> dict[str, float]:
    """Seconds for each request the page makes before its first photo is on screen, on one connection."""
    conn = http.client.HTTPConnection(address, timeout=60)
    seconds, first = {}, None
    for path in ("/", "/static/review.js", "/api/state", "/api/queue?tab=review&limit=20", "photo"):
        if path == "photo":
            path = f"/photo/{first}"
        t0 = time.perf_counter()
        conn.request("GET", path, headers={"X-Review-Token": token})
        r = conn.getresponse()
        body = r.read()
        seconds[path.split("?")[0]] = time.perf_counter() - t0
        if r.status != 200:
            raise SystemExit(f"GET {path}: {r.status} {body[:200]!r}")
        if path.startswith("/api/queue"):
            first = int(re.search(rb'"index":(\d+)', body).group(1))
    conn.close()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--photos", type=int, default=10_000)
    ap.add_argument("--work", type=Path, default=Path("runs/review-load"))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    photos, out = args.work / "photos", args.work / "reviews.csv"
    t0 = time.perf_counter()
    make_photos(photos, args.photos)
    print(f"{args.photos} photos in {photos} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    for _ in range(2):
        stored = (out.with_name(out.name + ".state") / "features.npz").is_file()
        run = "start with stored predictions" if stored else "start without stored predictions (embeds, orders)"
        proc, address, token, started = start(args.model, photos, out)
        try:
            loads = [first_page(address, token) for _ in range(args.repeat)]
        finally:
            proc.kill()
            proc.wait(10)
        total = statistics.median(sum(x.values()) for x in loads)
        parts = ", ".join(f"{k} {statistics.median(x[k] for x in loads) * 1000:.0f} ms" for k in loads[0])
        print(f"{run}: ready in {started:.1f} s; first page {total * 1000:.0f} ms (median of {args.repeat}: {parts})")


if __name__ == "__main__":
    main()
