"""Photos that reviewers labelled, as training rows beside the catalogue (`fit-head --labelled`): what they give
on photos from other shops that no head trained on.

Grouped cross-validation over a labelled folder: its photos are split into --folds folds by contributor, so no
contributor's photos (one took 29, most on the same bedspread) are on both sides. For each fold, a head trains on
the catalogue's train split plus n photos drawn (seed 0) from the other folds, each repeated --repeat times, and
is scored on the held-out fold; the folds' scores are pooled, so every photo is scored once, by a head that never
saw it or its contributor's other photos. n = 0 is the catalogue alone, `make run`'s training data. The head is
the recommended batchnorm head, one member (`fit-head --preset tuned --members 1`), on `make run`'s features;
calibration (temperature, auto-tag threshold at 99%) and test scores stay on the catalogue's splits. Nothing
here is chosen on the held-out folds: n, the repeat and the head are fixed before it runs.

Contributor: `sender_id=N` in the csv's source_label column (other-shops' clothing-dataset photos), else the
source_repo column (H&M's photos, all one shop, form one group).

    python bench/reviewed.py --cache-dir cache --backbone mobilenet_v2+efficientnet_lite0 \\
        --labels ../shared/data/other-shops/labels.csv
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
from sklearn.base import clone
from sklearn.model_selection import GroupKFold

from featpipe.comparators import candidates
from featpipe.evaluate import markdown_table, scores
from featpipe.harness import fit_head
from featpipe.labelled import LabelledFeatures, LabelledImages, labelled_features, read_labels
from featpipe.store import FeatureCache, find_cache, open_caches

SENDER = re.compile(r"sender_id=\d+")


def contributors(csv_path: Path, lines: list[int]) -> list[str]:
    """Each labelled row's contributor, in the order of `lines` (the csv lines `read_labels` kept)."""
    by_line = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            match = SENDER.search(row.get("source_label") or "")
            by_line[reader.line_num] = match.group(0) if match else row.get("source_repo") or "unknown"
    return [by_line[n] for n in lines]


class GroupedPhotos(NamedTuple):
    paths: list[Path]  # the caches joined
    cache: FeatureCache
    data: LabelledImages
    photos: LabelledFeatures
    groups: np.ndarray  # each photo's contributor
    folds: list[tuple[np.ndarray, np.ndarray]]  # (other folds' rows, held-out rows), no contributor in both


def grouped_photos(cache_dir: str, backbone: str, labels: str, folds: int) -> GroupedPhotos:
    """The joined caches of `backbone` (a+b), the labelled folder's photos through their pipeline, and `folds`
    folds by contributor (GroupKFold): what this benchmark and bench/review_queue.py cross-validate on."""
    paths = [find_cache(cache_dir, b) for b in backbone.split("+")]
    cache = open_caches(paths)
    data = read_labels(labels)
    photos = labelled_features(cache.provenance(), cache.classes, data, device="cpu")
    if photos.skipped:
        raise SystemExit(f"{len(photos.skipped)} labelled photos unreadable; the folds need every one")
    groups = np.array(contributors(data.csv_path, data.lines))
    return GroupedPhotos(paths, cache, data, photos, groups,
                         list(GroupKFold(folds).split(photos.features, photos.labels, groups)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--backbone", default="mobilenet_v2+efficientnet_lite0")
    ap.add_argument("--labels", required=True)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--sizes", default="50,100", help="Labelled photos per head, besides 0 and all of the other folds.")
    ap.add_argument("--repeat", type=int, default=10, help="fit-head --labelled-repeat.")
    ap.add_argument("--out", default="runs/bench/reviewed")
    args = ap.parse_args()
    out = Path(args.out)
    paths, cache, data, photos, groups, folds = grouped_photos(args.cache_dir, args.backbone, args.labels, args.folds)
    source = np.array(["H&M" if "HM-Fashion" in g else "clothing-dataset" for g in groups])
    print(f"{args.backbone} ({', '.join(Path(p).name for p in paths)}): {len(cache.classes)} classes; "
          f"{args.labels}: {len(data.paths)} photos, "
          f"{len(set(groups))} contributors in {args.folds} folds of {', '.join(str(len(h)) for _, h in folds)} "
          f"photos (no contributor in two)\n")

    def head():
        return clone(candidates(0, "cpu")["batchnorm"]).set_params(members=1)

    alone = fit_head(cache, out / "catalogue.pt", head())  # n = 0: one head serves every fold
    sizes = [0, *map(int, args.sizes.split(",")), None]  # None: all of the other folds' photos
    rows = []
    for n, repeat in [(n, args.repeat) for n in sizes] + [(None, 1)]:
        pred = np.empty(len(photos.labels), dtype=int)
        conf, threshold = np.empty(len(photos.labels)), np.empty(len(photos.labels))
        models, used = [], []
        for k, (pool, held) in enumerate(folds):
            if n == 0:
                model = alone
            else:
                pick = pool if n is None else np.random.default_rng(0).permutation(pool)[:n]
                extra = LabelledFeatures(data.csv_path, photos.features[pick], photos.labels[pick], [])
                model = fit_head(cache, out / f"n{n or 'all'}-x{repeat}-fold{k}.pt", head(), labelled=extra,
                                 labelled_repeat=repeat)
                used.append(len(pick))
            p = model.proba(photos.features[held])
            pred[held] = [cache.classes.index(model.classes[i]) for i in p.argmax(1)]
            conf[held], threshold[held] = p.max(1), model.threshold
            models.append(model.metrics)
        right, auto = pred == photos.labels, conf >= threshold
        present = sorted(set(photos.labels.tolist()))
        rows.append({
            "labelled photos per head": f"{n or 'all'} ({min(used)}-{max(used)}) x {repeat}" if n != 0
                                        else "0 (catalogue alone)",
            "held-out acc": float(right.mean()),
            "macro-F1": scores(photos.labels, pred, labels=present)["macro_f1"],
            "clothing-dataset acc": float(right[source == "clothing-dataset"].mean()),
            "H&M acc": float(right[source == "H&M"].mean()),
            "auto-tagged": f"{int(auto.sum())} ({auto.mean():.1%})",
            "auto prec": float(right[auto].mean()) if auto.any() else float("nan"),
            "test acc": float(np.mean([m["accuracy"] for m in models])),
            "test auto cov": float(np.mean([m["test_coverage"] for m in models])),
            "test auto prec": float(np.mean([m["test_precision"] for m in models])),
            "fit s": float(np.mean([m["fit_seconds"] for m in models])),
        })
        print(f"done: {rows[-1]['labelled photos per head']}", file=sys.stderr, flush=True)
    print(markdown_table(rows))
    print(f"\nEach row pools {len(photos.labels)} held-out photos ({int((source == 'H&M').sum())} of them H&M "
          f"pack-shots, one group); test columns: mean over the folds' heads on the catalogue's test split; fit s: "
          "mean per head. With `make run`'s bag (`--cross-fit 10`) every fit costs ten heads, so it is not run here.")


if __name__ == "__main__":
    main()
