"""The study's benchmark model on featpipe's split: a two-layer CNN trained on the photos at their native
60x80 (Adam 1e-3, 10 epochs, the epoch with the lowest validation loss kept), beside the frozen-feature
head of the same cache. Same images, same train/validation/test split (the cache's), the same
calibration (temperature and a 99%-precision threshold chosen on validation), and the same labelled
folder of photos from other shops (squashed to 60x80, as the catalogue's are).

    python bench/simplecnn.py --cache-dir cache --backbone mobilenet_v2 --labels ../shared/data/other-shops/labels.csv
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from featpipe.calibrate import auto_tagging, coverage_and_precision, softmax
from featpipe.evaluate import markdown_table, scores
from featpipe.labelled import read_labels
from featpipe.simplecnn import load_pixels, logits, train_simple_cnn
from featpipe.store import find_cache, open_cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--labels", required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cache = open_cache(find_cache(args.cache_dir, args.backbone))
    root = Path(cache.attrs["dataset_root"]) / "images"
    t0 = time.perf_counter()
    pixels, ok = load_pixels([root / f"{i}.jpg" for i in cache.ids], threads=torch.get_num_threads())
    load_s = time.perf_counter() - t0
    if not ok.all():
        raise SystemExit(f"{(~ok).sum()} catalogue photos the cache holds could not be read: the dataset changed?")
    t0 = time.perf_counter()
    result = train_simple_cnn(pixels, cache.labels, cache.split, len(cache.classes), epochs=args.epochs, seed=args.seed)
    train_s = time.perf_counter() - t0
    print(markdown_table(result.history))
    print()

    val, test = cache.split == 1, cache.split == 2
    val_logits, test_logits = logits(result.model, pixels[val]), logits(result.model, pixels[test])
    auto = auto_tagging(val_logits, cache.labels[val], test_logits, cache.labels[test])
    test_scores = scores(cache.labels[test], test_logits.argmax(1))

    photos = read_labels(args.labels)
    shop_pixels, shop_ok = load_pixels(photos.paths)
    index = {c: k for k, c in enumerate(cache.classes)}
    truth = np.array([index.get(label, -1) for label in photos.labels])
    proba = softmax(logits(result.model, shop_pixels[shop_ok]), auto["temperature"])
    right = proba.argmax(1) == truth[shop_ok]
    cov, prec, _ = coverage_and_precision(proba.max(1), right, auto["threshold"])
    n_params = sum(p.numel() for p in result.model.parameters())
    print(markdown_table([{
        "model": "SimpleCNN (2 conv layers, 60x80 photos)", "parameters": n_params, "best epoch": result.best_epoch,
        "train s": train_s, "test acc": test_scores["accuracy"], "test weighted-F1": test_scores["weighted_f1"],
        "test auto cov": auto["test_coverage"], "test auto prec": auto["test_precision"],
        "other-shops acc": float(right.sum() / len(truth)), "other-shops auto cov": cov * shop_ok.mean(),
        "other-shops auto prec": prec}]))
    print(f"\nSplit and labels of {cache.path.name}: {int((cache.split == 0).sum())} train, {int(val.sum())} validation, "
          f"{int(test.sum())} test photos, decoded in {load_s:.0f} s; {args.epochs} epochs of Adam (lr 1e-3, batch 64) "
          f"on {torch.get_num_threads()} threads. other-shops: {len(photos.paths)} photos ({int((~shop_ok).sum())} "
          "unreadable, counted wrong). The frozen-feature heads on the same split are in the levers table.")


if __name__ == "__main__":
    main()
