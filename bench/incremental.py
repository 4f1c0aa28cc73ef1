"""A catalogue that grows: update a full cache with new, changed and removed images, and its HNSW index.

A copy of the catalogue without `--new` held-out images is extracted from scratch (the base). Then the
held-out images come back, `--changed` images are rewritten (mirrored and re-encoded, as a seller's
re-upload) and `--removed` rows leave styles.csv. The update (`featpipe extract` on the same cache
folder) is timed in fresh processes, each on a fresh copy of the base cache, alternating round by round
with a fresh `featpipe extract` of a folder holding only the new and changed images ("alone": the same
extraction work with nothing to reuse). Then a from-scratch build of the grown catalogue is compared
with the updated cache, id by id, and the base cache's HNSW index (raw features) is updated with the
grown cache and scored by recall@10 against exact search on the test split's images as queries.

    python bench/incremental.py --data DATA --weights W --work runs/bench/incremental
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from featpipe.dataset import load_dataset
from featpipe.evaluate import markdown_table
from featpipe.search import SimilarityIndex, recall_at_k
from featpipe.store import find_cache, open_cache


def extract(args, data: Path, cache_dir: Path, *extra: str) -> tuple[float, str]:
    """A fresh `featpipe extract` process: (wall seconds, its summary line)."""
    cmd = [sys.executable, "-m", "featpipe.cli", "extract", "--data", str(data), "--weights", args.weights,
           "--cache-dir", str(cache_dir), "--no-progress", *extra]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return time.perf_counter() - t0, out


def write_styles(src: Path, dst: Path, keep) -> None:
    """styles.csv of `src` with only the rows whose id passes `keep` (the header always)."""
    lines = src.read_text(encoding="utf-8").splitlines()
    body = [line for line in lines[1:] if keep(line.split(",", 1)[0].strip())]
    dst.write_text("\n".join([lines[0], *body]) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--work", default="runs/bench/incremental")
    ap.add_argument("--new", type=int, default=500)
    ap.add_argument("--changed", type=int, default=20)
    ap.add_argument("--removed", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    src, work = Path(args.data), Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    data = work / "data"
    shutil.copytree(src, data)
    full = load_dataset(src)
    # drawn from classes of 200+ images, so that holding them back pushes no class under --min-per-class
    # (whose images would then come back as new too)
    counts = np.bincount(full.labels)
    ids = full.ids[counts[full.labels] >= 200]
    rng = np.random.default_rng(args.seed)
    picked = rng.choice(ids, args.new + args.changed + args.removed, replace=False)
    new, changed, removed = (set(map(str, p)) for p in np.split(picked, [args.new, args.new + args.changed]))

    write_styles(src / "styles.csv", data / "styles.csv", lambda i: i not in new)
    base_s, base_line = extract(args, data, work / "base")
    base_path = find_cache(work / "base", "mobilenet_v2")
    print(f"# base ({len(full) - args.new} catalogue images): {base_line} (wall {base_s:.1f} s)")

    # the catalogue grows: new rows come back, changed images are re-uploaded, removed rows and files go
    write_styles(src / "styles.csv", data / "styles.csv", lambda i: i not in removed)
    for i in changed:
        path = data / "images" / f"{i}.jpg"
        with Image.open(path) as img:
            mirrored = img.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path.unlink()  # a new file, as an upload would be: never the bytes the copy shares with anything
        mirrored.save(path, quality=90)
    for i in removed:
        (data / "images" / f"{i}.jpg").unlink(missing_ok=True)
    alone = work / "alone-data"
    (alone / "images").mkdir(parents=True)
    write_styles(data / "styles.csv", alone / "styles.csv", lambda i: i in new | changed)
    for i in new | changed:
        shutil.copy2(data / "images" / f"{i}.jpg", alone / "images")

    rows, update_line = [], ""
    for r in range(args.rounds):
        cache_dir = work / f"update-{r}"
        shutil.copytree(work / "base", cache_dir)
        t_update, update_line = extract(args, data, cache_dir)
        t_alone, alone_line = extract(args, alone, work / f"alone-{r}", "--min-per-class", "1")
        done = int(re.search(r"(\d+) images extracted", update_line).group(1))
        alone_n = int(re.search(r"(\d+) images extracted", alone_line).group(1))
        rows.append({"round": r + 1, "update_wall_s": round(t_update, 2), "update_extracted": done,
                     "alone_wall_s": round(t_alone, 2), "alone_extracted": alone_n,
                     "update_over_alone": round(t_update / t_alone, 3)})
    print(f"# update: {update_line}")
    print(f"# alone: {alone_line}")
    print()
    print(markdown_table(rows))
    ratios = [r["update_over_alone"] for r in rows]
    print()
    print(f"Median update / alone: {np.median(ratios):.3f} (update {np.median([r['update_wall_s'] for r in rows]):.2f} s, "
          f"alone {np.median([r['alone_wall_s'] for r in rows]):.2f} s; both fresh processes, start-up included)")

    scratch_s, scratch_line = extract(args, data, work / "scratch")
    print(f"# from scratch on the grown catalogue: {scratch_line} (wall {scratch_s:.1f} s)")
    updated = open_cache(find_cache(work / "update-0", "mobilenet_v2"))
    scratch = open_cache(find_cache(work / "scratch", "mobilenet_v2"))
    base = open_cache(base_path)
    same_ids = np.array_equal(updated.ids, scratch.ids)
    equal = same_ids and np.array_equal(updated.features, scratch.features)
    differing = int((~(updated.features == scratch.features).all(1)).sum()) if same_ids else -1
    common, at_base, at_updated = np.intersect1d(base.ids, updated.ids, return_indices=True)
    kept_split = bool(np.array_equal(base.split[at_base], updated.split[at_updated]))
    reused = np.isin(common, [int(i) for i in changed], invert=True)
    reused_equal = bool(np.array_equal(base.features[at_base][reused], updated.features[at_updated][reused]))
    print()
    print(markdown_table([{
        "check": "updated cache == from-scratch build of the grown catalogue (same ids, features bit-equal)",
        "result": f"{equal} ({len(updated.ids)} rows; {differing} rows differ)"},
        {"check": "split of every image of the base unchanged by the update",
         "result": f"{kept_split} ({len(common)} images)"},
        {"check": "features of reused images are the base's bytes",
         "result": f"{reused_equal} ({int(reused.sum())} images)"}]))

    # the HNSW index of the base, updated item by item with the grown cache
    index_path = work / "base.raw.hnsw"
    t0 = time.perf_counter()
    SimilarityIndex(base.features, base.ids).build_approximate(index_path)
    build_s = time.perf_counter() - t0
    grown = SimilarityIndex(updated.features, updated.ids)
    t0 = time.perf_counter()
    update = grown.build_approximate(index_path)
    update_s = time.perf_counter() - t0
    queries = updated.features[updated.split == 2].astype(np.float32)
    exact = grown.exact(queries, 10)
    approx = grown.approximate(queries, 10)
    fresh = SimilarityIndex(updated.features, updated.ids)
    fresh.build_approximate()
    print()
    print(markdown_table([{
        "index": "base, built", "items": len(base.ids), "seconds": round(build_s, 2), "recall_at_10": "",
    }, {
        "index": f"updated ({update.added} added, {update.changed} changed, {update.removed} deleted)",
        "items": len(updated.ids), "seconds": round(update_s, 2),
        "recall_at_10": round(recall_at_k(approx.rows, exact.rows), 4),
    }, {
        "index": "grown catalogue, built from scratch", "items": len(updated.ids), "seconds": "",
        "recall_at_10": round(recall_at_k(fresh.approximate(queries, 10).rows, exact.rows), 4),
    }]))
    print()
    print(f"Recall@10 against exact cosine search, {len(queries)} test-split images as queries; {update}. "
          "Index seconds include saving it.")


if __name__ == "__main__":
    main()
