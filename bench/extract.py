"""Extraction throughput on the same images and batch size, three ways:

1. pure forward: the backbone on tensors already in memory (the ceiling);
2. featpipe: the real `featpipe extract` command (decode, resize and normalise, channels_last,
   inference_mode, journal writes); its rate is the cache's own record (batches only); by default also
   with one DataLoader worker process decoding beside the forward pass, for comparison;
3. the study's plain pipeline: PIL + torchvision transforms, default DataLoader, float32 NCHW, no_grad;
and, in one process in short alternating rounds, featpipe's batch loop against pure forward in steady state.

    python bench/extract.py --data ../shared/data/fashion-product-images-small --n 1024 --markdown
"""
from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image

from featpipe.backbones import load_backbone
from featpipe.devices import tune_cpu_allocator
from featpipe.embed import iter_features
from featpipe.images import Preprocessing
from featpipe.loader import preprocess
from featpipe.runtimes import torch_forward
from featpipe.store import find_cache, open_cache


class PlainImages(torch.utils.data.Dataset):
    """What the study's notebook did: open with PIL, torchvision transforms per image."""

    def __init__(self, paths, size):
        self.paths = paths
        self.tf = T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                             T.Normalize(Preprocessing().mean, Preprocessing().std)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.tf(Image.open(self.paths[i]).convert("RGB"))


def preloaded(paths, args):
    """(preprocessing, channels_last backbone, normalised batches in memory) for the pure forward."""
    pre = Preprocessing(image_size=args.image_size)
    model, _ = load_backbone(args.backbone, args.weights)
    model = model.to(memory_format=torch.channels_last)
    batches = [torch.stack([preprocess(p, pre) for p in paths[i:i + args.batch_size]]).permute(0, 3, 1, 2)
               for i in range(0, len(paths), args.batch_size)]  # NCHW views of channels_last memory
    return pre, model, batches


def pure_forward(paths, args, tuned: bool) -> tuple[float, float]:
    """Seconds for the backbone alone over preloaded, normalised channels_last batches: (all batches,
    all but the first). The first forward sets up oneDNN's kernels; featpipe's recorded rate includes
    its first batch too, so the like-for-like ratio uses all batches."""
    if tuned:
        tune_cpu_allocator()
    _, model, batches = preloaded(paths, args)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(batches[0])
        t1 = time.perf_counter()
        for x in batches[1:]:
            model(x)
        return time.perf_counter() - t0, time.perf_counter() - t1


def steady_state(paths, args) -> tuple[list[float], list[float]]:
    """(pure forward, featpipe's batch loop) images/s per round, alternating in one process.

    featpipe's loop is `embed.iter_features`, what `featpipe extract` runs (with --workers as given,
    channels_last, inference_mode), minus the journal writes. Rounds are short and the order swaps
    each round, so this VM's drift cancels better than across fresh processes; each run's first
    batch (worker start-up, oneDNN set-up) is left out on both sides. With worker processes, their
    last prefetched batches run uncontended, which flatters a short round."""
    tune_cpu_allocator()
    paths = paths[:args.steady_n]
    pre, model, batches = preloaded(paths, args)
    rest = len(paths) - len(batches[0])

    def pure() -> float:
        with torch.inference_mode():
            model(batches[0])
            t0 = time.perf_counter()
            for x in batches[1:]:
                model(x)
        return rest / (time.perf_counter() - t0)

    def featpipe_loop() -> float:
        forward = torch_forward(model, torch.device("cpu"), pre)
        it = iter_features(forward, paths, pre, "cpu", args.batch_size, args.workers)
        next(it)
        t0 = last = time.perf_counter()
        for _ in it:
            last = time.perf_counter()  # the worker's shutdown after the last batch is not throughput
        return rest / (last - t0)

    fwd, loop = [], []
    for r in range(args.steady_rounds):
        for fn, out in ((pure, fwd), (featpipe_loop, loop))[::-1 if r % 2 else 1]:
            out.append(fn())
    return fwd, loop


def plain_pipeline(paths, args) -> float:
    model, _ = load_backbone(args.backbone, args.weights)
    loader = torch.utils.data.DataLoader(PlainImages(paths, args.image_size), batch_size=args.batch_size)
    with torch.no_grad():
        t0 = time.perf_counter()
        for x in loader:
            model(x)
        return time.perf_counter() - t0


