"""The study's sweep on a real cache, against its arithmetic floor and against the study's way.

floor = FLOPs the sweep must do (forward + backward of each head over the training split, plus a
validation pass per epoch) / this machine's measured fp32 matrix-multiply rate.
study's way = the same sweep with the backbone's forward pass over the training and validation
images every epoch, at the per-image rate measured during extraction (cache attribute images_per_s).

    python bench/sweep.py --cache-dir cache --backbone mobilenet_v2
"""
from __future__ import annotations

import argparse
import time

import torch

from featpipe.devices import tune_cpu_allocator
from featpipe.harness import SWEEP_GRID, Splits, sweep
from featpipe.heads import head_flops
from featpipe.store import find_cache, open_cache


def matmul_rate(n: int = 2048, repeats: int = 10, lib: str = "torch") -> float:
    """fp32 GFLOP/s of a large square matrix product (torch: the library the heads train with)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    if lib == "numpy":
        a, b = a.numpy(), b.numpy()
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--heads", default="fc,batchnorm")
    args = ap.parse_args()
    tune_cpu_allocator()
    cache = open_cache(find_cache(args.cache_dir, args.backbone, args.cache))
    s = Splits.from_cache(cache)
    n_train, n_val, dim, n_cls = len(s.y_train), len(s.y_val), s.X_train.shape[1], len(cache.classes)
    rate = matmul_rate()
    heads = args.heads.split(",")
    print(f"# cache {cache.path.name}: {n_train} train / {n_val} val, {dim}-d, {n_cls} classes; "
          f"{torch.get_num_threads()} torch threads; measured fp32 matmul (2048^3): torch {rate:.1f} GFLOP/s "
          f"(the floor uses this), numpy {matmul_rate(lib='numpy'):.1f} GFLOP/s")
    print("| grid | runs | measured s | FLOPs (T) | floor s | measured / floor | study's way s | study's way / measured |")
    print("|---|---|---|---|---|---|---|---|")
    totals = {"runs": 0, "measured": 0.0, "flops": 0.0}
    for label in heads + ([f"all: one backbone's grid ({len(heads) * 6} conditions)"] if len(heads) > 1 else []):
        if label in heads:
            t0 = time.perf_counter()
            rows = sweep([cache], heads=[label], epochs=args.epochs, hidden=args.hidden, batch_size=args.batch_size,
                         device="cpu")
            runs, measured = len(rows), time.perf_counter() - t0
            flops = sum(head_flops(r["head"], dim, n_cls, args.hidden, n_train, n_val, args.epochs) for r in rows)
            for k, v in (("runs", runs), ("measured", measured), ("flops", flops)):
                totals[k] += v
        else:
            runs, measured, flops = totals["runs"], totals["measured"], totals["flops"]
        floor = flops / (rate * 1e9)
        study = runs * args.epochs * (n_train + n_val) / cache.attrs["images_per_s"] + measured
        print(f"| {label} | {runs} | {measured:.1f} | {flops / 1e12:.2f} | {floor:.1f} | {measured / floor:.2f} | "
              f"{study:,.0f} | {study / measured:,.0f}x |")
    print(f"\nlrs {SWEEP_GRID['lr']}, optimizers {SWEEP_GRID['optimizer']}, {args.epochs} epochs, batch "
          f"{args.batch_size}, batchnorm hidden {args.hidden}; study's way uses the extraction rate of "
          f"{cache.attrs['images_per_s']:.1f} images/s recorded in the cache.")


if __name__ == "__main__":
    main()
