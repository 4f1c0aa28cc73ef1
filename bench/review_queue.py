"""The review loop's two decisions, measured on a labelled folder of other shops' photos: which photos to label
first (`workflows.selection.order_queue`), and which sources' auto-tags to trust (`workflows.sources.SourceGate`).

Labels that teach most: the folder's photos are split into --folds folds by contributor exactly as
bench/reviewed.py splits them. For each fold, `make run`'s model (--model) predicts the other folds' photos once,
as the review page would, and a strategy picks n of them to label: the queue ("badge", "margin": the model's
calibrated probabilities and its head's hidden-layer embedding) or a random draw (seeds given). A head then trains
on the catalogue plus those n photos, each repeated --repeat times (bench/reviewed.py's head: the tuned batchnorm
head, one member, on the model's joined features; --head fc: the tuned linear head, for a machine too busy for
that grid) and is scored on the held-out fold, so no contributor's photos
are on both sides. Nothing is chosen on the held-out folds: strategies, n, the repeat and the head are fixed
before it runs.

Per-source control: every photo is streamed, source by source (contributor; within one, in the csv's order),
through the model's auto-tag decision and a `SourceGate` with its defaults: a photo over the model's threshold is
auto-tagged while its source is allowed and spot-checked at the gate's rate (the check's answer: its label), and
goes to review while its source is off (that review checks what the model would have said). Synthetic sources
whose confident photos are right at a given rate show how fast a failing source is caught.

    python bench/review_queue.py --cache-dir cache --backbone mobilenet_v2+efficientnet_lite0 \\
        --model runs/mobilenet_v2+efficientnet_lite0-batchnorm.pt --labels ../shared/data/other-shops/labels.csv
"""
from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.base import clone

from featpipe.comparators import candidates
from featpipe.evaluate import markdown_table
from featpipe.harness import fit_head
from featpipe.labelled import LabelledFeatures
from featpipe.models import Model, load_model
from featpipe.store import FeatureCache
from featpipe.workflows.selection import order_queue
from featpipe.workflows.sources import SourceGate

