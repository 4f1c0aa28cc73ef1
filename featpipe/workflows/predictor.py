"""A model kept loaded: photos -> tags with a decision an operator can act on ('auto' or 'review'), and
photos or catalogue ids -> similar products.

    from featpipe import Predictor
    predictor = Predictor.load("runs/model.pt")          # or a bundle folder (`featpipe bundle`)
    for p in predictor.predict(["photo.jpg"]):
        print(p.label, p.confidence, p.decision)
    predictor.similar(12345, k=5, where={"gender": "women"})

Loading builds every backbone once (`features.pipeline.FeaturePipeline`; the converted and compiled
networks are kept on disk, so the next process loads them in seconds), keeps the head in memory and, on the
first `similar`, the catalogue's embeddings (`workflows.catalogue`). `featpipe predict`, `evaluate`,
`similar --model` and `serve` are thin layers over it.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..features.networks import NetworkStore
from ..features.pipeline import FeaturePipeline, ImageSource
from ..models import Model, load_model
from .catalogue import Catalogue

HEAD_ROWS = 8  # the head runs on blocks of this many photos (`Predictor.proba`)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def expand_inputs(items: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded to the image files inside them (sorted)."""
    paths: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(item)
    if not paths:
        raise UserError(f"no images found in {', '.join(map(str, items)) or 'the arguments'}")
    return paths


@dataclass
class Prediction:
    path: str
    label: str = ""
    confidence: float = float("nan")
    decision: str = "error"  # 'auto' (confidence >= the model's threshold), 'review' or 'error'
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str = ""
    reason: str = ""  # why a photo was not auto-tagged

    def as_row(self) -> dict:
        ok = self.decision != "error"  # JSON has no NaN: an unreadable file has no confidence (null)
        return {"path": self.path, "label": self.label, "confidence": round(self.confidence, 6) if ok else None,
                "decision": self.decision, "top_k": [{"label": c, "p": round(p, 6)} for c, p in self.top_k],
                "reason": self.reason, "error": self.error}


