"""Image files -> features, batch by batch: the loop every engine runs (a local extraction, predict, a Ray
actor). It needs no torch itself, so an actor that runs OpenVINO never imports it."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .devices import tune_cpu_allocator
from .images import Preprocessing, decode_threads, pad_batch, threaded_batches

if TYPE_CHECKING:
    from .augment import Augment
    from .runtimes import Forward


def default_workers(device_type: str) -> int:
    """Worker processes feed a GPU; on a CPU the forward pass has every core, so decode between passes."""
    return min(8, decode_threads()) if device_type == "cuda" else 0


def iter_features(forward: Forward, paths: Sequence[str | Path], pre: Preprocessing, device_type: str = "cpu",
                  batch_size: int = 64, workers: int | None = None, augments: Sequence[Augment | None] | None = None,
                  same_shape: bool = False, threads: int | None = None,
                  ) -> Iterator[tuple[slice, np.ndarray, np.ndarray, list[str]]]:
    """Yield (positions, float32 features, ok flags, error texts) batch by batch, in input order.

    device_type: 'cpu' or 'cuda', where `forward` runs. workers: DataLoader processes that decode beside
    the forward pass [default: some on CUDA, none on a CPU, where `threads` threads decode each batch
    between forward passes; default: the cores this process may use].
    augments: an augmentation per path (augmented views), applied to the decoded photo.
    same_shape: pad a last, shorter batch with blank images so that every forward pass has one shape.
    An image's features then do not depend on which batch it fell in (the kernels chosen for a batch of
    one differ in the last bits), so an update of a cache equals a build from scratch bit for bit."""
    workers = default_workers(device_type) if workers is None else workers
    if device_type == "cpu":
        tune_cpu_allocator()
    if workers == 0:
        batches = threaded_batches(paths, pre, batch_size, threads or decode_threads(), augments)
    else:
        from .loader import worker_batches  # torch, imported only where worker processes are asked for

        batches = worker_batches(paths, pre, batch_size, workers, pin=device_type == "cuda", augments=augments)
    start = 0
    for images, ok, errors in batches:
        n = len(images)
        if same_shape and n < batch_size:  # a workers' tensor becomes numpy here: one last batch, unpinned
            images = pad_batch(np.asarray(images), batch_size)
        feats = forward(images)[:n]
        yield slice(start, start + n), feats, np.asarray(ok, dtype=bool), list(errors)
        start += n
