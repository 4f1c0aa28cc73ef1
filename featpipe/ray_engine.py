"""Extraction spread over a Ray cluster with Ray Data (`featpipe extract --engine ray`, extra `featpipe[ray]`).

The pending images become a Ray Dataset of (id, path) rows. A pool of actors, each loading the backbone
once, maps batches of `shard_size` images to features (decoding and embedding them as the local engine
does, same padding to one batch shape, so the features are bit-equal to a local run on the same
runtime with as many threads; another thread count sums in another order, which changes the last bits). The driver writes each result as a shard of the cache's journal as it arrives, so a killed
driver loses only the results in flight and a rerun extracts only what no shard holds; a killed actor or
node costs only the batch it was working on, which Ray retries on another actor. The driver then writes
the manifest as for a local run. Ray does the scheduling; featpipe only says what one actor does.

Images are read by path on the workers: on a multi-node cluster the dataset folder must be mounted at
the same path on every node. On small machines the actors reserve fewer CPUs than their threads use, so
that Ray Data's own tasks (making the blocks of rows) can still be scheduled beside them.
"""
from __future__ import annotations

import logging
import math
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .embed import iter_features
from .errors import UserError
from .images import Preprocessing
from .runtimes import PRECISION, ir_bytes, make_forward, openvino_forward, openvino_model, read_ir
from .store import storable

log = logging.getLogger(__name__)


class RayUnavailable(UserError):
    """--engine ray without Ray installed, or a cluster that cannot be reached."""


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RayUnavailable("--engine ray needs Ray Data; pip install 'featpipe[ray]'") from None
    return ray


@dataclass(frozen=True)
class ActorSpec:
    """Everything an actor needs to rebuild the extraction pipeline on its own node."""

    backbone: str
    weights: str
    runtime: str
    preprocessing: dict
    batch_size: int
    dtype: str
    device: str
    threads: int = 0  # set by plan_actors for the cluster


class Embedder:
    """One actor: the backbone loaded once, then batches of (id, path) rows -> features. With a `handoff`
    (OpenVINO runtimes) the actor runs the network the driver converted, which it waits for there, and
    never imports torch: on a small machine importing it was a large part of an actor's start-up."""

    def __init__(self, spec: dict, handoff=None):
        self.spec = ActorSpec(**spec)
        self.pre = Preprocessing.from_dict(self.spec.preprocessing)
        if handoff is None:
            import torch

            from .backbones import load_backbone

            torch.set_num_threads(self.spec.threads)  # Ray sets OMP_NUM_THREADS to the CPUs reserved, fewer
            model, _ = load_backbone(self.spec.backbone, self.spec.weights)
            self.forward = make_forward(model, self.spec.runtime, torch.device(self.spec.device), self.pre,
                                        self.spec.batch_size)
        else:
            network = _ray().get(handoff.get.remote())
            if isinstance(network, BaseException):  # the driver failed to convert it and reports why itself
                raise RuntimeError(f"the driver could not convert the network: {network}")
            self.forward = openvino_forward(read_ir(*network), self.spec.batch_size,
                                            precision=PRECISION[self.spec.runtime])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        ids = batch["id"].astype(np.int64)
        parts = list(iter_features(self.forward, list(batch["path"]), self.pre, self.spec.device.split(":")[0],
                                   self.spec.batch_size, workers=0, same_shape=True, threads=self.spec.threads))
        feats = np.concatenate([p[1] for p in parts])
        ok = np.concatenate([p[2] for p in parts])
        errors = [e for p in parts for e in p[3]]
        return {"id": ids, "features": storable(feats, ok, self.spec.dtype, ids), "ok": ok,
                "error": np.array(errors, dtype=object), "seconds": np.full(len(ids), (time.perf_counter() - t0) / len(ids))}


class _Handoff:
    """A value the driver is still computing, for actors that start before it is ready: put once, got by
    any number of actors (an actor restarted later gets it at once)."""

    def __init__(self):
        import asyncio

        self._ready, self._value = asyncio.Event(), None

    async def put(self, value) -> None:
        self._value = value
        self._ready.set()

    async def get(self):
        await self._ready.wait()
        return self._value


