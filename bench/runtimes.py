"""Backbone runtimes on this CPU (torch eager, OpenVINO fp32, bf16 and INT8): full extraction of the dataset
with each, the default head's accuracy on each one's features (test split and a labelled folder of photos
from other shops), and the physical picture.

Each full extraction is a fresh `featpipe extract --overwrite` process; its wall time includes start-up,
the dataset scan, conversion to OpenVINO and INT8 calibration. Pure forward: preloaded batches in one
process, runtimes alternating round by round, medians reported. FLOPs of one image are counted by torch
(`FlopCounterMode`, a multiply-add = 2 FLOPs); the machine's rate is fp32 matrix products.

    python bench/runtimes.py --data DATA --weights W --cache-dir cache --labels ../shared/data/other-shops/labels.csv
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.base import clone

from featpipe.backbones import load_backbone
from featpipe.images import Preprocessing
from featpipe.dataset import load_dataset
from featpipe.devices import tune_cpu_allocator
from featpipe.evaluate import markdown_table
from featpipe.extract import int8_dir
from featpipe.harness import fit_head
from featpipe.comparators import candidates
from featpipe.labelled import read_labels, score_folder
from featpipe.runtimes import PRECISION, RUNTIMES, has_bf16, make_forward, openvino_forward, openvino_model
from featpipe.store import disk_bytes, open_cache, read_attrs
from featpipe.workflows.predictor import Predictor

sys.path.insert(0, str(Path(__file__).parent))
from sweep import matmul_rate  # noqa: E402


def full_extraction(args, runtime: str) -> tuple[Path, float, str]:
    """One fresh `featpipe extract` over the whole dataset: (cache path, wall seconds, its summary line)."""
    cmd = [sys.executable, "-m", "featpipe.cli", "extract", "--data", args.data, "--weights", args.weights,
           "--cache-dir", args.cache_dir, "--runtime", runtime, "--overwrite", "--no-progress"]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return Path(out.split(":")[0]), time.perf_counter() - t0, out


def disk_mb(cache: Path) -> float:
    """The cache (manifest and shards) and its INT8 model, if any."""
    int8 = list(int8_dir(cache).iterdir()) if int8_dir(cache).is_dir() else []
    return (disk_bytes(cache) + sum(p.stat().st_size for p in int8)) / 1e6


def quality(cache_path: Path, labels: str, out: Path, seed: int) -> dict:
    """The default head (fit-head --preset tuned, a deep ensemble whose members start from seeds `seed`,
    `seed` + 1, ...) on this cache: test split, then the labelled folder. The runtimes differ in their
    features, and the issue bounds the default head's accuracy on them, so this is the head measured."""
    cache = open_cache(cache_path)
    head = clone(candidates(device="cpu")["batchnorm"]).set_params(seed=seed)
    model = fit_head(cache, out / f"{cache.runtime}-seed{seed}.pt", head)
    m = model.metrics
    folder = score_folder(Predictor(model, device="cpu"), read_labels(labels)).summary
    return {"test_acc": m["accuracy"], "test_macro_f1": m["macro_f1"], "test_auto_coverage": m["test_coverage"],
            "test_auto_precision": m["test_precision"], "shops_acc": folder["accuracy"],
            "shops_auto_coverage": folder["auto_coverage"], "shops_auto_precision": folder["auto_precision"]}


def fidelity(cache_path: Path, ref_path: Path) -> dict:
    """Cosine between each image's features on this runtime and on the reference runtime (every image of
    both caches): how far quantization or another kernel moved them, before any head is trained."""
    cache, ref = open_cache(cache_path), open_cache(ref_path)
    _, i, j = np.intersect1d(cache.ids, ref.ids, return_indices=True)
    a, b = cache.features[i].astype(np.float32), ref.features[j].astype(np.float32)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"cos_median": float(np.median(cos)), "cos_p1": float(np.percentile(cos, 1))}


def pure_forward(args, caches: dict[str, Path], rounds: int) -> dict[str, list[float]]:
    """images/s of each runtime's forward pass alone on the same preloaded uint8 batches, alternating rounds."""
    from featpipe.images import load_image

    pre = Preprocessing()
    ds = load_dataset(args.data)
    paths = [ds.image_path(i) for i in ds.ids[:args.n]]
    batches = [torch.from_numpy(np.stack([load_image(p, pre) for p in paths[i:i + 64]])) for i in range(0, len(paths), 64)]
    model, _ = load_backbone("mobilenet_v2", args.weights)
    cpu = torch.device("cpu")
    forwards = {}
    for rt, cache in caches.items():
        attrs = read_attrs(cache)  # attributes only: the features are not needed here
        forwards[rt] = make_forward(model, rt, cpu, pre, 64, int8_dir(cache), attrs.get("runtime_id"))
        if rt != "torch":  # the latency hint, which extraction does not use, beside the hint it does
            network = openvino_model(model, rt, pre, int8_dir(cache), attrs.get("runtime_id"))
            forwards[f"{rt} (latency hint)"] = openvino_forward(network, 64, hint="LATENCY", precision=PRECISION[rt])
    rates: dict[str, list[float]] = {rt: [] for rt in forwards}
    for r in range(rounds):
        order = list(forwards) if r % 2 == 0 else list(forwards)[::-1]
        for rt in order:
            forwards[rt](batches[0])  # warm: first call compiles kernels
            t0 = time.perf_counter()
            for b in batches:
                forwards[rt](b)
            rates[rt].append(len(paths) / (time.perf_counter() - t0))
    return rates


