"""--engine ray on a simulated two-node cluster: a worker node killed mid-run loses nothing and duplicates
nothing (its shard is redone on the surviving node)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from conftest import make_dataset  # noqa: E402
from featpipe.extract import extract  # noqa: E402
from featpipe.store import open_cache  # noqa: E402

SETTINGS = dict(backbone="mobilenet_v2", weights="none", min_per_class=5, image_size=96, batch_size=4, workers=0,
                device="cpu", dtype="float32", progress=False, runtime="torch")


def test_killing_a_worker_node_mid_run_loses_and_duplicates_nothing(tmp_path: Path):
    from ray.cluster_utils import Cluster

    data = make_dataset(tmp_path / "data", per_class=40, warts=False)
    clean = open_cache(extract(data, cache_dir=tmp_path / "clean", **SETTINGS).cache)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        result, failure = {}, []

        def run() -> None:
            try:
                result["summary"] = extract(data, cache_dir=tmp_path / "ray", engine="ray", shard_size=4, **SETTINGS)
            except BaseException as exc:  # reported by the assertion below
                failure.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.time() + 240
        while len(list((tmp_path / "ray").glob("*.shards/part-*.h5"))) < 2:
            assert thread.is_alive() and time.time() < deadline, f"no shards in time: {failure}"
            time.sleep(0.05)
        cluster.remove_node(worker)
        killed_at = len(list((tmp_path / "ray").glob("*.shards/part-*.h5")))
        thread.join(timeout=300)
        assert not thread.is_alive() and not failure, failure
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert killed_at < 30, "the node must die mid-run (120 images, shards of 4)"
    distributed = open_cache(result["summary"].cache)
    assert np.array_equal(distributed.ids, clean.ids), "nothing lost, nothing twice"
    # one thread per actor here, two in the local run: the sums run in another order, so the last bits differ
    np.testing.assert_allclose(distributed.features, clean.features, rtol=1e-4, atol=1e-6 * np.abs(clean.features).max())
