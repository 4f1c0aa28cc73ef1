"""Levers for photos unlike the catalogue, alone and combined, each measured the same way: the recommended
batchnorm head (`fit-head --preset tuned`, one member of it unless the lever is the ensemble), its test-split
accuracy and auto-tagging, and the same model on a labelled folder of photos from other shops (`featpipe
evaluate`), with what its features cost to make. Nothing here is chosen on the test split or on the labelled
folder: every setting is fixed before it runs.

Levers: the backbone (each of --backbones alone), power normalisation of the features (the tuned head reads
their square roots; each backbone also without it, power 1), clipping each feature to the range the training
rows span (the tuned head clips; each backbone also without it), augmented training views (--views K --augment NAME on
the first backbone), partial fine-tuning of the first backbone's last blocks from its cached activations
(`extract --activations`, `fit-head --finetune`), flip-averaging at test time, the first backbone's cache joined
with each other one's and all of them joined (one head on their features side by side), and on the first pair and
on all of them the deep ensemble of the tuned preset (--members heads of successive seeds, their logits averaged),
and on the first pair the bag of cross-fitted heads of `make run` (`fit-head --cross-fit`).
Caches and views that are missing are extracted first (their time is the one the cache records); complete ones are
reused.

    python bench/levers.py --data DATA --weights W --cache-dir cache --backbones mobilenet_v2,efficientnet_lite0,efficientnet_lite1,efficientnet_lite2 \\
        --labels ../shared/data/other-shops/labels.csv
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from sklearn.base import clone

from featpipe.comparators import candidates
from featpipe.evaluate import markdown_table
from featpipe.extract import extract
from featpipe.finetune import extract_activations, fit_finetune, open_activations
from featpipe.harness import fit_head
from featpipe.labelled import read_labels, score_folder
from featpipe.models import Model
from featpipe.store import FeatureCache, disk_bytes, join_caches, open_cache
from featpipe.views import extract_views, open_views, views_path
from featpipe.workflows.predictor import Predictor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights", required=True, help="Weights of the first backbone (the others use imagenet).")
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--backbones", default="mobilenet_v2,efficientnet_lite0")
    ap.add_argument("--labels", required=True)
    ap.add_argument("--views", type=int, default=2, help="Augmented views per training image.")
    ap.add_argument("--augment", default="seller")
    ap.add_argument("--top-lr", type=float, default=1e-4, help="Learning rate of the fine-tuned blocks.")
    ap.add_argument("--members", type=int, default=3, help="Size of the deep ensembles on joined caches.")
    ap.add_argument("--cross-fit", type=int, default=10,
                    help="Folds of the cross-fitted calibration (fit-head --cross-fit).")
    ap.add_argument("--out", default="runs/bench/levers")
    args = ap.parse_args()
    out, labels = Path(args.out), read_labels(args.labels)
    names = [b.strip() for b in args.backbones.split(",") if b.strip()]

    caches: dict[str, FeatureCache] = {}
    cost: dict[str, dict] = {}
    for k, name in enumerate(names):
        s = extract(args.data, backbone=name, weights=args.weights if k == 0 else "imagenet", cache_dir=args.cache_dir,
                    progress=False)
        caches[name] = cache = open_cache(s.cache)
        # a full extraction at the rate the cache recorded (its extract_seconds also holds earlier builds' time)
        cost[name] = {"extract s": float(cache.attrs["n_images"]) / float(cache.attrs["images_per_s"]),
                      "cache MB": disk_bytes(s.cache) / 1e6}
        print(f"{name}: {s}")
    first = caches[names[0]]
    summary = extract_views(first, args.views, args.augment, device="cpu", progress=False)
    views = open_views(first, args.augment, args.views)
    print(f"Views: {summary}")
    view_cost = {"extract s": cost[names[0]]["extract s"] + float(views.attrs["extract_seconds"]),
                 "cache MB": cost[names[0]]["cache MB"] + views_path(first.path, args.augment, args.views).stat().st_size / 1e6}
    print(f"({views.attrs['extract_seconds']:.0f} s of extraction for {len(views.ids)} views of "
          f"{int((first.split == 0).sum())} training images, measured when they were made)\n")

    print(f"Activations: {extract_activations(first, device='cpu', progress=False)}")
    acts = open_activations(first)
    acts_cost = {"extract s": cost[names[0]]["extract s"] + float(acts.attrs["extract_seconds"]),
                 "cache MB": cost[names[0]]["cache MB"] + acts.path.stat().st_size / 1e6}

    def train(label: str, cache: FeatureCache, train_views, params: dict) -> Model:
        # one member unless the lever is the ensemble: each row measures its own lever
        params = dict(params)
        cross_fit = params.pop("cross_fit", None)
        est = clone(candidates(device="cpu")["batchnorm"]).set_params(**({"members": 1} | params))
        path = out / f"{label.replace(' ', '_').replace(',', '')}.pt"
        if train_views is acts:
            return fit_finetune(cache, acts, path, est, args.top_lr)
        return fit_head(cache, path, est, views=train_views, cross_fit_folds=cross_fit)

    plans = [plan for name in names for plan in ((name, caches[name], None, cost[name], {}),
                                                  (f"{name}, power 1 (no square roots)", caches[name], None,
                                                   cost[name], {"power": 1.0}),
                                                  (f"{name}, not clipped to the training range", caches[name], None,
                                                   cost[name], {"clip": False}))]
    plans.insert(3, (f"{names[0]} + {views.name} views", first, views, view_cost, {}))
    plans.insert(4, (f"{names[0]} fine-tuned after {acts.block}", first, acts, acts_cost, {}))

    def joined(group: list[str], params: dict) -> tuple:
        """A plan for `group`'s caches side by side: their extraction time and disk summed."""
        extra = f", {params['members']}-member ensemble" if "members" in params else ""
        if "cross_fit" in params:
            extra += f", bag of {params['cross_fit']} cross-fitted heads"
        return (f"{' + '.join(group)} joined{extra}", join_caches([caches[n] for n in group]), None,
                {key: sum(cost[n][key] for n in group) for key in ("extract s", "cache MB")}, params)

    ensemble = {"members": args.members}  # the tuned preset's deep ensemble
    plans += [joined([names[0], partner], {}) for partner in names[1:]]  # each pair, as make run's PARTNER
    if len(names) > 1:  # the ensemble on the first pair: make run's default features; then make run's default head
        plans += [joined(names[:2], ensemble), joined(names[:2], {"cross_fit": args.cross_fit})]
    if len(names) > 2:  # every backbone side by side, one member and the ensemble
        plans += [joined(names, {}), joined(names, ensemble)]
    rows = []
    for label, cache, train_views, spent, params in plans:
        t0 = time.perf_counter()
        model = train(label, cache, train_views, params)
        fit_s = time.perf_counter() - t0
        m = model.metrics
        for flip in (False, True):
            s = score_folder(Predictor(model, device="cpu", flip=flip), labels).summary
            rows.append({"features": label, "test-time": "flip average" if flip else "-", **spent, "fit s": fit_s,
                         "test acc": m["accuracy"] if not flip else float("nan"),
                         "test auto cov": m["test_coverage"] if not flip else float("nan"),
                         "test auto prec": m["test_precision"] if not flip else float("nan"),
                         "other-shops acc": s["accuracy"], "other-shops macro-F1": s["macro_f1"],
                         "other-shops auto cov": s["auto_coverage"], "other-shops auto prec": s["auto_precision"]})
    print(markdown_table(rows))
    print(f"\nother-shops: {labels.csv_path} ({len(labels.paths)} photos). Test-split numbers with flip are not "
          "measured here (the caches hold unflipped features); `featpipe evaluate --flip` is the photo-level lever. "
          "extract s: the cache's images at the rate it recorded (plus its views' or activations' own time), cache MB: "
          f"its files on disk. Fine-tuning: the blocks after {acts.block} at learning rate {args.top_lr}, the head as "
          "the others'; fit s includes computing the fine-tuned features for calibration and scoring. "
          "Every row trains one head (seed 0) but the ensembles, whose members have seeds 0, 1, .... "
          "Every row trains on the train split and calibrates (temperature, auto-tag threshold) on the val split "
          f"but the bag (`fit-head --cross-fit {args.cross_fit}`): {args.cross_fit} heads (seed 0), each trained on "
          f"{args.cross_fit - 1} of {args.cross_fit} folds of train + val, the mean of their logits deployed, "
          "calibrated on each row's logits from the head that held it out; its fit s covers every head. "
          "The study's small CNN, trained on the photos themselves, is in its own section.")


if __name__ == "__main__":
    main()
