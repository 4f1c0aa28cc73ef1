"""The operator's review loop as a library: photos a model is unsure of, in the order that teaches the head the
most, turned into labels that `fit-head --labelled` trains on.

    session = ReviewSession(Predictor.load("model.pt"), ["shop-a/", "shop-b/"], "reviews.csv")
    item = session.queue("review", limit=1)[0]
    session.decide("c0ffee-1", item["index"], "label", "Tshirts", reviewer="ana")

Each photo's backbone features are computed once and kept beside the review file (`<out>.state/`), as are
each model's predictions and queue order, so a restart, or a queue of thousands, costs no forward pass.
Decisions go to a journal (`journal.DecisionJournal`, `<out>.journal.jsonl`) before they are acknowledged, and
the reviews csv (`file,<target>,reviewer,time,suggestion,confidence,source,decision_id`) is rewritten from it
after each one: the last decision on a photo wins, and 'skip' and 'not one of our classes' stay out of it.

Spot checks are a sample of the auto-tagged photos, at the rate `sources.SourceGate` sets per source (higher on
probation); whether an auto-tag survived its check feeds the gate, which stops auto-tagging a source whose
precision bound falls under the model's target: its auto-tagged photos join the review queue.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import atomic_path
from ..models import content_digest
from .journal import DecisionJournal
from .predictor import Predictor, expand_inputs
from .selection import STRATEGIES, order_queue
from .sources import SourceGate

KINDS = ("label", "skip", "not_ours")  # a class, "later", "not one of our classes"
TABS = ("review", "spot")


@dataclass
class ModelView:
    """What one model says about every photo: kept together so that a retrain swaps all of it at once."""

    predictor: Predictor
    proba: np.ndarray  # (photos, classes); rows of unreadable photos are zeros
    order: np.ndarray  # readable photo indices, the queue's order

    @cached_property
    def digest(self) -> str:
        """The model's digest, hashed once: it reads every weight of the head, and each decision records it."""
        return self.predictor.model.digest()


