"""Levers for photos unlike the catalogue, each measured the same way: the recommended batchnorm head
(`fit-head --preset tuned`), its test-split accuracy and auto-tagging, and the same model on a labelled
folder of photos from other shops (`featpipe evaluate`). Nothing here is chosen on the test split or on
the labelled folder: every setting is fixed before it runs.

    python bench/levers.py --cache-dir cache --backbone mobilenet_v2 --labels ../shared/data/other-shops/labels.csv
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from sklearn.base import clone

from featpipe.comparators import candidates
from featpipe.evaluate import markdown_table
from featpipe.harness import fit_head
from featpipe.labelled import read_labels, score_folder
from featpipe.store import find_cache, open_cache
from featpipe.views import extract_views, open_views


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--labels", required=True)
    ap.add_argument("--views", type=int, default=2, help="Augmented views per training image.")
    ap.add_argument("--augment", default="seller")
    ap.add_argument("--out", default="runs/bench/levers")
    args = ap.parse_args()
    out = Path(args.out)
    cache = open_cache(find_cache(args.cache_dir, args.backbone))
    labels = read_labels(args.labels)
    summary = extract_views(cache, args.views, args.augment, device="cpu", progress=False)
    print(f"Views: {summary}")
    views = open_views(cache, args.augment, args.views)
    print(f"({views.attrs['extract_seconds']:.0f} s of extraction for {len(views.ids)} views of "
          f"{int((cache.split == 0).sum())} training images, measured when they were made)\n")

    rows = []
    for name, train_views, stem in (("clean features", None, "clean"), (f"+ {views.name} views", views, "views")):
        t0 = time.perf_counter()
        model = fit_head(cache, out / f"{stem}-batchnorm.pt", clone(candidates(device="cpu")["batchnorm"]),
                         views=train_views)
        fit_s = time.perf_counter() - t0
        m = model.metrics
        for flip in (False, True):
            s = score_folder(model, labels, device="cpu", flip=flip).summary
            rows.append({"training": name, "test-time": "flip average" if flip else "-",
                         "train rows": m["n_train"], "fit s": fit_s,
                         "test acc": m["accuracy"] if not flip else float("nan"),
                         "test auto cov": m["test_coverage"] if not flip else float("nan"),
                         "test auto prec": m["test_precision"] if not flip else float("nan"),
                         "other-shops acc": s["accuracy"], "other-shops macro-F1": s["macro_f1"],
                         "other-shops auto cov": s["auto_coverage"], "other-shops auto prec": s["auto_precision"]})
    print(markdown_table(rows))
    print(f"\n{cache.path.name}; other-shops: {labels.csv_path} ({len(labels.paths)} photos). Test-split numbers "
          "with flip are not measured here (the cache holds unflipped features); `featpipe evaluate --flip` is "
          "the photo-level lever.")


if __name__ == "__main__":
    main()
