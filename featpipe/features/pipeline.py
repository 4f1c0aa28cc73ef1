"""The input pipeline a cache or model recorded, rebuilt: photos -> the features its head reads.

`pipeline_forward` rebuilds one backbone's forward pass from its provenance (backbone, weights identity,
preprocessing, runtime, a fine-tuned model's own blocks). `FeaturePipeline` holds every backbone of a model
(a joined one has several) built once, and turns photos, given as files or as the bytes of an upload, into
their features: decoded once per distinct input size, each backbone run (joined ones side by side, in threads:
OpenVINO computes without the GIL), their features joined as the caches were.
"""
from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from ..backbones import load_backbone, split_backbone
from ..devices import resolve_device, tune_cpu_allocator
from ..errors import UserError
from ..images import Preprocessing, decode_threads, load_image
from ..runtimes import (PRECISION, Forward, RuntimeUnavailable, check_runtime, flip_averaged, make_forward,
                        openvino_forward, openvino_model)
from .networks import ImageRunner, NetworkStore, network_key
from .weights import locate_weights

if TYPE_CHECKING:
    import torch

# A photo as a file path or as the encoded bytes of one (an upload)
ImageSource = Union[str, os.PathLike, bytes]


def pipeline_runtime(provenance: dict, override: str | None = None, allow_mix: bool = False) -> str:
    """The runtime the features were made with; another one only when the caller says a mix is fine."""
    recorded = provenance.get("runtime", "torch")  # caches from before runtimes existed were torch's
    if override and override != recorded and not allow_mix:
        raise RuntimeUnavailable(f"--runtime {override}: the features were made with {recorded}, and another "
                                 "runtime gives slightly different features; pass --allow-runtime-mix to use it anyway")
    return override or recorded


def pipeline_forward(provenance: dict, batch_size: int = 64, device: str = "auto", runtime: str | None = None,
                     allow_runtime_mix: bool = False, flip: bool = False, bottom: bool = False,
                     networks: NetworkStore | None = None, search_path: Sequence[str | os.PathLike] = (),
                     one_by_one: bool = False) -> tuple[Forward, Preprocessing, torch.device]:
    """The exact backbone, preprocessing and runtime recorded in `provenance`, ready to run batches.
    A fine-tuned model's provenance carries its last blocks: they run in torch on what the frozen part gives.
    flip: average each image's features with its mirror image's (test-time augmentation).
    bottom: only the frozen part that fine-tuning starts from (`backbones.split_backbone`), its output
    flattened per image: the activations `extract --activations` caches.
    On OpenVINO the converted network comes from `networks` (the default store when None), built from the
    weights (found by digest on `search_path`, `features.weights`) only the first time; one_by_one runs each
    image on its own inference request (`networks.ImageRunner`), so its features do not depend on its batch."""
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
    pre = Preprocessing.from_dict(provenance["preprocessing"])
    finetune = provenance.get("finetune")
    split = bottom or bool(finetune)
    if runtime == "torch":
        forward = make_forward(_torch_backbone(provenance, split, search_path), runtime, dev, pre, batch_size)
    else:
        store = networks or NetworkStore()
        network = part_network(provenance, runtime, split, store, search_path)
        forward = (ImageRunner(network, PRECISION[runtime], store.compiled) if one_by_one
                   else openvino_forward(network, batch_size, precision=PRECISION[runtime]))
    if bottom:
        forward = _flattened(forward)
    elif finetune:
        # the blocks' architecture alone: their weights are the fine-tuned ones the model file carries
        _, top = split_backbone(load_backbone(provenance["backbone"], "none")[0], provenance["backbone"])
        top.load_state_dict(finetune["state_dict"])
        forward = _then(forward, top.eval())
    return (flip_averaged(forward) if flip else forward), pre, dev


def _torch_backbone(provenance: dict, split: bool, search_path: Sequence[str | os.PathLike]) -> torch.nn.Module:
    """The recorded backbone in torch (the part fine-tuning starts from when `split`), weights found by digest."""
    model, _ = load_backbone(provenance["backbone"], locate_weights(provenance, search_path))
    return split_backbone(model, provenance["backbone"])[0] if split else model


def part_network(provenance: dict, runtime: str, split: bool, store: NetworkStore,
                 search_path: Sequence[str | os.PathLike] = ()):
    """The OpenVINO network of one backbone's provenance on `runtime`: from `store`, or converted (and stored)
    from the torch backbone; openvino-int8's is the calibrated IR the cache recorded."""
    int8 = provenance.get("runtime_model")

    def build():
        module = None if runtime == "openvino-int8" else _torch_backbone(provenance, split, search_path)
        return openvino_model(module, runtime, Preprocessing.from_dict(provenance["preprocessing"]),
                              Path(int8) if int8 else None, provenance.get("runtime_id"))

    return store.load_or_build(network_key(provenance | {"runtime": runtime}, split), build)


def _flattened(forward: Forward) -> Forward:
    return lambda batch: forward(batch).reshape(len(batch), -1)


