"""Runtimes: OpenVINO (fp32, bf16, INT8) against torch eager, in value, and caches that never mix them."""
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import SHARED_DATA, SHARED_WEIGHTS, make_dataset
from featpipe.cli import main
from featpipe.extract import extract, int8_dir
from featpipe.harness import fit_head
from featpipe.heads import TorchHead
from featpipe.images import Preprocessing
from featpipe.models import ModelError, load_model
from featpipe.workflows.predictor import predict_images
from featpipe.runtimes import (RuntimeUnavailable, check_precision, check_runtime, openvino_forward, quantize_int8,
                               to_openvino, torch_forward)
from featpipe.store import open_cache

needs_openvino = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("openvino", "nncf")),
                                    reason="the openvino extra is not installed")
needs_shared = pytest.mark.skipif(not SHARED_WEIGHTS.is_file() or not (SHARED_DATA / "images").is_dir(),
                                  reason="../shared weights and dataset not present")
CPU = torch.device("cpu")


def _real_batch(n: int, offset: int, size: int = 224) -> torch.Tensor:
    """n catalogue photos as the runtimes take them: resized, uint8 NHWC."""
    from featpipe.images import load_image

    paths = sorted((SHARED_DATA / "images").glob("1*.jpg"))[offset:offset + n]
    return torch.from_numpy(np.stack([load_image(p, Preprocessing(image_size=size)) for p in paths]))