def cpu_model() -> str:
    """The processor's name and whether OpenVINO finds bf16 instructions on it: the runtimes' speeds, and
    whether openvino-bf16 runs at all, depend on both."""
    import openvino as ov

    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
    return f"{names[0] if names else 'unknown'}, {'with' if has_bf16(ov.Core()) else 'without'} bf16 instructions"


def image_flops(weights: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = load_backbone("mobilenet_v2", weights)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 3, 224, 224))
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--labels", required=True, help="A labelled folder of photos unlike the catalogue (csv).")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES))
    ap.add_argument("--limit", type=int, default=None, help="A seeded subset instead of the whole dataset (smoke runs).")
    ap.add_argument("--n", type=int, default=512, help="Images for the pure-forward rounds.")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seeds", default="0,3", help="Head seeds (of an ensemble's first member; with 3 members, "
                    "0 and 3 share none): a runtime's accuracy is the mean over them, "
                    "because one head's result on a few hundred photos moves by points with the seed alone.")
    ap.add_argument("--out", default="runs/bench/runtimes")
    args = ap.parse_args()
    tune_cpu_allocator()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runtimes = args.runtimes.split(",")
    rows, caches = [], {}
    for rt in runtimes:
        cache, wall, line = full_extraction(args, rt)
        caches[rt] = cache
        n = int(read_attrs(cache)["n_images"])
        print(f"# {rt}: {line} (wall {wall:.1f} s with start-up)")
        rows.append({"runtime": rt, "images": n, "wall_s": wall, "images_per_s": n / wall, "cache_mb": disk_mb(cache)})
    base = rows[0]["images_per_s"]
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed: dict[str, list[dict]] = {}
    for row in rows:
        rt = row["runtime"]
        row["x_" + runtimes[0]] = row["images_per_s"] / base
        row |= fidelity(caches[rt], caches[runtimes[0]])
        per_seed[rt] = [quality(caches[rt], args.labels, out, s) for s in seeds]
        row |= {k: float(np.mean([q[k] for q in per_seed[rt]])) for k in per_seed[rt][0]}
    print()
    print(markdown_table(rows, ".4g"))
    ref = rows[0]["runtime"]
    members = candidates(device="cpu")["batchnorm"].members
    print(f"\ncos_median, cos_p1: cosine of each image's features to {ref}'s (median, 1st percentile over the "
          f"catalogue, as stored in float16). Accuracy, coverage and precision: means over the default head "
          f"({members}-member ensemble) trained with first seeds {', '.join(map(str, seeds))} on each runtime's "
          "features; each seed below.\n")
    print(markdown_table([{"runtime": rt, "seed": s} | q for rt, qs in per_seed.items() for s, q in zip(seeds, qs)], ".4g"))

    def change(rt: str, key: str) -> str:
        d = [100 * (q[key] - r[key]) for q, r in zip(per_seed[rt], per_seed[ref])]
        return f"{np.mean(d):+.2f} points (seed by seed {min(d):+.2f} to {max(d):+.2f})"

    print(f"\nAccuracy change against {ref}, mean over seeds: " + "; ".join(
        f"{rt} test {change(rt, 'test_acc')}, other shops {change(rt, 'shops_acc')}" for rt in runtimes[1:]))

    flops = image_flops(args.weights)
    sustained, burst = matmul_rate(10.0)
    rates = pure_forward(args, caches, args.rounds)
    print(f"\nCPU: {cpu_model()}.")
    print(f"\nPhysical picture: MobileNetV2 (cut before its classifier) at 224x224 is {flops / 1e9:.3f} GFLOP an "
          f"image (torch FlopCounterMode); this machine's fp32 matrix products in torch sustain {sustained:.0f} "
          f"GFLOP/s (best half-second {burst:.0f}) on {os.cpu_count()} cores, {sustained * 1e9 / flops:.0f} images/s "
          "at that rate. A runtime whose kernels get more of the cores' fp32 peak than torch's matrix product does "
          f"passes 100% of that rate even in fp32. Pure forward: {args.n} preloaded images (decoded and resized uint8; each runtime normalises its own input, as in extraction), batch 64, "
          f"{args.rounds} alternating rounds, medians.\n")
    phys = []
    full = {row["runtime"]: row["images_per_s"] for row in rows}
    for rt, measured in rates.items():
        med = float(np.median(measured))
        phys.append({"runtime": rt, "pure_forward_images_per_s": med,
                     "rounds": " ".join(f"{r:.0f}" for r in measured),
                     "achieved_GFLOP_s": med * flops / 1e9, "of_fp32_matmul_rate": med * flops / (sustained * 1e9),
                     "full_extraction_of_pure": full[rt] / med if rt in full else ""})
    print(markdown_table(phys, ".3g"))
    print("\nOpenVINO's runtimes run with the throughput hint (parallel streams, each batch split across them); "
          "the latency-hint rows run each batch as one request on every core, for comparison.")
    print("\nINT8 and bf16 are not bound by the fp32 rate: VNNI multiply-adds int8 at up to 4x fp32's width, "
          "AVX512-BF16 bf16 pairs at 2x.")


if __name__ == "__main__":
    main()
