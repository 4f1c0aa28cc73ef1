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

from .calibrate import softmax
from .heads import TorchHead

FORMAT = "featpipe-model"
FORMAT_VERSION = 1


class ModelError(ValueError):
    """A model file that is missing, foreign, or does not fit the features it is given."""


@dataclass
class Model:
    head: TorchHead
    classes: list[str]  # names, in the order of the head's outputs
    provenance: dict  # backbone, weights, weights_id, preprocessing, ... of the training cache
    temperature: float = 1.0
    threshold: float = float("inf")  # calibrated confidence at or above which a tag is 'auto'
    target_precision: float = 0.99
    metrics: dict = field(default_factory=dict)

    def proba(self, features: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities."""
        return softmax(self.head.decision_function(features), self.temperature)

    def digest(self) -> str:
        """Short content hash of the head's weights: names what an index built on its embedding holds."""
        h = hashlib.sha256()
        for name, t in self.head.module_.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    def check_features(self, attrs: dict) -> None:
        """Refuse features from another backbone, weights, preprocessing or runtime than the training cache."""
        default = {"runtime": "torch"}  # files from before runtimes existed were torch's
        for key in ("backbone", "weights_id", "preprocessing", "runtime", "runtime_id"):
            if attrs.get(key, default.get(key)) != self.provenance.get(key, default.get(key)):
                raise ModelError(f"model was trained on {key}={self.provenance.get(key)!r} features, "
                                 f"but these are {key}={attrs.get(key)!r}; use a cache or model that match")

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "head": self.head.to_state(),
                    "classes": self.classes, "provenance": self.provenance, "temperature": self.temperature,
                    "threshold": self.threshold, "target_precision": self.target_precision,
                    "metrics": self.metrics}, tmp)
        os.replace(tmp, path)
        return path


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
    return Model(TorchHead.from_state(d["head"]), d["classes"], d["provenance"], d["temperature"],
                 d["threshold"], d["target_precision"], d["metrics"])