@needs_openvino
@needs_shared
def test_openvino_gives_torchs_imagenet_top1_on_real_photos():
    """The whole ImageNet classifier, so top-1 is a real decision: fp32 agrees on every photo, INT8 on most."""
    import torchvision

    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(SHARED_WEIGHTS, weights_only=True))
    net.eval()
    batch = _real_batch(48, 0)
    ref = torch_forward(net, CPU, Preprocessing())(batch)
    forward = openvino_forward(to_openvino(net, Preprocessing()), batch_size=len(batch))
    fp32 = forward(batch)  # compiled for this static batch shape
    assert (fp32.argmax(1) == ref.argmax(1)).all()
    np.testing.assert_allclose(forward(batch[:5]), fp32[:5], rtol=1e-4, atol=1e-4)  # a short batch: dynamic shape
    np.testing.assert_allclose(fp32, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    assert len(set(ref.argmax(1))) > 5  # the photos give different answers: agreement is not trivial


@needs_openvino
@needs_shared
def test_throughput_streams_give_the_latency_hints_features_in_order():
    """A batch split across parallel streams (a full batch's shorter last part padded, a short batch's on
    the dynamic shape) comes back as the one-request run computes it: the same features, row for row (to the
    last bits, which on some CPUs differ between a stream's one thread and the latency hint's several)."""
    from featpipe.backbones import load_backbone

    model, _ = load_backbone("mobilenet_v2", str(SHARED_WEIGHTS))
    network = to_openvino(model, Preprocessing(image_size=128))
    batch = _real_batch(11, 0, 128).numpy()
    one = openvino_forward(network, batch_size=11, hint="LATENCY")(batch)
    streams = openvino_forward(network, batch_size=11)
    np.testing.assert_allclose(streams(batch), one, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(streams(batch[:3]), one[:3], rtol=1e-4, atol=1e-4)  # a short batch
    assert not np.allclose(one[0], one[1], atol=1e-3)  # rows differ, so their order is checked
    with pytest.raises(ValueError, match="compiled for 11"):
        streams(np.concatenate([batch, batch]))
    with pytest.raises(ValueError, match="use one of"):
        openvino_forward(network, batch_size=11, hint="FAST")


def _has_bf16() -> bool:
    import openvino as ov

    from featpipe.runtimes import has_bf16

    return has_bf16(ov.Core())


@needs_openvino
@needs_shared
def test_bf16_runs_bf16_arithmetic_and_keeps_the_top1_of_most_photos():
    if not _has_bf16():
        pytest.skip("this CPU has no bf16 instructions")
    import torchvision

    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(SHARED_WEIGHTS, weights_only=True))
    network = to_openvino(net.eval(), Preprocessing())
    batch = _real_batch(48, 0).numpy()
    fp32 = openvino_forward(network, batch_size=len(batch))(batch)
    bf16 = openvino_forward(network, batch_size=len(batch), precision="bf16")(batch)
    assert np.abs(bf16 - fp32).max() > 1e-2 * np.abs(fp32).max()  # another arithmetic ran, not fp32 again
    assert (bf16.argmax(1) == fp32.argmax(1)).mean() >= 0.85
    cos = (bf16 * fp32).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(fp32, axis=1)
    assert np.median(cos) > 0.97  # of the 1000 ImageNet logits (BENCHMARKS.md, runtimes: the cached features)


@needs_openvino
def test_the_cpu_default_is_bf16_where_the_cpu_has_it_else_fp32(monkeypatch):
    import featpipe.runtimes as runtimes

    assert runtimes.default_runtime(torch.device("cuda")) == "torch"
    assert runtimes.default_runtime(CPU) == ("openvino-bf16" if _has_bf16() else "openvino")

    def without_bf16(core, precision: str) -> None:
        if precision == "bf16":
            raise RuntimeUnavailable("no bf16 here")
    monkeypatch.setattr(runtimes, "check_precision", without_bf16)
    assert runtimes.default_runtime(CPU) == "openvino"


def test_bf16_is_refused_on_a_cpu_without_bf16_instructions():
    """OpenVINO would run fp32 there without a word: a cache named bf16 would hold fp32 features."""
    without = SimpleNamespace(get_property=lambda device, key: ["FP32", "INT8"])  # an OpenVINO Core's answer
    with pytest.raises(RuntimeUnavailable, match="needs bf16 instructions .*use --runtime openvino$"):
        check_precision(without, "bf16")
    check_precision(without, "f32")  # fp32 runs on any CPU


@needs_openvino
def test_a_model_whose_runtime_cannot_run_here_names_the_way_out(monkeypatch):
    """A model made on bf16 features, on a CPU without bf16: the advice names the mix flag as well, since
    another runtime than the model's is refused without it."""
    import featpipe.runtimes as runtimes
    from featpipe.features.pipeline import pipeline_forward

    monkeypatch.setattr(runtimes, "check_precision", lambda core, precision: check_precision(
        SimpleNamespace(get_property=lambda device, key: ["FP32"]), precision))
    with pytest.raises(RuntimeUnavailable, match=r"use --runtime openvino and --allow-runtime-mix: this model's "
                                                 r"features were made with openvino-bf16"):
        pipeline_forward({"runtime": "openvino-bf16", "backbone": "mobilenet_v2"}, device="cpu")
    with pytest.raises(RuntimeUnavailable, match=r"lacks; use --runtime openvino$"):  # asked for by name: as is
        pipeline_forward({"runtime": "openvino-bf16"}, device="cpu", runtime="openvino-bf16")


@needs_openvino
@needs_shared
def test_int8_features_stay_close_to_fp32(tmp_path: Path):
    from featpipe.backbones import load_backbone
    from featpipe.runtimes import load_int8

    model, _ = load_backbone("mobilenet_v2", str(SHARED_WEIGHTS))
    calibration = list(_real_batch(32, 100, 128).split(8))
    pre = Preprocessing(image_size=128)
    ident = quantize_int8(to_openvino(model, pre), calibration, tmp_path / "q")
    batch = _real_batch(32, 0, 128)
    ref = torch_forward(model, CPU, pre)(batch)
    q = openvino_forward(load_int8(tmp_path / "q", ident), batch_size=len(batch))(batch)
    cos = (q * ref).sum(1) / np.linalg.norm(q, axis=1) / np.linalg.norm(ref, axis=1)
    assert np.median(cos) > 0.93 and cos.min() > 0.75  # 32 calibration images at 128 px; 0.99 at full size
    assert not np.allclose(q, ref, atol=1e-4)  # it did quantize
    convs = [op for op in load_int8(tmp_path / "q", ident).get_ordered_ops()
             if op.get_type_name() in ("Convolution", "GroupConvolution")]
    int8_input = [c.input_value(0).get_node().get_type_name() == "FakeQuantize" for c in convs]
    assert int8_input[:2] == [False, False] and all(int8_input[2:])  # the stem stays fp32, the rest is INT8
    (tmp_path / "q" / "model.bin").write_bytes(b"\0" + (tmp_path / "q" / "model.bin").read_bytes()[1:])
    with pytest.raises(RuntimeUnavailable, match="features were made with"):
        load_int8(tmp_path / "q", ident)


@needs_openvino
def test_an_int8_model_that_takes_float_input_is_refused(tmp_path: Path):
    """featpipe once fed INT8 models normalised floats; such a model given uint8 pixels answers wrongly."""
    import openvino as ov

    from featpipe.runtimes import ir_identity, load_int8

    old = ov.convert_model(torch.nn.Conv2d(3, 4, 1).eval(), example_input=torch.zeros(1, 3, 8, 8))
    ov.save_model(old, tmp_path / "model.xml", compress_to_fp16=False)
    with pytest.raises(RuntimeUnavailable, match="takes normalised float images.*re-extract"):
        load_int8(tmp_path, ir_identity(tmp_path))


def test_openvino_is_refused_off_the_cpu_with_one_line():
    with pytest.raises(RuntimeUnavailable, match="runs on the CPU; use --runtime torch"):
        check_runtime("openvino", torch.device("cuda"))


@needs_openvino
@needs_shared
def test_caches_never_mix_runtimes(dataset_dir: Path, tmp_path: Path):
    common = dict(weights=str(SHARED_WEIGHTS), cache_dir=tmp_path / "c", min_per_class=5, image_size=64,
                  batch_size=16, device="cpu", dtype="float32", progress=False)
    caches = {rt: open_cache(extract(dataset_dir, runtime=rt, **common).cache) for rt in ("torch", "openvino")}
    assert caches["torch"].path != caches["openvino"].path
    assert [c.attrs["runtime"] for c in caches.values()] == ["torch", "openvino"]
    np.testing.assert_allclose(caches["openvino"].features, caches["torch"].features, rtol=1e-3, atol=1e-3)

    model = fit_head(caches["openvino"], tmp_path / "ov.pt", TorchHead(head="fc", epochs=20, batch_size=8, device="cpu"))
    with pytest.raises(ModelError, match="runtime='openvino'"):
        load_model(tmp_path / "ov.pt").check_features(caches["torch"].attrs)
    c = caches["openvino"]
    paths = [dataset_dir / "images" / f"{i}.jpg" for i in c.ids]
    preds = predict_images(model, paths, top_k=1, device="cpu")  # runs openvino, as recorded
    np.testing.assert_allclose([p.confidence for p in preds], model.proba(c.features).max(1), rtol=1e-4, atol=1e-5)
    y = np.array(c.labels)
    assert np.mean([p.label == c.classes[k] for p, k in zip(preds, y)]) > 0.8  # three classes: chance is 1/3

    r = CliRunner().invoke(main, ["predict", "--model", str(tmp_path / "ov.pt"), "--runtime", "torch", str(paths[0])])
    assert r.exit_code == 2 and "made with openvino" in r.output and "--allow-runtime-mix" in r.output
    r = CliRunner().invoke(main, ["predict", "--model", str(tmp_path / "ov.pt"), "--runtime", "torch",
                                  "--allow-runtime-mix", "--format", "csv", str(paths[0])])
    assert r.exit_code == 0, r.output


@needs_openvino
@needs_shared
def test_int8_cache_keeps_its_calibrated_model_and_predict_reuses_it(dataset_dir: Path, tmp_path: Path):
    s = extract(dataset_dir, weights=str(SHARED_WEIGHTS), cache_dir=tmp_path / "c", min_per_class=5, image_size=64,
                batch_size=16, device="cpu", dtype="float32", progress=False, runtime="openvino-int8",
                calibration_images=16)
    cache = open_cache(s.cache)
    assert cache.attrs["runtime"] == "openvino-int8" and cache.attrs["runtime_id"].startswith("sha256:")
    assert (int8_dir(s.cache) / "model.xml").is_file()
    model = fit_head(cache, tmp_path / "q.pt", TorchHead(head="fc", epochs=20, batch_size=8, device="cpu"))
    paths = [dataset_dir / "images" / f"{i}.jpg" for i in cache.ids]
    preds = predict_images(model, paths, top_k=1, device="cpu")
    np.testing.assert_allclose([p.confidence for p in preds], model.proba(cache.features).max(1), rtol=1e-4, atol=1e-5)
    (int8_dir(s.cache) / "model.xml").unlink()
    # the network store keeps the calibrated network under its identity: predict still runs that very network
    r = CliRunner().invoke(main, ["predict", "--model", str(tmp_path / "q.pt"), "--format", "json", str(paths[0])])
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["confidence"] == round(preds[0].confidence, 6), r.output
    r = CliRunner().invoke(main, ["predict", "--model", str(tmp_path / "q.pt"), str(paths[0])],
                           env={"FEATPIPE_CACHE_HOME": str(tmp_path / "empty-store")})
    assert r.exit_code == 2 and "is missing" in r.output and "re-extract" in r.output


def test_flip_averaging_means_each_image_with_its_mirror():
    from featpipe.runtimes import flip_averaged

    batch = np.arange(2 * 3 * 4 * 3, dtype=np.float32).reshape(2, 3, 4, 3)  # NHWC, as the decoder gives them
    top_left = lambda b: np.asarray(b)[:, 0, 0, :]  # noqa: E731  (a 'backbone' that sees one corner)
    for given in (batch, torch.from_numpy(batch)):  # DataLoader workers give tensors
        np.testing.assert_allclose(flip_averaged(top_left)(given), (batch[:, 0, 0, :] + batch[:, 0, -1, :]) / 2)


@needs_openvino
def test_a_stored_openvino_network_embeds_files_without_importing_torch(tmp_path, dataset_dir):
    """What a Ray actor of an OpenVINO runtime does (read the driver's IR, decode, embed, check the values
    for the cache) runs in a process that never loads torch, and gives this process's features."""
    import subprocess
    import sys

    from featpipe.embed import iter_features
    from featpipe.runtimes import ir_bytes

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten()).eval()
    pre = Preprocessing(image_size=32)
    network = to_openvino(net, pre)
    paths = sorted(str(p) for p in (dataset_dir / "images").glob("*.jpg"))[:20]
    here = np.concatenate([f for _, f, _, _ in iter_features(openvino_forward(network, 8), paths, pre, "cpu", 8,
                                                             workers=0, same_shape=True, threads=2)])
    assert here.std(0).mean() > 1e-3  # features that differ between images, not a constant
    graph, weights = ir_bytes(network)
    (tmp_path / "model.xml").write_bytes(graph)
    (tmp_path / "model.bin").write_bytes(weights)
    np.save(tmp_path / "paths.npy", np.array(paths))
    script = f"""
import sys
from pathlib import Path
import numpy as np
from featpipe.embed import iter_features
from featpipe.images import Preprocessing
from featpipe.ray_engine import Embedder  # the actor's module and everything it imports
from featpipe.runtimes import openvino_forward, read_ir
from featpipe.store import storable
tmp = Path({str(tmp_path)!r})
forward = openvino_forward(read_ir((tmp / "model.xml").read_bytes(), (tmp / "model.bin").read_bytes()), 8)
paths = list(np.load(tmp / "paths.npy"))
parts = list(iter_features(forward, paths, Preprocessing(image_size=32), "cpu", 8, workers=0, same_shape=True,
                           threads=2))
feats = np.concatenate([p[1] for p in parts])
storable(feats, np.concatenate([p[2] for p in parts]), "float32", np.arange(len(paths)))
np.save(tmp / "there.npy", feats)
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))[:5]
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "there.npy"), here)


def test_int8_calibration_sees_catalogue_photos_and_seller_views_batch_by_batch(tmp_path, monkeypatch):
    """Every other calibration batch is seller-style views of its photos, the rest the photos as they are:
    quantization ranges then cover both kinds of input."""
    import featpipe.runtimes as runtimes
    from featpipe.dataset import load_dataset
    from featpipe.extract import calibrate_int8
    from featpipe.images import load_image

    seen = []
    monkeypatch.setattr(runtimes, "to_openvino", lambda model, pre: "network")
    monkeypatch.setattr(runtimes, "quantize_int8", lambda net, batches, out: seen.extend(batches) or "sha256:x")
    ds = load_dataset(make_dataset(tmp_path / "data", warts=False), min_per_class=5)
    pre = Preprocessing(image_size=32)
    assert calibrate_int8(None, ds, pre, tmp_path / "q", n_images=16, seed=0, batch_size=4) == "sha256:x"
    assert [len(b) for b in seen] == [4, 4, 4, 4]
    train = ds.ids[ds.split == 0]
    clean = {int(i): load_image(ds.image_path(i), pre) for i in train}
    as_is = [sum(any(np.array_equal(img, c) for c in clean.values()) for img in b) for b in seen]
    assert as_is[0] == as_is[2] == 4 and as_is[1] == as_is[3] == 0
