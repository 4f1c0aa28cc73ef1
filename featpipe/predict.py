"""Model file -> tags for new photos, with a decision an operator can act on ('auto' or 'review')."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backbones import WeightsError, get_spec, load_backbone, split_backbone, weights_identity
from .devices import resolve_device
from .embed import iter_features
from .errors import UserError
from .images import Preprocessing
from .models import Model
from .runtimes import Forward, RuntimeUnavailable, check_runtime, flip_averaged, make_forward

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


def pipeline_weights(provenance: dict, override: str | None = None) -> str:
    """The weights argument that rebuilds the recorded backbone, checked against its recorded identity."""
    try:
        get_spec(provenance["backbone"])
    except WeightsError as exc:  # the recorded backbone itself cannot be built here: no weights file is at fault
        raise UserError(f"the features were made with backbone {provenance['backbone']!r}, which this featpipe "
                        f"cannot build ({exc}); use a model or cache of a backbone it has") from None
    weights = override or provenance["weights"]
    try:
        actual = weights_identity(provenance["backbone"], weights)
    except WeightsError:
        raise WeightsError(f"the backbone weights {weights!r} recorded with these features are not on this machine; "
                           "pass --weights PATH to the same file") from None
    if actual != provenance["weights_id"]:
        raise WeightsError(f"--weights {weights} is {actual}, but the features were made with "
                           f"{provenance['weights_id']}; pass the same weights")
    return weights


def pipeline_runtime(provenance: dict, override: str | None = None, allow_mix: bool = False) -> str:
    """The runtime the features were made with; another one only when the caller says a mix is fine."""
    recorded = provenance.get("runtime", "torch")  # caches from before runtimes existed were torch's
    if override and override != recorded and not allow_mix:
        raise RuntimeUnavailable(f"--runtime {override}: the features were made with {recorded}, and another "
                                 "runtime gives slightly different features; pass --allow-runtime-mix to use it anyway")
    return override or recorded


def pipeline_forward(provenance: dict, weights: str | None = None, batch_size: int = 64, device: str = "auto",
                     runtime: str | None = None, allow_runtime_mix: bool = False, flip: bool = False,
                     bottom: bool = False) -> tuple[Forward, Preprocessing, torch.device]:
    """The exact backbone, preprocessing and runtime recorded in `provenance`, ready to run batches.
    A fine-tuned model's provenance carries its last blocks: they run in torch on what the frozen part gives.
    flip: average each image's features with its mirror image's (test-time augmentation).
    bottom: only the frozen part that fine-tuning starts from (`backbones.split_backbone`), its output
    flattened per image: the activations `extract --activations` caches."""
    recorded = runtime is None
    runtime = pipeline_runtime(provenance, runtime, allow_runtime_mix)
    dev = resolve_device(device)
    try:
        check_runtime(runtime, dev)
    except RuntimeUnavailable as exc:
        if not recorded:
            raise
        # its advice names another runtime, which this model's features also need told it may mix
        raise RuntimeUnavailable(f"{exc} and --allow-runtime-mix: this model's features were made with {runtime}, "
                                 "which cannot run here") from None
    model, _ = load_backbone(provenance["backbone"], pipeline_weights(provenance, weights))
    pre = Preprocessing.from_dict(provenance["preprocessing"])
    finetune = provenance.get("finetune")
    if bottom or finetune:
        model, top = split_backbone(model, provenance["backbone"])
    int8 = provenance.get("runtime_model")
    forward = make_forward(model, runtime, dev, pre, batch_size, Path(int8) if int8 else None,
                           provenance.get("runtime_id"))
    if bottom:
        forward = _flattened(forward)
    elif finetune:
        top.load_state_dict(finetune["state_dict"])
        forward = _then(forward, top.eval())
    return (flip_averaged(forward) if flip else forward), pre, dev


def _flattened(forward: Forward) -> Forward:
    return lambda batch: forward(batch).reshape(len(batch), -1)


def _then(forward: Forward, top: torch.nn.Module) -> Forward:
    """`forward`, then `top` in torch on the CPU."""
    def run(batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return top(torch.as_tensor(forward(batch), dtype=torch.float32)).numpy()

    return run


def embed_images(provenance: dict, paths: Sequence[Path], weights: str | None = None, batch_size: int = 64,
                 workers: int | None = None, device: str = "auto", runtime: str | None = None,
                 allow_runtime_mix: bool = False, flip: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features of `paths` through `pipeline_forward`: (features, ok flags, errors). A model on joined
    caches runs each part's pipeline and joins their features as the caches were joined."""
    if "parts" in provenance:
        if weights:
            raise UserError("--weights: this model runs several backbones, each with the weights it recorded; "
                            "leave --weights out")
        runs = [embed_images(p, paths, None, batch_size, workers, device, runtime, allow_runtime_mix, flip)
                for p in provenance["parts"]]
        errors = [next((e for e in errs if e), "") for errs in zip(*(r[2] for r in runs))]
        return np.hstack([r[0] for r in runs]), np.logical_and.reduce([r[1] for r in runs]), errors
    forward, pre, dev = pipeline_forward(provenance, weights, batch_size, device, runtime, allow_runtime_mix, flip)
    feats, oks, errs = [], [], []
    for _, f, ok, e in iter_features(forward, paths, pre, dev.type, batch_size, workers):
        feats.append(f)
        oks.append(ok)
        errs += e
    return np.concatenate(feats), np.concatenate(oks), errs


@dataclass
class Prediction:
    path: str
    label: str = ""
    confidence: float = float("nan")
    decision: str = "error"  # 'auto' (confidence >= the model's threshold), 'review' or 'error'
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str = ""

    def as_row(self) -> dict:
        ok = self.decision != "error"  # JSON has no NaN: an unreadable file has no confidence (null)
        return {"path": self.path, "label": self.label, "confidence": round(self.confidence, 6) if ok else None,
                "decision": self.decision, "top_k": [{"label": c, "p": round(p, 6)} for c, p in self.top_k],
                "error": self.error}


def predict_images(model: Model, inputs: Sequence[str | os.PathLike], top_k: int = 3, weights: str | None = None,
                   batch_size: int = 64, workers: int | None = None, device: str = "auto", runtime: str | None = None,
                   allow_runtime_mix: bool = False, flip: bool = False) -> list[Prediction]:
    """Top-k calibrated labels per image; unreadable files get decision 'error' and do not stop the batch."""
    if top_k < 1:
        raise UserError(f"--top-k {top_k}: must be at least 1")
    paths = expand_inputs(inputs)
    feats, ok, errors = embed_images(model.provenance, paths, weights, batch_size, workers, device, runtime,
                                     allow_runtime_mix, flip)
    proba = model.proba(feats[ok]) if ok.any() else np.zeros((0, len(model.classes)))
    out, row = [], 0
    for path, good, err in zip(paths, ok, errors):
        if not good:
            out.append(Prediction(str(path), error=err))
            continue
        p = proba[row]
        row += 1
        best = np.argsort(-p)[:top_k]
        conf = float(p[best[0]])
        out.append(Prediction(str(path), model.classes[best[0]], conf,
                              "auto" if conf >= model.threshold else "review",
                              [(model.classes[i], float(p[i])) for i in best]))
    return out