def _then(forward: Forward, top: torch.nn.Module) -> Forward:
    """`forward`, then `top` in torch on the CPU."""
    import torch

    def run(batch) -> np.ndarray:
        with torch.inference_mode():
            return top(torch.as_tensor(forward(batch), dtype=torch.float32)).numpy()

    return run


def _decode_key(pre: Preprocessing) -> tuple:
    """What decoding depends on: normalising happens in each runtime, so backbones of one input size share pixels."""
    return pre.image_size, pre.resize, pre.interpolation


class FeaturePipeline:
    """Every backbone `provenance` records (each part of a joined model), built once.

    Photos in, features out: `decode` turns one photo into the pixels each input size needs (raising for
    one that cannot be read), `features` runs decoded photos through every backbone, `embed` does both for a
    list of photos, batch by batch, and reports unreadable ones instead of raising. Thread-safe only in that
    one thread runs `features` at a time (the caller serialises, e.g. a service's single batch worker)."""

    def __init__(self, provenance: dict, *, device: str = "auto", runtime: str | None = None,
                 allow_runtime_mix: bool = False, flip: bool = False, batch_size: int = 64,
                 networks: NetworkStore | None = None, search_path: Sequence[str | os.PathLike] = ()):
        if batch_size < 1:
            raise UserError(f"batch_size {batch_size}: must be at least 1")
        self.provenance = provenance
        self.batch_size = batch_size
        parts = provenance.get("parts") or [provenance]
        built = [pipeline_forward(p, batch_size, device, runtime, allow_runtime_mix, flip, networks=networks,
                                  search_path=search_path, one_by_one=True) for p in parts]
        self.forwards = [f for f, _, _ in built]
        self.runtimes = [pipeline_runtime(p, runtime, allow_runtime_mix) for p in parts]
        self.device = built[0][2]
        keys = list(dict.fromkeys(_decode_key(pre) for _, pre, _ in built))
        self.decoders = [next(pre for _, pre, _ in built if _decode_key(pre) == k) for k in keys]
        self.decoder_of = [keys.index(_decode_key(pre)) for _, pre, _ in built]
        self._parts_pool = ThreadPoolExecutor(len(parts)) if len(parts) > 1 else None
        self._decode_pool = ThreadPoolExecutor(decode_threads())
        if self.device.type == "cpu":
            tune_cpu_allocator()

    def decode(self, source: ImageSource, max_pixels: int | None = None) -> tuple[np.ndarray, ...]:
        """One photo as uint8 HWC pixels, one array per input size; raises OSError or ValueError when it cannot
        be read (not an image, truncated, or over `max_pixels` pixels before resizing: a decompression bomb)."""
        return tuple(load_image(io.BytesIO(source) if isinstance(source, bytes) else source, pre,
                                max_pixels=max_pixels) for pre in self.decoders)

    def features(self, decoded: Sequence[tuple[np.ndarray, ...]]) -> np.ndarray:
        """(N, D) float32 features of decoded photos, each backbone's side by side in the recorded order."""
        batches = [np.stack([d[k] for d in decoded]) for k in range(len(self.decoders))]
        runs: list[Callable[[], np.ndarray]] = [
            (lambda f=f, b=batches[self.decoder_of[i]]: f(b)) for i, f in enumerate(self.forwards)]
        if self._parts_pool is None:
            return runs[0]()
        return np.hstack([r.result() for r in [self._parts_pool.submit(run) for run in runs]])

    def try_decode(self, source: ImageSource, max_pixels: int | None = None) -> tuple[tuple[np.ndarray, ...] | None, str]:
        """`decode`, or (None, the error's text) for a photo that cannot be read."""
        try:
            return self.decode(source, max_pixels), ""
        except Exception as exc:  # PIL raises many types for broken files
            return None, f"{type(exc).__name__}: {exc}"

    def embed(self, sources: Sequence[ImageSource], progress: Callable[[int], None] | None = None,
              ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(features, ok flags, error texts) of `sources`, `batch_size` at a time; an unreadable photo gets
        zeros, ok False and its error. progress: called with the number of photos done after each batch."""
        feats, oks, errors = [], [], []
        for start in range(0, len(sources), self.batch_size):
            chunk = sources[start:start + self.batch_size]
            decoded = list(self._decode_pool.map(self.try_decode, chunk))
            good = [d for d, _ in decoded if d is not None]
            out = np.zeros((len(chunk), self.dim), dtype=np.float32)
            if good:
                out[[i for i, (d, _) in enumerate(decoded) if d is not None]] = self.features(good)
            feats.append(out)
            oks.append(np.array([d is not None for d, _ in decoded], dtype=bool))
            errors += [e for _, e in decoded]
            if progress is not None:
                progress(len(chunk))
        if not feats:
            return np.zeros((0, self.dim), dtype=np.float32), np.zeros(0, dtype=bool), []
        return np.concatenate(feats), np.concatenate(oks), errors

    @property
    def dim(self) -> int:
        return int(self.provenance["feature_dim"])