def fresh(fn, *args):
    """Run fn(*args) in a new interpreter (glibc's default allocator settings, no inherited state)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(fn, *args).result()


def featpipe_extract(args, workers: int | None) -> tuple[float, float, float, list[Path]]:
    """The real `featpipe extract` command into a temporary cache: (images/s, seconds, wall, image paths).

    images/s and seconds are the cache's own record: every batch from the first decode to the last
    journal write, model loading and the dataset scan excluded."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "featpipe.cli", "extract", "--data", args.data, "--backbone", args.backbone,
               "--weights", args.weights, "--cache-dir", tmp, "--limit", str(args.n), "--batch-size",
               str(args.batch_size), "--image-size", str(args.image_size), "--device", "cpu", "--no-progress",
               "--runtime", "torch",  # torch's own pipeline against torch's pure forward; bench/runtimes.py compares runtimes
               "--dtype", args.dtype]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        cache = open_cache(find_cache(tmp, args.backbone))
        paths = [Path(cache.attrs["dataset_root"]) / "images" / f"{i}.jpg" for i in cache.ids]
        return cache.attrs["images_per_s"], cache.attrs["extract_seconds"], wall, paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--weights", default="none", help="Throughput does not depend on the weights' values.")
    ap.add_argument("--dtype", default="float16", help="Cache dtype; random-init weights need float32 (float16 rounds "
                    "their ~1e-9 outputs to 0, which extract refuses).")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=None, help="featpipe's --workers [default: featpipe's].")
    ap.add_argument("--other-workers", type=int, default=1,
                    help="Also run the command with this many worker processes, for comparison (-1: skip).")
    ap.add_argument("--repeats", type=int, default=3, help="Rounds of (extract, pure forward); medians reported.")
    ap.add_argument("--steady-rounds", type=int, default=8, help="In-process alternating rounds (0: skip).")
    ap.add_argument("--steady-n", type=int, default=640, help="Images per in-process round.")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()

    # This VM's speed drifts by +-20% from minute to minute: rotate the measurements that are compared,
    # each in a fresh interpreter (no heap or worker state carried over), change which goes first every
    # round (a drift within a round favours none), and report medians.
    fwd_s, warm_s, ext, other = [], [], [], []

    def forward_round():
        all_batches, after_first = fresh(pure_forward, paths, args, True)
        fwd_s.append(all_batches)
        warm_s.append(after_first)

    def extract_round(out, workers):
        nonlocal paths, wall
        rate, secs, wall, paths = fresh(featpipe_extract, args, workers)  # the same seeded subset every time
        out.append((rate, secs))

    paths, wall = None, 0.0
    steps = [lambda: extract_round(ext, args.workers), forward_round]
    if args.other_workers >= 0:
        steps.append(lambda: extract_round(other, args.other_workers))
    for r in range(args.repeats):
        for step in steps[r % len(steps):] + steps[:r % len(steps)]:
            step()
    steady_fwd, steady_loop = fresh(steady_state, paths, args) if args.steady_rounds else ([], [])
    plain_s = fresh(plain_pipeline, paths, args)
    default_forward_s = fresh(pure_forward, paths, args, False)[0]
    n = len(paths)
    forward_s = statistics.median(fwd_s)
    fwd = n / forward_s
    warm = statistics.median(warm_s)

    def ratios(runs):
        return [rate / (n / f) for (rate, _), f in zip(runs, fwd_s)]

    def median_row(name, runs):
        """Median rate and seconds; the share of pure forward is the median of the per-round ratios
        (each run against the pure forward of its own round), not a ratio of two medians."""
        return (name, statistics.median(r for r, _ in runs), statistics.median(s for _, s in runs),
                statistics.median(ratios(runs)))

    def single_row(name, seconds, images=n):
        return name, images / seconds, seconds, images / seconds / fwd

    rows = [single_row("pure forward (tensors in memory)", forward_s),
            single_row("pure forward without its first batch (oneDNN set-up; for reference)", warm, n - args.batch_size),
            single_row("pure forward, glibc default allocator (no tune_cpu_allocator)", default_forward_s),
            median_row(f"featpipe extract (full pipeline, workers {args.workers if args.workers is not None else 'default'})", ext)]
    if other:
        rows.append(median_row(f"featpipe extract --workers {args.other_workers} (for comparison)", other))
    rows.append(single_row("study's plain pipeline (PIL + transforms, default DataLoader, default allocator)", plain_s))

    def per_round(name, runs):
        rs = ratios(runs)
        return (f"{name} {', '.join(f'{r:.1f}' for r, _ in runs)} images/s, / pure forward per round "
                f"{', '.join(f'{x:.0%}' for x in rs)} (median {statistics.median(rs):.0%})")

    print(f"# {args.backbone}, {n} images of {args.data}, batch {args.batch_size}, {args.image_size}px, "
          f"CPU: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{platform.processor() or platform.machine()}; `featpipe extract` wall incl. start-up and dataset scan: "
          f"{wall:.1f} s; {args.repeats} rotating rounds, medians reported: pure forward "
          f"{', '.join(f'{n / x:.1f}' for x in fwd_s)} images/s; {per_round('featpipe extract', ext)}"
          + (f"; {per_round(f'with --workers {args.other_workers}', other)}" if other else ""))
    if steady_fwd:
        steady = [lp / f for f, lp in zip(steady_fwd, steady_loop)]
        print(f"# steady state, one process, {args.steady_rounds} rounds of {min(args.steady_n, n)} images, order swapped "
              f"each round, first batch of each run left out: pure forward {', '.join(f'{x:.1f}' for x in steady_fwd)} "
              f"images/s, featpipe's batch loop {', '.join(f'{x:.1f}' for x in steady_loop)} images/s; per round "
              f"{', '.join(f'{x:.0%}' for x in steady)} (median {statistics.median(steady):.0%})")
    if args.markdown:
        print("| pipeline | images/s (median) | seconds (median) | % of pure forward (featpipe rows: median of "
              "per-round ratios) |\n|---|---|---|---|")
        for name, rate, secs, share in rows:
            print(f"| {name} | {rate:.1f} | {secs:.1f} | {share:.0%} |")
    else:
        for name, rate, secs, share in rows:
            print(f"{name:64s} {rate:8.1f} img/s {secs:8.1f} s {share:6.0%}")


if __name__ == "__main__":
    main()
