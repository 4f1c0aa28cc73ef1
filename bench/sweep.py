"""The study's sweep on a real cache, against its arithmetic floor and against the study's way.

floor = FLOPs the sweep must do (forward + backward of each head over the training split, plus a
validation pass per epoch) / this machine's measured fp32 matrix-multiply rate.
study's way = the same sweep with the backbone's forward pass over the training and validation
images every epoch, at the per-image rate measured during extraction (cache attribute images_per_s).

    python bench/sweep.py --cache-dir cache --backbone mobilenet_v2 [--rounds 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from featpipe.devices import tune_cpu_allocator
from featpipe.harness import SWEEP_GRID, Splits, sweep
from featpipe.heads import head_flops
from featpipe.store import find_cache, open_cache


def matmul_rate(seconds: float = 10.0, n: int = 2048, lib: str = "torch") -> tuple[float, float]:
    """fp32 GFLOP/s of large square matrix products (torch: the library the heads train with), run for
    `seconds`: (sustained: all work over all time, best half-second burst). This VM runs short bursts
    faster than it sustains, so a floor for a sweep of tens of seconds uses the sustained rate,
    measured next to it; the best burst is printed beside it."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    if lib == "numpy":
        a, b = a.numpy(), b.numpy()
    a @ b
    flops, start, best = 2 * n**3, time.perf_counter(), 0.0
    done = 0
    while time.perf_counter() - start < seconds:
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < 0.5:
            a @ b
            k += 1
        best = max(best, flops * k / (time.perf_counter() - t0) / 1e9)
        done += k
    return flops * done / (time.perf_counter() - start) / 1e9, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--heads", default="fc,batchnorm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate-seconds", type=float, default=10.0, help="matmul rate measured this long before and after each round")
    args = ap.parse_args()
    tune_cpu_allocator()
    cache = open_cache(find_cache(args.cache_dir, args.backbone, args.cache))
    s = Splits.from_cache(cache)
    n_train, n_val, dim, n_cls = len(s.y_train), len(s.y_val), s.X_train.shape[1], len(cache.classes)
    heads = args.heads.split(",")
    per_head = len(SWEEP_GRID["lr"]) * len(SWEEP_GRID["optimizer"])
    # the whole grid of one backbone, and (for the brief's "fc-only grid in seconds") the fc conditions alone
    grids = {f"{'+'.join(heads)}: one backbone's grid": heads}
    if len(heads) > 1 and "fc" in heads:
        grids["fc only"] = ["fc"]
    flops = {label: per_head * sum(head_flops(h, dim, n_cls, args.hidden, n_train, n_val, args.epochs) for h in hs)
             for label, hs in grids.items()}
    runs = {label: per_head * len(hs) for label, hs in grids.items()}
    measured: dict[str, list[float]] = {label: [] for label in grids}
    ratios: dict[str, list[float]] = {label: [] for label in grids}
    rates, bursts = [], []
    for _ in range(args.rounds):
        # the sustained rate for about the sweep's time before it and after it: this VM's speed drifts
        before = matmul_rate(args.rate_seconds)
        walls = {}
        for label, hs in grids.items():
            t0 = time.perf_counter()  # the sweep call's wall time: splits read from the cache included
            sweep([cache], heads=hs, epochs=args.epochs, hidden=args.hidden, batch_size=args.batch_size, device="cpu")
            walls[label] = time.perf_counter() - t0
        after = matmul_rate(args.rate_seconds)
        rate = (before[0] + after[0]) / 2
        rates.append(rate)
        bursts.append(max(before[1], after[1]))
        for label, seconds in walls.items():
            measured[label].append(seconds)
            ratios[label].append(seconds / (flops[label] / (rate * 1e9)))
    labels = list(grids)
    print(f"# cache {cache.path.name}: {n_train} train / {n_val} val, {dim}-d, {n_cls} classes; "
          f"{torch.get_num_threads()} torch threads; {args.rounds} rounds; fp32 matmul (2048^3), sustained over "
          f"{args.rate_seconds:.0f} s before and after each round: torch {', '.join(f'{r:.0f}' for r in rates)} GFLOP/s "
          f"(the floor uses these; best half-second bursts {', '.join(f'{r:.0f}' for r in bursts)}), numpy "
          f"{matmul_rate(args.rate_seconds, lib='numpy')[0]:.0f} GFLOP/s sustained")
    print("| grid | runs | measured s (median) | FLOPs (T) | floor s (median) | measured / floor: median (per round) "
          "| study's way s | study's way / measured |")
    print("|---|---|---|---|---|---|---|---|")
    for label in labels:
        f, t = flops[label], float(np.median(measured[label]))
        study = runs[label] * args.epochs * (n_train + n_val) / cache.attrs["images_per_s"] + t
        print(f"| {label} | {runs[label]} | {t:.1f} | {f / 1e12:.2f} | {f / (np.median(rates) * 1e9):.1f} | "
              f"{np.median(ratios[label]):.2f} ({', '.join(f'{r:.2f}' for r in ratios[label])}) | "
              f"{study:,.0f} | {study / t:,.0f}x |")
    print(f"\nlrs {SWEEP_GRID['lr']}, optimizers {SWEEP_GRID['optimizer']}, {args.epochs} epochs, batch "
          f"{args.batch_size}, batchnorm hidden {args.hidden}; a grid's conditions trained as one stack "
          f"(featpipe.heads.fit_stack: every head's first layer in one matrix product); study's way uses the extraction rate of "
          f"{cache.attrs['images_per_s']:.1f} images/s recorded in the cache.")


if __name__ == "__main__":
    main()
