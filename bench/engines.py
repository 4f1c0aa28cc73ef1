"""The Ray engine against the local engine on the same images, and a projection for bigger clusters.

Both engines extract the same seeded subset (`--limit`) from scratch, in this process, rounds
alternating; the time is the extraction call's own (`ExtractSummary.seconds`: model load, actor start,
decoding, forward passes, shard writing), after the dataset scan. The Ray cluster is a local one
started once before the rounds (`ray.init(num_cpus=...)`), as a cluster is up before a job is sent to
it; its start-up is reported apart. The cost of the driver (receiving results and writing shards) is
timed by wrapping Journal.write; an actor's busy time per image is what its calls report.

    python bench/engines.py --data DATA --weights W --limit 2048 8192 --rounds 3
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from featpipe.evaluate import markdown_table
from featpipe.extract import extract
from featpipe.store import Journal, open_cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--limit", type=int, nargs="+", default=[2048])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=512)
    args = ap.parse_args()

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cluster_s = time.perf_counter() - t0

    driver = {"seconds": 0.0}
    write = Journal.write

    def timed_write(self, *a, **k):
        t = time.perf_counter()
        write(self, *a, **k)
        driver["seconds"] += time.perf_counter() - t

    Journal.write = timed_write
    rows, caches = [], {}
    work = Path(tempfile.mkdtemp(prefix="featpipe-engines-"))
    try:
        for limit in args.limit:
            for r in range(args.rounds):
                for engine in ("local", "ray"):
                    driver["seconds"] = 0.0
                    out = work / f"{engine}-{limit}-{r}"
                    s = extract(args.data, weights=args.weights, cache_dir=out, limit=limit, engine=engine,
                                shard_size=args.shard_size, progress=False)
                    busy = float(open_cache(s.cache).attrs["extract_seconds"])
                    rows.append({"images": s.done_now, "round": r + 1, "engine": engine, "seconds": round(s.seconds, 2),
                                 "images_per_s": round(s.images_per_s, 1),
                                 "busy_ms_per_image": round(1000 * busy / s.done_now, 3),
                                 "driver_write_ms_per_image": round(1000 * driver["seconds"] / s.done_now, 3)})
                    caches[engine, limit] = s.cache
    finally:
        Journal.write = write
        ray.shutdown()
    equal = {}
    for limit in args.limit:
        local, distributed = open_cache(caches["local", limit]), open_cache(caches["ray", limit])
        equal[limit] = bool(np.array_equal(local.ids, distributed.ids)
                            and np.array_equal(local.features, distributed.features))
    shutil.rmtree(work, ignore_errors=True)

    print(markdown_table(rows))
    for limit in args.limit:
        med = {e: float(np.median([x["images_per_s"] for x in rows if x["engine"] == e and x["images"] == limit]))
               for e in ("local", "ray")}
        print()
        print(f"{limit} images, median images/s: local {med['local']:.1f}, ray {med['ray']:.1f} "
              f"(ray / local = {med['ray'] / med['local']:.3f}); features of the two engines bit-equal: {equal[limit]}.")
    print()
    print(f"Local Ray cluster start-up ({args.cpus} CPUs), before the rounds and not counted: {cluster_s:.1f} s.")
    n = max(args.limit)
    ray_rows = [x for x in rows if x["engine"] == "ray" and x["images"] == n]
    busy = float(np.median([x["busy_ms_per_image"] for x in ray_rows])) / 1000
    drv = float(np.median([x["driver_write_ms_per_image"] for x in ray_rows])) / 1000
    ray_total = float(np.median([x["seconds"] for x in ray_rows]))
    fixed = max(ray_total - n * (busy + drv), 0.0)
    print()
    print("Projection for N CPU workers (one actor each, this machine's per-image costs): "
          "T(N) = t_fixed + n * c_actor / N + n * c_driver, with "
          f"c_actor = {1000 * busy:.2f} ms (an actor's busy time per image on {args.cpus} cores: decode + forward), "
          f"c_driver = {1000 * drv:.3f} ms (receiving a result and writing its shard, per image), "
          f"t_fixed = {fixed:.1f} s (Ray Data starts the actors while the driver loads and converts the network, which they then read; "
          "measured as the rest of the Ray run).")
    table = []
    for workers in (1, 2, 4, 8, 16, 64):
        for images in (41187, 1_000_000):
            t = fixed + images * busy / workers + images * drv
            table.append({"workers": workers, "images": images, "projected_s": round(t, 1),
                          "projected_images_per_s": round(images / t, 1)})
    print()
    print(markdown_table(table))
    print()
    print(f"The driver caps the cluster at 1 / c_driver = {1 / max(drv, 1e-9):,.0f} images/s. GPU actors: each "
          "decodes on the CPU cores it reserves while its GPU runs the forward pass, so one GPU actor gives about "
          "min(GPU forward rate, cores x images decoded per core-second); no GPU was lent to measure the first "
          "term, and the second is the decode rate of the extraction-throughput section.")


if __name__ == "__main__":
    main()