class Predictor:
    """`model` with its input pipeline built once. Options: device, runtime, allow_runtime_mix, flip and
    batch_size as for `FeaturePipeline`; networks, the store of converted networks; search_path, folders
    where the backbone weights may be (found by digest); catalogue, the items `similar` searches, or a
    function that loads them (default: the cache the model was trained on, embedded on first use).
    When OpenVINO runs every backbone on the CPU, torch (the head) is set to one thread for the process."""

    def __init__(self, model: Model, *, device: str = "auto", runtime: str | None = None,
                 allow_runtime_mix: bool = False, flip: bool = False, batch_size: int = 64,
                 networks: NetworkStore | None = None, search_path: Sequence[str | os.PathLike] = (),
                 catalogue: Catalogue | Callable[[], Catalogue | None] | None = None,
                 source: str | os.PathLike | None = None):
        self.model = model
        self.source = str(source) if source is not None else None
        self.pipeline = FeaturePipeline(model.provenance, device=device, runtime=runtime,
                                        allow_runtime_mix=allow_runtime_mix, flip=flip, batch_size=batch_size,
                                        networks=networks, search_path=search_path)
        self._catalogue = catalogue
        self._lock = threading.Lock()  # one forward pass at a time: OpenVINO's request queues are not shared
        if self.pipeline.device.type == "cpu" and "torch" not in self.pipeline.runtimes:
            # the head is a few small matrix products per photo; on torch's OpenMP threads it waits at a barrier
            # for cores that OpenVINO's streams and the decoding threads hold, at many times its own cost
            torch.set_num_threads(1)

    @classmethod
    def load(cls, path: str | os.PathLike, **options) -> "Predictor":
        """A model file, or a bundle folder (`workflows.bundle`) with its networks, weights and catalogue."""
        path = Path(path)
        if path.is_dir():
            from .bundle import read_bundle

            bundle = read_bundle(path)
            options["networks"] = bundle.networks(options.get("networks"))
            options["search_path"] = [*options.get("search_path", ()), bundle.weights_dir]
            options.setdefault("catalogue", bundle.catalogue)
            return cls(bundle.model, source=path, **options)
        return cls(load_model(path), source=path, **options)

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    @property
    def threshold(self) -> float:
        return self.model.threshold

    def decode(self, source: ImageSource, max_pixels: int | None = None) -> tuple[np.ndarray, ...]:
        """One photo (a path or encoded bytes) decoded for this model's backbones; raises OSError or ValueError
        when it cannot be read (`FeaturePipeline.decode`)."""
        return self.pipeline.decode(source, max_pixels)

    def predict_decoded(self, decoded: Sequence[tuple[np.ndarray, ...]], names: Sequence[str],
                        top_k: int = 3) -> list[Prediction]:
        """Predictions for photos already decoded (`decode`), named `names` in the answers."""
        _check_top_k(top_k)
        with self._lock:
            feats = self.pipeline.features(decoded)
        return self._predictions(feats, np.ones(len(names), dtype=bool), [""] * len(names), names, top_k)

    def predict(self, images: Sequence[ImageSource] | str | os.PathLike, top_k: int = 3,
                progress: Callable[[int], None] | None = None) -> list[Prediction]:
        """Top-k calibrated labels for photos: paths (folders expand to their images) or encoded bytes.
        An unreadable photo gets decision 'error' and its reason, and does not stop the others."""
        _check_top_k(top_k)
        if isinstance(images, (str, os.PathLike)):
            images = [images]
        paths = [x for x in images if not isinstance(x, bytes)]
        sources: list[ImageSource] = (list(expand_inputs(paths)) if len(paths) == len(images) else list(images))
        names = [str(s) if not isinstance(s, bytes) else f"upload-{i}" for i, s in enumerate(sources)]
        with self._lock:
            feats, ok, errors = self.pipeline.embed(sources, progress)
        return self._predictions(feats, ok, errors, names, top_k)

    def _predictions(self, feats: np.ndarray, ok: np.ndarray, errors: list[str], names: Sequence[str],
                     top_k: int) -> list[Prediction]:
        proba = self.proba(feats[ok])
        out, row = [], 0
        for name, good, err in zip(names, ok, errors):
            if not good:
                out.append(Prediction(name, error=err))
                continue
            p = proba[row]
            row += 1
            best = np.argsort(-p, kind="stable")[:top_k]
            conf = float(p[best[0]])
            auto = conf >= self.threshold
            out.append(Prediction(name, self.classes[best[0]], conf, "auto" if auto else "review",
                                  [(self.classes[i], float(p[i])) for i in best],
                                  reason="" if auto else self.why_not_auto(conf)))
        return out

    def why_not_auto(self, confidence: float) -> str:
        """Why a photo of this confidence is not auto-tagged by the model (a reason an operator reads)."""
        if not np.isfinite(self.threshold):
            return "this model auto-tags nothing: no threshold reached its target precision on calibration"
        return f"confidence {confidence:.4f} is under the auto-tag threshold {self.threshold:.4f}"

    def proba(self, feats: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of photos' features (`pipeline.embed`), as predict computes them:
        model.proba in blocks of HEAD_ROWS rows, the last padded: a matrix product's rows come out bit for bit
        the same whatever else is in a block of one shape, while blocks of other shapes differ in the last bits.
        A photo's confidence is then the same alone, in a folder, or in a batch of other clients' photos."""
        out = np.zeros((len(feats), len(self.classes)))
        for start in range(0, len(feats), HEAD_ROWS):
            block = feats[start:start + HEAD_ROWS]
            padded = np.zeros((HEAD_ROWS, feats.shape[1]), dtype=np.float32)
            padded[:len(block)] = block
            out[start:start + len(block)] = self.model.proba(padded)[:len(block)]
        return out

    @property
    def catalogue(self) -> Catalogue:
        """The items `similar` searches, loaded on first use: a bundle's, or the training cache's."""
        if callable(self._catalogue):
            self._catalogue = self._catalogue()
        if self._catalogue is None:
            self._catalogue = Catalogue.for_model(self.model)
        return self._catalogue

    @catalogue.setter
    def catalogue(self, catalogue: Catalogue) -> None:
        self._catalogue = catalogue

    def similar(self, query: int | ImageSource, k: int = 10, where: dict[str, str] | None = None,
                same: tuple[str, ...] = ()) -> list[dict]:
        """The k catalogue items most similar to `query`, in the head's embedding: a catalogue id (the item
        itself is left out), or a photo (path or bytes). where: column=value filters (any case); same:
        columns whose value must equal the query item's."""
        if k < 1:
            raise UserError(f"k {k}: must be at least 1")
        catalogue = self.catalogue
        if isinstance(query, (int, np.integer)):
            row = catalogue.row_of(int(query))
            vector = catalogue.vectors[row].astype(np.float32)
            mask = catalogue.allowed(where or {}, same, row)
            mask[row] = False
        else:
            with self._lock:
                feats, ok, errors = self.pipeline.embed([query])
            if not ok[0]:
                raise UserError(f"{query if not isinstance(query, bytes) else 'the upload'}: unreadable image "
                                f"({errors[0]})")
            vector = self.model.head.embed(feats)[0]
            mask = catalogue.allowed(where or {}, same, None)
        return catalogue.search(vector, k, mask, tuple(dict.fromkeys([*(where or {}), *same])))

    def describe(self) -> dict:
        """What the model is: classes, threshold, and where its features and head came from."""
        prov = self.model.provenance
        parts = prov.get("parts") or [prov]
        m = self.model.metrics
        threshold = self.threshold if np.isfinite(self.threshold) else None  # None: nothing is auto-tagged
        return {"source": self.source, "classes": self.classes, "threshold": threshold,
                "target_precision": self.model.target_precision, "head": self.model.head.head,
                "digest": self.model.digest(), "target": prov.get("target"),
                "backbones": [{k: p.get(k) for k in ("backbone", "weights_id", "runtime", "preprocessing")}
                              for p in parts],
                "metrics": {k: m.get(k) for k in ("accuracy", "weighted_f1", "macro_f1", "test_coverage",
                                                  "test_precision", "n_train", "calibrated_on", "train_labelled")}}


def _check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise UserError(f"top_k {top_k}: must be at least 1")


def predict_images(model: Model, inputs: Sequence[ImageSource], top_k: int = 3, **options) -> list[Prediction]:
    """One-off: `Predictor(model, **options).predict(inputs, top_k)`. Keep a Predictor to predict again."""
    return Predictor(model, **options).predict(inputs, top_k)
