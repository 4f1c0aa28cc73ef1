"""Quality on a real cache: `featpipe compare` (every head and comparator on the same split) and the
recommended head through `fit-head` (calibration, auto-tag threshold and coverage on test). `--backbone a+b`
joins two backbones' caches, as `make run` does.

    python bench/quality.py --cache-dir cache --backbone mobilenet_v2+efficientnet_lite0 --out runs/bench
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from sklearn.base import clone

from featpipe.comparators import candidates
from featpipe.evaluate import markdown_table
from featpipe.harness import compare, fit_head
from featpipe.labelled import read_labels, score_folder
from featpipe.store import find_cache, open_caches
from featpipe.workflows.predictor import Predictor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--cache", action="append", help="Explicit cache file(s) instead of --backbone; repeat to join.")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--target-precision", type=float, default=0.99)
    ap.add_argument("--cross-fit", type=int, default=10,
                    help="Folds of the recommended head's bag, as `make run` (fit-head --cross-fit): K heads, "
                         "calibrated on their out-of-fold logits; 0: one head, calibrated on the val split.")
    ap.add_argument("--labels", default=None, help="Also score the head on this labelled folder (csv), e.g. other-shops.")
    args = ap.parse_args()
    out = Path(args.out)
    cache = open_caches(args.cache or [find_cache(args.cache_dir, b) for b in args.backbone.split("+")])
    t0 = time.perf_counter()
    rows = compare(cache, out / "compare", device="cpu", log=lambda *_: None)
    compare_s = time.perf_counter() - t0
    print(f"### compare ({cache.path.name}, whole run {compare_s:.0f} s)\n")
    print(markdown_table([{k: v for k, v in r.items()} for r in rows]))
    print("\nWorst classes (test split) of the model with the lowest validation log-loss:\n")
    print((out / "compare" / "report" / "report.md").read_text().split("## Worst classes")[1].split("## Most")[0].strip())

    head = clone(candidates(device="cpu")["batchnorm"])
    if args.cross_fit:  # as fit-head --preset tuned --cross-fit: the bag is the ensemble, one member per copy
        head.set_params(members=1)
    model = fit_head(cache, out / f"{cache.backbone}-batchnorm.pt", head, args.target_precision,
                     cross_fit_folds=args.cross_fit or None)
    m = model.metrics
    print(f"\n### fit-head: recommended batchnorm head, auto-tagging at {args.target_precision:.0%} target precision\n")
    shape = (f"A bag of {args.cross_fit} heads, each trained on {args.cross_fit - 1} of {args.cross_fit} folds of "
             f"{m['n_train']} rows" if args.cross_fit else f"One head, trained on {m['n_train']} rows")
    print(f"{shape}; calibrated on {m['n_calibration']} rows ({m['calibrated_on']}).\n")
    keys = ["accuracy", "weighted_f1", "macro_f1", "fit_seconds", "best_epoch", "temperature",
            "ece_test_before", "ece_test_after", "threshold", "calibration_coverage", "calibration_precision",
            "test_coverage", "test_precision", "test_auto", "n_test"]
    print(markdown_table([{k: m[k] for k in keys}]))
    print(f"\nhead: {head.get_params()}")
    if args.labels:
        r = score_folder(Predictor(model, device="cpu"), read_labels(args.labels))
        print(f"\n### The same model on photos from other shops: `featpipe evaluate --labels {args.labels}`\n")
        print(markdown_table([r.summary]))
        print(markdown_table(r.per_class, ".3f"))


if __name__ == "__main__":
    main()
