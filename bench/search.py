"""Similar-product retrieval on a real cache: test images query the train+val catalogue.

precision@10 = share of the 10 neighbours with the query's label; recall@10 of HNSW = share of the
exact top-10 it also returns; latency per query, single and batched, exact and approximate; search
in raw backbone features and in a trained batchnorm head's hidden layer.

    python bench/search.py --cache-dir cache --backbone mobilenet_v2
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.base import clone

from featpipe.comparators import candidates
from featpipe.harness import Splits, fit_estimator
from featpipe.search import SimilarityIndex, precision_at_k, recall_at_k
from featpipe.store import find_cache, open_cache


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def bench_space(name: str, catalogue: np.ndarray, cat_labels: np.ndarray, queries: np.ndarray, q_labels: np.ndarray,
                k: int, singles: int) -> list[dict]:
    index = SimilarityIndex(catalogue)
    exact, exact_s = timed(index.exact, queries, k)
    single_exact = timed(lambda: [index.exact(queries[i:i + 1], k) for i in range(singles)])[1] / singles
    with tempfile.TemporaryDirectory() as tmp:
        _, build_s = timed(index.build_approximate, Path(tmp) / "index.hnsw")
    approx, approx_s = timed(index.approximate, queries, k)
    single_approx = timed(lambda: [index.approximate(queries[i:i + 1], k) for i in range(singles)])[1] / singles
    p_exact = precision_at_k(exact.rows, q_labels, cat_labels)
    return [
        {"space": name, "search": "exact (normalised matrix product)", "precision@10": p_exact, "recall@10 vs exact": 1.0,
         "single query ms": 1000 * single_exact, "batched ms/query": 1000 * exact_s / len(queries), "build s": 0.0},
        {"space": name, "search": "HNSW (hnswlib, M=32, ef=128)", "precision@10": precision_at_k(approx.rows, q_labels, cat_labels),
         "recall@10 vs exact": recall_at_k(approx.rows, exact.rows), "single query ms": 1000 * single_approx,
         "batched ms/query": 1000 * approx_s / len(queries), "build s": build_s},
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--cache", default=None)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--singles", type=int, default=200, help="Queries timed one at a time.")
    args = ap.parse_args()
    cache = open_cache(find_cache(args.cache_dir, args.backbone, args.cache))
    s = Splits.from_cache(cache)
    catalogue, cat_labels = np.concatenate([s.X_train, s.X_val]), np.concatenate([s.y_train, s.y_val])
    rows = bench_space("raw backbone features", catalogue, cat_labels, s.X_test, s.y_test, args.k, args.singles)
    head = clone(candidates(device="cpu")["batchnorm"]).set_params(members=1)  # embed reads one member
    fit_s = fit_estimator(head, s)
    rows += bench_space(f"batchnorm head hidden layer ({head.hidden}-d)", head.embed(catalogue), cat_labels,
                        head.embed(s.X_test), s.y_test, args.k, args.singles)
    print(f"# {cache.path.name}: {len(s.y_test)} test queries against {len(cat_labels)} train+val items, "
          f"k={args.k}; head trained in {fit_s:.0f} s on the train split")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) and c.startswith(("precision", "recall"))
                                else f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