sys.path.insert(0, str(Path(__file__).parent))
from reviewed import grouped_photos  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def choose(strategy: str, seed: int, pool: np.ndarray, n: int, proba: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """The n photos of `pool` an operator labels first: the queue's order, or a random draw (bench/reviewed.py's
    draw for seed 0)."""
    if strategy == "random":
        return np.random.default_rng(seed).permutation(pool)[:n]
    return pool[order_queue(proba[pool], hidden[pool], strategy, seed=seed)[:n]]


def held_out_right(cache: FeatureCache, photos: LabelledFeatures, pick: np.ndarray, held: np.ndarray, out: Path,
                   repeat: int, head_name: str) -> tuple[np.ndarray, float]:
    """Whether each held-out photo is right by a head (`featpipe compare`'s candidate `head_name`, one member)
    trained on the catalogue plus the `pick` photos, and its fit seconds."""
    extra = LabelledFeatures(photos.csv_path, photos.features[pick], photos.labels[pick], [])
    head = clone(candidates(0, "cpu")[head_name]).set_params(members=1)
    model = fit_head(cache, out, head, labelled=extra, labelled_repeat=repeat)
    return predicted(cache, model, photos.features[held]) == photos.labels[held], model.metrics["fit_seconds"]


def predicted(cache: FeatureCache, model: Model, features: np.ndarray) -> np.ndarray:
    """The model's top-1 class of each row, as the cache's label index."""
    index = {c: i for i, c in enumerate(cache.classes)}
    return np.array([index[model.classes[i]] for i in model.proba(features).argmax(1)], dtype=int)


def fitted(out: Path, key: str, fit: Callable[[], tuple[np.ndarray, float]]) -> tuple[np.ndarray, float]:
    """`fit()`'s result (held-out rows right, fit seconds), kept as a line of `out`/fits.jsonl under `key`, or the
    line a previous run with the same --out left there: a long grid resumes where it stopped."""
    path = out / "fits.jsonl"
    done = {d["key"]: d for d in map(json.loads, path.read_text().splitlines())} if path.is_file() else {}
    if key in done:
        log(f"reused fit {key} from {path}")
        return np.array(done[key]["right"], dtype=bool), done[key]["seconds"]
    right, seconds = fit()
    with open(path, "a") as fh:
        fh.write(json.dumps({"key": key, "right": right.tolist(), "seconds": seconds}) + "\n")
    return right, seconds


def teach(cache: FeatureCache, photos: LabelledFeatures, folds: list, proba: np.ndarray, hidden: np.ndarray,
          base_right: np.ndarray, context: str, args: argparse.Namespace) -> list[dict]:
    """Held-out accuracy after n labels per (strategy, seed, budget), pooled over the folds, with the spread; in
    that order, so an interrupted run (Ctrl-C or SIGTERM) still reports every strategy it finished. A fit is
    known by `context` (the caches, labels and head), its fold, the repeat and the photos picked (`fitted`)."""
    results = []
    grid = [(strategy, seed, n) for strategy in _items(args.strategies)
            for seed in (map(int, _items(args.random_seeds)) if strategy == "random" else [0])
            for n in map(int, _items(args.budgets))]
    try:
        for strategy, seed, n in grid:
            right, chosen_right, per_fold, fit_s = np.zeros(len(photos.labels), bool), [], [], []
            for k, (pool, held) in enumerate(folds):
                pick = choose(strategy, seed, pool, n, proba, hidden)
                key = hashlib.sha256(f"{context} fold {k} x{args.repeat} pick {sorted(pick.tolist())}".encode())
                right[held], seconds = fitted(args.out, key.hexdigest()[:16], lambda: held_out_right(
                    cache, photos, pick, held, args.out / "fit.pt", args.repeat, args.head))
                per_fold.append(right[held].mean())
                chosen_right.append(base_right[pick].mean())
                fit_s.append(seconds)
                log(f"n={n} {strategy} seed {seed} fold {k}: {per_fold[-1]:.3f} ({seconds:.0f} s)")
            results.append({"n": n, "strategy": strategy, "seed": seed, "acc": right.mean(),
                            "per_fold": per_fold, "chosen_right": float(np.mean(chosen_right)),
                            "fit_s": float(np.mean(fit_s))})
    except KeyboardInterrupt:
        print(f"(Interrupted: {len(results)} of the {len(grid)} (strategy, seed, n) runs finished; their rows "
              "follow.)\n")
    return results


def _items(text: str) -> list[str]:
    """A comma-separated option's items; an empty option is none (--strategies "" skips the grid)."""
    return [item for item in text.split(",") if item]


def teach_table(results: list[dict]) -> list[dict]:
    """One row per (budget, strategy): pooled accuracy (mean over random seeds), its spread over folds (and over
    seeds for random) and the gain over random."""
    rows = []
    for n in sorted({r["n"] for r in results}):
        at_n = [r for r in results if r["n"] == n]
        random_acc = [r["acc"] for r in at_n if r["strategy"] == "random"]
        for strategy in dict.fromkeys(r["strategy"] for r in at_n):
            runs = [r for r in at_n if r["strategy"] == strategy]
            acc = float(np.mean([r["acc"] for r in runs]))
            folds = [a for r in runs for a in r["per_fold"]]
            rows.append({
                "reviews": n, "chosen by": strategy if strategy != "random" else f"random ({len(runs)} seeds)",
                "held-out acc": acc,
                "over seeds (min-max)": f"{min(r['acc'] for r in runs):.3f}-{max(r['acc'] for r in runs):.3f}"
                                        if len(runs) > 1 else "-",
                "per fold: mean ± sd (min-max)": f"{np.mean(folds):.3f} ± {np.std(folds):.3f} "
                                                 f"({min(folds):.2f}-{max(folds):.2f})",
                "vs random": f"{acc - np.mean(random_acc):+.3f}" if random_acc and strategy != "random" else "-",
                "model right on the chosen": float(np.mean([r["chosen_right"] for r in runs])),
                "fit s": float(np.mean([r["fit_s"] for r in runs])),
            })
    return rows


def stream(sources: np.ndarray, over: np.ndarray, right: np.ndarray, rng: np.random.Generator,
           gate: SourceGate | None = None) -> dict[str, dict]:
    """Photos through the auto-tag decision and a gate, source by source. `over`: confidence at or over the
    model's threshold; `right`: the model's tag equals the label. Per source: what was auto-tagged and right,
    spot checks spent, photos sent to review because the source was off, and the check that switched it off."""
    gate = gate or SourceGate()
    out = {}
    for source in dict.fromkeys(sources[np.argsort(sources, kind="stable")]):
        s = {"photos": 0, "over": 0, "auto": 0, "auto_right": 0, "spot": 0, "off_reviews": 0, "off_at": None}
        for i in np.flatnonzero(sources == source):
            s["photos"] += 1
            if not over[i]:
                continue
            s["over"] += 1
            if gate.allows_auto(source)[0]:
                s["auto"], s["auto_right"] = s["auto"] + 1, s["auto_right"] + bool(right[i])
                if rng.random() >= gate.spot_check_rate(source):
                    continue
                s["spot"] += 1
            else:
                s["off_reviews"] += 1
            gate.record(source, bool(right[i]))
            status = gate.status(source)
            if s["off_at"] is None and status["switch_offs"]:
                s["off_at"] = status["all_checks"]
        s["state"] = gate.status(source)["state"]
        out[str(source)] = s
    return out


def gate_row(name: str, s: dict) -> dict:
    return {"source": name, "photos": s["photos"], "over threshold": s["over"], "auto-tagged": s["auto"],
            "auto prec": s["auto_right"] / s["auto"] if s["auto"] else float("nan"), "spot checks": s["spot"],
            "reviewed while off": s["off_reviews"], "switched off at check": s["off_at"] or "-",
            "state at the end": s["state"]}


def total(per_source: dict[str, dict]) -> dict:
    keys = ("photos", "over", "auto", "auto_right", "spot", "off_reviews")
    t = {k: sum(s[k] for s in per_source.values()) for k in keys}
    off = [s["off_at"] for s in per_source.values() if s["off_at"]]
    return t | {"off_at": f"{len(off)} switched off" if off else None, "state": "-"}


def synthetic(rate: float, photos: int, draws: int) -> dict:
    """A source whose `photos` photos are all over the threshold and right with probability `rate`, streamed
    `draws` times: how many checks it took to switch it off, and what stayed auto-tagged."""
    off_at, auto, auto_right, spot, states = [], 0, 0, 0, []
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        s = stream(np.array(["synthetic"] * photos), np.ones(photos, bool), rng.random(photos) < rate, rng)["synthetic"]
        off_at += [s["off_at"]] if s["off_at"] else []
        auto, auto_right, spot = auto + s["auto"], auto_right + s["auto_right"], spot + s["spot"]
        states.append(s["state"])
    return {"right": f"{rate:.0%}", "photos per draw": photos, "draws": draws,
            "switched off": f"{len(off_at)} of {draws}",
            "checks to switch off: median (max)": f"{np.median(off_at):.0f} ({max(off_at)})" if off_at else "-",
            "auto-tagged per draw": auto / draws, "auto prec": auto_right / auto if auto else float("nan"),
            "spot checks per draw": spot / draws,
            "state at the end": ", ".join(f"{s} {states.count(s)}" for s in dict.fromkeys(states))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--backbone", default="mobilenet_v2+efficientnet_lite0")
    ap.add_argument("--model", required=True, help="make run's model: its predictions order the queue.")
    ap.add_argument("--labels", required=True)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--budgets", default="25,50,100", help="Photos labelled per head.")
    ap.add_argument("--strategies", default="badge,margin,random")
    ap.add_argument("--random-seeds", default="0,1,2,3,4")
    ap.add_argument("--repeat", type=int, default=10, help="fit-head --labelled-repeat.")
    ap.add_argument("--head", choices=("batchnorm", "fc"), default="batchnorm",
                    help="The head retrained per fold: bench/reviewed.py's (batchnorm), or the tuned linear head "
                         "(fc), several times cheaper to fit, for a machine too busy for the grid.")
    ap.add_argument("--gate-draws", type=int, default=200, help="Spot-check draws per simulated source.")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/review_queue"),
                    help="Scratch model and fits.jsonl, each finished fit's result: a rerun reuses them.")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the grid, print what it finished
    started = time.perf_counter()
    paths, cache, data, photos, groups, folds = grouped_photos(args.cache_dir, args.backbone, args.labels, args.folds)
    model = load_model(args.model)
    proba, hidden = model.proba(photos.features), model.head.embed(photos.features)
    base_right = predicted(cache, model, photos.features) == photos.labels
    over = proba.max(1) >= model.threshold
    print(f"{args.backbone} ({', '.join(Path(p).name for p in paths)}): {len(cache.classes)} classes; "
          f"{args.labels}: {len(data.paths)} photos, {len(set(groups))} contributors in {args.folds} folds of "
          f"{', '.join(str(len(h)) for _, h in folds)} photos (no contributor in two), as bench/reviewed.py. "
          f"Queue and auto-tags from {args.model} (threshold {model.threshold:.4f}, target "
          f"{model.target_precision:g}): right on {base_right.mean():.1%} of the photos, {int(over.sum())} over "
          f"its threshold, {base_right[over].mean():.1%} of those right.\n")

    print("### Labels that teach most: held-out accuracy after n reviews, chosen by the queue or at random\n")
    args.out.mkdir(parents=True, exist_ok=True)
    context = f"{', '.join(Path(p).name for p in paths)} {args.labels} {args.head}"
    print(markdown_table(teach_table(teach(cache, photos, folds, proba, hidden, base_right, context, args))))
    print(f"Each row pools the {len(photos.labels)} held-out photos of its heads (one per fold, trained on the "
          f"catalogue plus n of the other folds' photos x {args.repeat}); every head is "
          + ("bench/reviewed.py's (tuned batchnorm, one member, seed 0)" if args.head == "batchnorm" else
             "featpipe compare's tuned linear head (fc, seed 0), not bench/reviewed.py's batchnorm head")
          + "; the queue orders the other folds' photos once, by the model's "
          "predictions (no retraining between labels). badge and margin: order_queue with seed 0. per fold: "
          "the folds' accuracies (over every seed for random). model right on the chosen: the model's accuracy on "
          "the photos chosen, i.e. what the review page's 'accuracy on the photos reviewed so far' would show: "
          "the queue picks what the model gets wrong, so under it that number understates accuracy elsewhere.\n")

    print("### Per-source control, simulated: other-shops streamed by contributor through SourceGate's defaults\n")
    gate = SourceGate()
    per_source = stream(groups, over, base_right, np.random.default_rng(0), gate)
    shown = {name: s for name, s in per_source.items() if s["over"]}
    rows = [gate_row(name, s) for name, s in shown.items()] + [gate_row("all", total(per_source))]
    print(markdown_table(rows))
    print(f"SourceGate(target_precision={gate.target_precision}, alpha={gate.alpha}, probation_rate="
          f"{gate.probation_rate}, spot_rate={gate.spot_rate}, probation_checks={gate.probation_checks}); spot checks "
          f"drawn with seed 0. {len(per_source) - len(shown)} contributors with no photo over the threshold (all "
          "reviewed, no check) are left out of the rows but counted in 'all'.\n")
    print(markdown_table([synthetic(rate, 300, args.gate_draws) for rate in (0.7, 0.9, 0.97, 1.0)]))
    print(f"Synthetic sources: 300 photos each, every one over the threshold, right at the given rate; "
          f"{args.gate_draws} draws of their outcomes and spot checks. Whole run "
          f"{time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
