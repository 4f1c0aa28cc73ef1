"""Backbone networks converted once and kept on disk, run one image per inference request.

Building a backbone in torch, converting it to OpenVINO (a trace) and compiling it cost seconds per backbone,
which every process that predicted paid again. A converted network is saved as OpenVINO IR in a network
store, named by everything that defines it (`network_key`: backbone, weights identity, preprocessing,
runtime, the part fine-tuning starts from), and OpenVINO's own model cache (CACHE_DIR)
keeps the network compiled for this CPU: a later process reads both, and needs neither torch's module nor
the weights file. A bundle (`workflows.bundle`) carries the IR, so its store is read-only and comes first.

`ImageRunner` compiles a network for a batch of one and runs each image of a batch on its own inference
request, the requests spread over OpenVINO's parallel streams. An image's features then never depend on the
images it was sent with: a photo gets the same answer alone, in a folder, or batched with other clients'
uploads by the HTTP service.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..runtimes import check_precision, openvino_module

ENV_HOME = "FEATPIPE_CACHE_HOME"
# Part of every key: another way of converting (preprocessing inside the network, input layout) is another IR.
RECIPE = "u8-nhwc-normalised-inside/1"


def cache_home() -> Path:
    """featpipe's own cache folder: FEATPIPE_CACHE_HOME, else $XDG_CACHE_HOME/featpipe, else ~/.cache/featpipe."""
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "featpipe"


def network_key(part: dict, bottom: bool = False) -> str:
    """A name for the network that makes `part`'s features (a model's or cache's provenance for one backbone):
    a digest of what defines it, so two models of the same backbone and weights share one IR."""
    defining = {k: part.get(k) for k in ("backbone", "weights_id", "preprocessing", "runtime", "runtime_id")}
    defining |= {"bottom": bottom, "recipe": RECIPE}
    digest = hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:16]
    return f"{part['backbone'].replace(':', '_').replace('/', '_')}-{digest}"


class NetworkStore:
    """Converted networks by key: `root` (written when a network is first built) and read-only `extra` folders
    searched first (a bundle's). `compiled`: OpenVINO's CACHE_DIR for networks compiled on this CPU."""

    def __init__(self, root: Path | None = None, extra: Sequence[Path] = ()):
        self.root = cache_home() / "networks" if root is None else Path(root)
        self.extra = [Path(p) for p in extra]

    @property
    def compiled(self) -> Path:
        return self.root / "compiled"

    def find(self, key: str) -> Path | None:
        for folder in [*self.extra, self.root]:
            xml = folder / key / "model.xml"
            if xml.is_file() and xml.with_suffix(".bin").is_file():
                return xml
        return None

    def load_or_build(self, key: str, build: Callable[[], object]):
        """The stored network `key`, or `build()`'s, saved for the next process. A folder that cannot be
        written only costs the next process the conversion again."""
        ov = openvino_module()
        found = self.find(key)
        if found is not None:
            return ov.Core().read_model(found)
        network = build()
        try:
            self.save(key, network)
        except OSError:
            pass
        return network

    def save(self, key: str, network) -> Path:
        """Write `network` as IR under `root/key`, whole or not at all (written beside it, then renamed)."""
        ov = openvino_module()
        final = self.root / key
        tmp = self.root / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            ov.save_model(network, tmp / "model.xml", compress_to_fp16=False)
            if final.exists():  # another process stored it first: same key, same network
                shutil.rmtree(tmp)
            else:
                tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final / "model.xml"


class ImageRunner:
    """A network compiled for one image (OpenVINO, `precision` f32 or bf16), a batch fanned out over as many
    inference requests as OpenVINO finds optimal: (N, H, W, C) uint8 -> (N, D) float32, each row computed alone.
    Not for two threads at once: the caller serialises (the Predictor holds a lock)."""

    def __init__(self, network, precision: str = "f32", compiled_cache: Path | None = None):
        ov = openvino_module()
        core = ov.Core()
        check_precision(core, precision)
        config = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": precision}
        if compiled_cache is not None:
            try:
                compiled_cache.mkdir(parents=True, exist_ok=True)
                config["CACHE_DIR"] = str(compiled_cache)
            except OSError:
                pass  # a read-only home compiles every time, as before
        one = network.clone()
        one.reshape({one.input(0): [1, *list(one.input(0).get_partial_shape())[1:]]})
        self.compiled = core.compile_model(one, "CPU", config)
        self.queue = ov.AsyncInferQueue(self.compiled)
        self.queue.set_callback(self._done)
        self._out: np.ndarray | None = None

    @property
    def requests(self) -> int:
        return len(self.queue)

    def _done(self, request, index: int) -> None:
        self._out[index] = request.get_output_tensor(0).data[0]

    def __call__(self, batch) -> np.ndarray:
        batch = np.ascontiguousarray(np.asarray(batch))
        self._out = np.empty((len(batch), *self.compiled.output(0).get_shape()[1:]), dtype=np.float32)
        for i in range(len(batch)):
            self.queue.start_async(batch[i:i + 1], userdata=i)
        self.queue.wait_all()
        return self._out