def _start_handoff(ray, make: Callable[[], object]) -> tuple[object, list[BaseException]]:
    """A `_Handoff` on the driver's node (a lost worker node must not take it along) that a driver thread
    fills with make(), or with the exception make raised, which the caller re-raises from the list."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    handoff = ray.remote(num_cpus=0, max_restarts=0)(_Handoff).options(scheduling_strategy=here).remote()
    failed: list[BaseException] = []

    def fill() -> None:
        try:
            value = make()
        except BaseException as exc:  # noqa: BLE001 - handed to the actors so they stop waiting, raised by the driver
            failed.append(exc)
            value = exc
        ray.get(handoff.put.remote(value))

    threading.Thread(target=fill, name="featpipe-convert", daemon=True).start()
    return handoff, failed


def portable_network(backbone: str, weights: str, runtime: str, pre: Preprocessing, int8_dir: Path,
                     int8_id: str | None) -> tuple[bytes, bytes]:
    """What the actors of an OpenVINO runtime run, as IR bytes: converted once here rather than once per
    actor (which spares each actor building the torch module), and an INT8 model read from this machine's
    disk, which actors on other nodes do not see. (Torch actors build the module themselves, each on its
    own device.)"""
    from .backbones import load_backbone

    model = load_backbone(backbone, weights)[0] if runtime != "openvino-int8" else None
    return ir_bytes(openvino_model(model, runtime, pre, int8_dir, int8_id))


def connect(address: str | None) -> bool:
    """ray.init for `address` ('auto', 'ray://...', 'HOST:PORT'; None starts a local cluster) unless this
    process is already connected; returns whether it connected (and so must disconnect)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except ConnectionError as exc:
        raise RayUnavailable(f"--address {address}: no Ray cluster there ({exc}); start one with `ray start --head` "
                             "or leave --address out to run a local one") from None
    finally:  # ray.init puts its own SIGTERM handler (sys.exit) in place of the caller's one-line exit
        signal.signal(signal.SIGTERM, on_sigterm)
    return True


def plan_actors(actors: int | None, device: str) -> tuple[int, float, float, int]:
    """(actors, CPUs reserved per actor, GPUs per actor, threads per actor) for the connected cluster:
    one actor per GPU on a GPU cluster; on CPUs one actor per node by default, each using that node's
    cores but reserving one fewer, so Ray Data's tasks are never starved."""
    ray = _ray()
    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = int(resources.get("CPU", 1))
    if device.startswith("cuda"):
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise RayUnavailable(f"--device {device} with --engine ray: the cluster has no GPUs; use --device cpu")
        return actors or gpus, 1.0, 1.0, max(1, cpus // max(actors or gpus, 1))
    n = actors or max(1, len(nodes))
    per_node = max(1, cpus // max(len(nodes), 1))
    threads = max(1, per_node // max(1, math.ceil(n / max(len(nodes), 1))))
    return n, float(max(1, threads - 1)) if per_node > 1 else 0.5, 0.0, threads


def ray_features(journal, ids: np.ndarray, paths: Sequence[Path], spec: ActorSpec, address: str | None,
                 actors: int | None, shard_size: int, bar,
                 network: Callable[[], tuple[bytes, bytes]] | None = None) -> None:
    """Features of `paths` computed by a Ray actor pool, written to `journal` shard by shard as they arrive.
    network: for OpenVINO runtimes, makes the IR the actors run (`portable_network`); the driver makes it
    while Ray Data starts the actors, which is the start-up cost a short run feels most."""
    ray = _ray()
    started = connect(address)
    handoff, failed = None, []
    try:
        n_actors, cpus, gpus, threads = plan_actors(actors, spec.device)
        spec = ActorSpec(**(asdict(spec) | {"threads": threads}))
        log.info("ray: %d actor(s), %s CPU and %s GPU reserved and %d threads each, shards of %d images",
                 n_actors, cpus, gpus, threads, shard_size)
        if network is not None and spec.runtime != "torch":
            handoff, failed = _start_handoff(ray, network)
        rows = [{"id": int(i), "path": str(p)} for i, p in zip(ids, paths)]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / shard_size)))
        features = ds.map_batches(
            Embedder, fn_constructor_kwargs={"spec": asdict(spec), "handoff": handoff}, batch_size=shard_size,
            batch_format="numpy", concurrency=n_actors, num_cpus=cpus,
            num_gpus=gpus)  # Ray Data restarts dead actors, retries their calls
        for out in features.iter_batches(batch_size=None, batch_format="numpy"):
            journal.write(out["id"], out["features"], out["ok"].astype(bool), [str(e) for e in out["error"]],
                          float(out["seconds"].sum()))
            bar.update(len(out["id"]))
        bar.close()
    except ray.exceptions.RayError as exc:  # a user error inside an actor (e.g. weights that give NaN) is one line
        if failed:
            raise failed[0] from None
        user = _user_error(exc)
        if user is None:
            raise
        raise user from None
    finally:
        if started:
            ray.shutdown()


def _user_error(exc: BaseException) -> UserError | None:
    """The featpipe user error at the root of an exception Ray raised for an actor, if there is one. Ray
    Data wraps a failing call in UserCodeException and the original reaches the driver only as the text
    of its traceback ("featpipe.store.CacheError: ..."), so the class is found by that name."""
    import importlib

    seen: BaseException | None = exc
    for _ in range(10):  # Ray nests a few wrappers; never loop on a cycle
        if seen is None:
            break
        if isinstance(seen, UserError):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    found = re.findall(r"^\s*(featpipe(?:\.\w+)+)\.(\w+): (.+)$", str(exc), re.M)
    if not found:
        return None
    module, name, message = found[-1]
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return cls(message) if isinstance(cls, type) and issubclass(cls, UserError) else None
