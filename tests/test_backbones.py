from pathlib import Path

import pytest
import torch

from featpipe.backbones import WeightsError, load_backbone, weights_identity


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