class ReviewSession:
    """Review `photos` (files or folders) with `predictor`; decisions journaled beside `out` (the reviews csv).

    sources: one name for every photo (e.g. a shop), or None for each photo's folder name. strategy: the queue's
    order (`selection.order_queue`: badge, margin or confidence). load_predictor: how a retrained model file is
    loaded (the options the first was loaded with). progress: called with the number of photos embedded."""

    def __init__(self, predictor: Predictor, photos: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                 source: str | None = None, strategy: str = "badge", gate: SourceGate | None = None, seed: int = 0,
                 load_predictor: Callable[[Path], Predictor] = Predictor.load,
                 progress: Callable[[int], None] | None = None):
        if strategy not in STRATEGIES:
            raise UserError(f"strategy {strategy!r}: choose from {', '.join(STRATEGIES)}")
        self.out = Path(out).absolute()
        self.state_dir = self.out.with_name(self.out.name + ".state")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.paths = [p.absolute() for p in expand_inputs(photos)]
        # photos are served only from under what was given: the folders, or the files themselves
        self.roots = [Path(p).resolve() for p in photos]
        # the csv names photos relative to the folder holding them all: `fit-head --labelled-root` reads them there
        given = [Path(p).absolute() for p in photos]
        self.label_root = Path(os.path.commonpath([p if p.is_dir() else p.parent for p in given]))
        self.files = [os.path.relpath(p, self.label_root) for p in self.paths]
        self.index_of = {f: i for i, f in enumerate(self.files)}
        self.sources = [source or p.parent.name for p in self.paths]
        self.strategy, self.seed, self.load_predictor = strategy, seed, load_predictor
        self.target = predictor.model.provenance.get("target") or "articleType"
        self.features, self.ok, self.errors = self._features(predictor, progress)
        self.gate = gate or SourceGate(target_precision=predictor.model.target_precision)
        self.view = self._view(predictor)
        self._spot_draw = np.array([_uniform(f, seed) for f in self.files])
        # decisions from concurrent requests update the state one at a time, and readers see it whole
        self._lock = threading.RLock()
        self.last: dict[str, dict] = {}  # file -> its latest decision
        self._checked: set[str] = set()  # files whose auto-tag the gate has heard about
        self.journal = DecisionJournal(self.out.with_name(self.out.name + ".journal.jsonl"))
        with self._lock:
            self._apply(self.journal.entries)
            self._write_csv()

    # -- features and predictions, computed once ----------------------------------------------------------------
    def _features(self, predictor: Predictor, progress) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Every photo's backbone features, from `features.npz` where a photo of that name, size and time is
        already there; the others embedded now and the file rewritten."""
        stored = self.state_dir / "features.npz"
        pipeline_key = content_digest({k: v for k, v in predictor.model.provenance.items() if k != "cache"})
        stamps = [_stamp(p) for p in self.paths]
        old = _read_state(stored, ("pipeline", "keys", "features", "ok", "errors"))
        if old is not None and str(old["pipeline"]) != pipeline_key:
            old = None
        known = {str(k): i for i, k in enumerate(old["keys"])} if old is not None else {}
        keys = [f"{p}|{s}" for p, s in zip(self.paths, stamps)]
        self.photos_key = hashlib.sha256("\n".join(keys).encode()).hexdigest()  # these photos, as they are now
        todo = [i for i, k in enumerate(keys) if k not in known]
        feats = np.zeros((len(keys), predictor.pipeline.dim), dtype=np.float32)
        ok = np.zeros(len(keys), dtype=bool)
        errors = [""] * len(keys)
        for i, k in enumerate(keys):
            if k in known:
                j = known[k]
                feats[i], ok[i], errors[i] = old["features"][j], old["ok"][j], str(old["errors"][j])
        if todo:
            new_feats, new_ok, new_errors = predictor.pipeline.embed([self.paths[i] for i in todo], progress)
            feats[todo], ok[todo] = new_feats, new_ok
            for i, e in zip(todo, new_errors):
                errors[i] = e
            with atomic_path(stored) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, pipeline=np.array(pipeline_key), keys=np.array(keys), features=feats, ok=ok,
                         errors=np.array(errors))
        elif progress is not None:
            progress(len(keys))
        return feats, ok, errors

    def _view(self, predictor: Predictor) -> ModelView:
        """The model's probabilities and queue order, read from `<state>/model-<digest>-<strategy>-<seed>.npz` when
        a previous run stored them for the same photos (the order costs seconds on thousands of photos)."""
        model = predictor.model
        stored = self.state_dir / f"model-{model.digest()[:16]}-{self.strategy}-{self.seed}.npz"
        rows = np.flatnonzero(self.ok)
        kept = _read_state(stored, ("photos", "proba", "order"))
        if kept is not None and str(kept["photos"]) == self.photos_key:
            return ModelView(predictor, kept["proba"], kept["order"])
        proba = np.zeros((len(self.paths), len(model.classes)))
        if len(rows):
            proba[rows] = predictor.proba(self.features[rows])  # the confidences `featpipe predict` gives
            order = rows[order_queue(proba[rows], model.head.embed(self.features[rows]), self.strategy, self.seed)]
        else:
            order = rows
        with atomic_path(stored) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, photos=np.array(self.photos_key), proba=proba, order=order)
        return ModelView(predictor, proba, order)

    def use_model(self, predictor: Predictor) -> None:
        """Predict and re-rank the queue with another model (a retrained head on the same backbones)."""
        if predictor.pipeline.dim != self.features.shape[1]:
            raise UserError("the new model reads other features than the photos were embedded with; start a new "
                            "review with it (another --out)")
        self.view = self._view(predictor)

    # -- what a photo is and what the model says ----------------------------------------------------------------
    def photo_file(self, index: int) -> Path:
        """The file of photo `index`, refused (PermissionError) when it resolves outside the folders given, e.g.
        through a symbolic link."""
        if not 0 <= index < len(self.paths):
            raise IndexError(f"photo {index}: there are {len(self.paths)} photos (0 to {len(self.paths) - 1})")
        real = self.paths[index].resolve()
        if not any(real == root or real.is_relative_to(root) for root in self.roots):
            raise PermissionError(f"photo {index} leads outside the photo folders given")
        return real

    def item(self, index: int, view: ModelView | None = None) -> dict:
        """Photo `index` as the page shows it: its model's top 3, whether it is auto-tagged, why not."""
        view = view or self.view
        if not 0 <= index < len(self.paths):
            raise IndexError(f"photo {index}: there are {len(self.paths)} photos (0 to {len(self.paths) - 1})")
        source = self.sources[index]
        out = {"index": index, "file": self.files[index], "name": self.paths[index].name, "source": source,
               "decision": self.last.get(self.files[index])}
        if not self.ok[index]:
            return out | {"error": self.errors[index], "status": "error"}
        p = view.proba[index]
        top = np.argsort(-p, kind="stable")[:3]
        classes = view.predictor.classes
        confidence, threshold = float(p[top[0]]), view.predictor.threshold
        allowed, why_not = self.gate.allows_auto(source)
        if confidence < threshold:
            status, reason = "review", view.predictor.why_not_auto(confidence)
        elif not allowed:
            status, reason = "review", why_not
        else:
            status, reason = "auto", ""
        return out | {"suggestion": classes[top[0]], "confidence": round(confidence, 6), "status": status,
                      "reason": reason, "top": [{"label": classes[i], "p": round(float(p[i]), 6)} for i in top]}

    def similar(self, index: int, k: int = 6) -> list[dict]:
        """The k catalogue products nearest photo `index` in the model's embedding (as `Predictor.similar`,
        from the stored features: no forward pass); `image` names the product's file under
        `catalogue_images()`. UserError when the model's catalogue is not on this machine."""
        view = self.view
        if not self.item(index, view).get("top"):
            return []
        catalogue = view.predictor.catalogue
        vector = view.predictor.model.head.embed(self.features[index:index + 1])[0]
        found = catalogue.search(vector, k, catalogue.allowed({}))
        return [{c: v for c, v in item.items() if c != "path"} | {"image": f"{item['id']}.jpg"} for item in found]

    def catalogue_images(self) -> Path | None:
        """The folder of the catalogue's images, when it is on this machine."""
        try:
            root = self.view.predictor.catalogue.image_root
        except UserError:
            return None
        folder = Path(root) / "images" if root else None
        return folder if folder is not None and folder.is_dir() else None

    def queue(self, tab: str = "review", limit: int = 20) -> list[dict]:
        """The next `limit` undecided photos of a tab. review: those the model (or the gate) leaves to a person,
        in the queue's order, skipped ones after the rest; spot: a sample of the auto-tagged ones, each source's
        at its spot-check rate, in a seeded random order."""
        if tab not in TABS:
            raise UserError(f"tab {tab!r}: choose from {', '.join(TABS)}")
        if limit < 1:
            raise UserError(f"limit {limit}: must be at least 1")
        view = self.view
        wanted = self._tab_rows(tab, view)
        fresh, skipped = [], []
        for i in wanted:
            last = self.last.get(self.files[i])
            if last is None:
                fresh.append(int(i))
            elif last["kind"] == "skip" and tab == "review":
                skipped.append(int(i))
            if len(fresh) >= limit:
                break
        return [self.item(i, view) for i in (fresh + skipped)[:limit]]

    def _tab_rows(self, tab: str, view: ModelView) -> np.ndarray:
        confident = view.proba.max(axis=1) >= view.predictor.threshold
        allowed = {s: self.gate.allows_auto(s)[0] for s in set(self.sources)}
        auto = confident & np.array([allowed[s] for s in self.sources], dtype=bool) & self.ok
        if tab == "review":
            return view.order[~auto[view.order]]
        rate = {s: self.gate.spot_check_rate(s) for s in allowed}
        rows = np.flatnonzero(auto & (self._spot_draw < np.array([rate[s] for s in self.sources])))
        return rows[np.argsort(self._spot_draw[rows], kind="stable")]

    # -- decisions ----------------------------------------------------------------------------------------------
    def decide(self, decision_id: str, index: int, kind: str, label: str | None = None,
               reviewer: str = "") -> tuple[dict, bool]:
        """Record a decision on photo `index`: kind 'label' (with `label`, one of the model's classes), 'skip' or
        'not_ours'. Durable when this returns. Returns (the recorded decision, False when `decision_id` was
        already recorded: then the first one stands). A decision on a photo the model is confident about checks
        an auto-tag (`spot`), whether it came from the spot-check tab or from a source the gate switched off, so
        a switched-off source can earn its certification back."""
        if kind not in KINDS:
            raise UserError(f"kind {kind!r}: choose from {', '.join(KINDS)}")
        view = self.view
        item = self.item(index, view)
        if item["status"] == "error":
            raise UserError(f"photo {index} ({item['name']}) could not be read ({item['error']}); nothing to decide")
        if kind == "label" and label not in view.predictor.classes:
            raise UserError(f"label {label!r}: not one of the model's {len(view.predictor.classes)} classes; use "
                            "'not_ours' for a photo of another class")
        entry = {"id": decision_id, "file": self.files[index], "kind": kind,
                 "label": label if kind == "label" else "", "reviewer": reviewer[:100],
                 "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "suggestion": item["suggestion"], "confidence": item["confidence"], "source": item["source"],
                 "spot": bool(view.proba[index].max() >= view.predictor.threshold), "model": view.digest}
        with self._lock:  # journal order is the order decisions are applied in: the last one wins everywhere
            recorded, new = self.journal.append(entry)
            self._apply(new)
            if new:
                self._write_csv()
        return recorded, recorded is entry

    def sync(self) -> None:
        """Take in what other processes journaled meanwhile."""
        with self._lock:
            new = self.journal.refresh()
            if new:
                self._apply(new)
                self._write_csv()

    def _apply(self, entries: list[dict]) -> None:
        for e in entries:
            self.last[e["file"]] = e
            # an auto-tag checked, once per photo: right when confirmed as it was
            if e.get("spot") and e["kind"] != "skip" and e["file"] not in self._checked:
                self._checked.add(e["file"])
                self.gate.record(e["source"], e["kind"] == "label" and e["label"] == e["suggestion"])

    def _write_csv(self) -> None:
        with atomic_path(self.out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            fh.write(self.csv_text())

    def csv_text(self) -> str:
        """The reviews csv: one row per photo whose latest decision is a label."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["file", self.target, "reviewer", "time", "suggestion", "confidence", "source", "decision_id"])
        with self._lock:
            latest = list(self.last.values())
        for e in latest:
            if e["kind"] == "label":
                w.writerow([e["file"], e["label"], e["reviewer"], e["time"], e["suggestion"], e["confidence"],
                            e["source"], e["id"]])
        return buf.getvalue()

    # -- progress -----------------------------------------------------------------------------------------------
    def labels(self) -> dict[int, str]:
        """Photo index -> its reviewed label (latest decision a label), for photos of this session."""
        with self._lock:
            latest = list(self.last.items())
        return {self.index_of[f]: e["label"] for f, e in latest
                if e["kind"] == "label" and f in self.index_of and self.ok[self.index_of[f]]}

    def progress(self) -> dict:
        """Counts, the progressive-validation accuracy (each reviewed photo scored on the suggestion the model
        made before its label was given, so no hold-out is needed) and the gate's state per source."""
        with self._lock:
            latest, checked = list(self.last.values()), len(self._checked)
        reviewed = [e for e in latest if e["kind"] == "label" and not e.get("spot")]
        right = sum(e["label"] == e["suggestion"] for e in reviewed)
        sources = sorted(set(self.sources) | {e["source"] for e in latest})
        gate = [{"source": s, **self.gate.status(s), "auto": self.gate.allows_auto(s)[0],
                 "spot_rate": self.gate.spot_check_rate(s)} for s in sources]
        view = self.view
        decided = {e["file"] for e in latest}
        to_review = sum(self.files[i] not in decided for i in self._tab_rows("review", view))
        return {"photos": len(self.paths), "unreadable": int((~self.ok).sum()), "decided": len(latest),
                "labelled": sum(e["kind"] == "label" for e in latest),
                "skipped": sum(e["kind"] == "skip" for e in latest),
                "not_ours": sum(e["kind"] == "not_ours" for e in latest),
                "spot_checked": checked,
                "to_review": to_review,
                "progressive": {"n": len(reviewed), "correct": right,
                                "accuracy": right / len(reviewed) if reviewed else None},
                "sources": gate, "model": {"digest": view.digest, "source": view.predictor.source,
                                           "threshold": _finite(view.predictor.threshold)}}

    def recent(self, n: int = 10) -> list[dict]:
        """The latest `n` decisions, newest first."""
        return [{k: e.get(k) for k in ("id", "file", "kind", "label", "suggestion", "source", "time", "spot")}
                | {"index": self.index_of.get(e["file"])} for e in self.journal.entries[::-1][:n]]


def _read_state(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """A stored state file's arrays, or None when there is none or it cannot be read (it is then recomputed)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in keys}
    except (OSError, KeyError, ValueError):
        return None


def _stamp(path: Path) -> str:
    try:
        st = path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "missing"


def _uniform(name: str, seed: int) -> float:
    """A photo's own draw in [0, 1): the same in every process and run, so the spot-check sample is stable."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") / 2 ** 64


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
