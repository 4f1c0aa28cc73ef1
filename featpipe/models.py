"""Model files: a fitted head plus everything needed to rebuild its input pipeline from images.

Saved with torch.save as plain values and tensors, so `torch.load(weights_only=True)` reads it
without unpickling arbitrary objects.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .bagging import FoldBag, head_from_state
from .calibrate import softmax
from .errors import UserError
from .files import atomic_path
from .heads import TorchHead
from .store import same_images

FORMAT = "featpipe-model"
FORMAT_VERSION = 1
MODEL_KEYS = ("head", "classes", "provenance", "temperature", "threshold", "target_precision", "metrics")
PROVENANCE_KEYS = ("backbone", "weights_id", "preprocessing", "target", "cache")  # a joined cache's too


class ModelError(UserError):
    """A model file that is missing, foreign, or does not fit the features it is given."""


@dataclass
class Model:
    head: TorchHead | FoldBag  # a bag: fit-head --cross-fit
    classes: list[str]  # names, in the order of the head's outputs
    provenance: dict  # backbone, weights, weights_id, preprocessing, ... of the training cache
    temperature: float = 1.0
    threshold: float = float("inf")  # calibrated confidence at or above which a tag is 'auto'
    target_precision: float = 0.99
    metrics: dict = field(default_factory=dict)

    def proba(self, features: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities."""
        return softmax(self.head.logits(features), self.temperature)

    def digest(self) -> str:
        """Short content hash of the head's weights: names what an index built on its embedding holds."""
        h = hashlib.sha256()
        top = self.provenance.get("finetune", {}).get("state_dict", {})  # a fine-tuned model's own blocks
        for name, t in [*top.items(), *self.head.module_.state_dict().items()]:
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    def check_features(self, attrs: dict) -> None:
        """Refuse features from another backbone, weights, preprocessing or runtime than the training cache,
        and any cache's features for a fine-tuned model (its head reads what its own blocks make of a photo)."""
        if "finetune" in self.provenance:
            raise ModelError(f"this model fine-tuned the backbone after {self.provenance['finetune']['block']}, so a "
                             "cache's features are not its input; use it on photos (predict, evaluate)")
        default = {"runtime": "torch"}  # files from before runtimes existed were torch's
        for key in ("backbone", "weights_id", "preprocessing", "runtime", "runtime_id"):
            if attrs.get(key, default.get(key)) != self.provenance.get(key, default.get(key)):
                raise ModelError(f"model was trained on {key}={self.provenance.get(key)!r} features, "
                                 f"but these are {key}={attrs.get(key)!r}; use a cache or model that match")

    def check_labels(self, provenance: dict, classes: list[str]) -> None:
        """Refuse to score against a cache whose labels mean something else: another target, other class
        names (label indices would be compared across different lists), or other images or another split
        (its test images may be this model's training images). `provenance`: the cache's
        (`FeatureCache.provenance`)."""
        if provenance.get("target") != self.provenance.get("target"):
            raise ModelError(f"model predicts {self.provenance.get('target')!r}, but the cache is labelled by "
                             f"{provenance.get('target')!r}; use a cache extracted with --target {self.provenance.get('target')}")
        if list(classes) != list(self.classes):
            missing, extra = sorted(set(self.classes) - set(classes)), sorted(set(classes) - set(self.classes))
            detail = "; ".join(f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                               for label, names in (("not in the cache", missing), ("not in the model", extra)) if names)
            raise ModelError(f"the cache's {len(classes)} classes are not the model's {len(self.classes)} "
                             f"({detail or 'same names, another order'}); score it on the cache it was trained on, "
                             "or use `featpipe evaluate` with a labels csv, which matches classes by name")
        if not same_images(provenance, self.provenance) or any(provenance.get(k) != self.provenance.get(k)
                                                               for k in ("split_fractions", "split_seed")):
            raise ModelError("the cache was built from another version of the dataset or split than the model's, so "
                             "its test split may hold the model's training images; score it on the cache it was trained on, "
                             "or use `featpipe evaluate` on photos it has not seen")
        self._check_test_rows(provenance.get("test_rows"))

    def _check_test_rows(self, cache_rows: dict | None) -> None:
        """The cache's test rows must be the ones the model was scored on (`FeatureCache.test_rows`): a cache of
        the same images with a split that moved would score the model partly on its own training photos.
        Models from before test rows were recorded carry none, and only the checks above apply to them."""
        recorded = self.provenance.get("test_rows")
        if recorded is None or cache_rows == recorded:
            return
        now, then = set(cache_rows["ids"]), set(recorded["ids"])
        moved = sorted(now - then)
        what = (f"{len(moved)} of its {len(now)} test images (e.g. id {moved[0]}) were not test images when the model "
                "was scored" if moved else f"{len(then - now) or 'some'} of the model's {len(then)} test images are "
                "not test images of the cache or have other bytes")
        raise ModelError(f"the cache's test split is not the one this model was scored on: {what}, so they may be "
                         "images it trained on; score it on the cache it was trained on, or use `featpipe evaluate` "
                         "on photos it has not seen")

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"head": self.head.to_state(), "classes": self.classes, "provenance": self.provenance,
                "temperature": self.temperature, "threshold": self.threshold,
                "target_precision": self.target_precision, "metrics": self.metrics}
        with atomic_path(path) as tmp:
            torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "checksum": content_digest(body)} | body, tmp)
        return path


def content_digest(value) -> str:
    """sha256 over a model file's values: tensors by dtype, shape and bytes, everything else by repr.

    torch.load does not verify the bytes of the tensors it reads, so a damaged file would otherwise
    load and predict confidently wrong labels."""
    h = hashlib.sha256()

    def feed(v) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(v.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(v, dict):
            h.update(b"{")
            for k in sorted(v, key=repr):
                h.update(repr(k).encode())
                feed(v[k])
            h.update(b"}")
        elif isinstance(v, (list, tuple)):
            h.update(b"[")
            for x in v:
                feed(x)
            h.update(b"]")
        else:
            h.update(repr(v).encode())

    feed(value)
    return h.hexdigest()


def load_model(path: str | os.PathLike) -> Model:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file; train one with `featpipe fit-head --out {path}`")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{path}: not a featpipe model file ({type(exc).__name__})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ModelError(f"{path}: not a featpipe model file")
    if d.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{path}: model format {d.get('format_version')} is not {FORMAT_VERSION}; retrain it")
    body = {k: v for k, v in d.items() if k not in ("format", "format_version", "checksum")}
    if "checksum" in d and d["checksum"] != content_digest(body):  # files from before checksums have none
        raise ModelError(f"{path}: damaged (its content does not match its checksum); restore it or retrain it")
    missing = [k for k in MODEL_KEYS if k not in d]
    missing += [f"provenance {k}" for k in PROVENANCE_KEYS if k not in d.get("provenance", {k: None})]
    if missing:
        raise ModelError(f"{path}: not a complete featpipe model file (no {', '.join(missing)}); retrain it")
    try:
        head = head_from_state(d["head"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a head state without a key or of other shapes
        raise ModelError(f"{path}: its head is incomplete or inconsistent ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); retrain it") from None
    return Model(head, d["classes"], d["provenance"], d["temperature"], d["threshold"], d["target_precision"],
                 d["metrics"])
