"""Where the backbone's forward pass runs: torch eager (the reference, CPU or CUDA) or OpenVINO's CPU
runtime, in fp32, in bf16 arithmetic (CPUs with AVX512-BF16 or AMX) or quantized to INT8 with NNCF.

Every runtime takes the same input, a (N, H, W, C) uint8 batch of resized photos from `images` (a numpy
array, or a tensor from DataLoader workers), and returns float32 features, so decoding, the cache and the
heads do not know which one ran. Each normalises the batch itself: torch with `loader.normalise` on its
device (a GPU is sent a quarter of the bytes), OpenVINO inside the compiled network, so the CPU never
writes and re-reads a float copy of the batch. torch is imported only by what needs it: a process that
runs a stored OpenVINO network (a Ray actor) never loads it.
The runtime and its precision are part of a cache's identity: features from different runtimes never
share a cache.

An INT8 model is calibrated once per cache on training images and stored beside it as OpenVINO IR
(`<cache>.int8/model.xml` + `.bin`); its sha256 is recorded, and predict reloads that very file.
"""
from __future__ import annotations

import hashlib
import tempfile
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from .errors import UserError
from .images import Preprocessing, pad_batch

if TYPE_CHECKING:
    import torch
    from torch import nn

RUNTIMES = ("torch", "openvino", "openvino-bf16", "openvino-int8")
# The arithmetic OpenVINO is told to use. bf16 keeps fp32's range with an 8-bit mantissa: the features move
# further from torch's than fp32's do, and only a CPU with bf16 instructions runs it (`check_precision`).
# INT8's quantized layers run in int8 whatever the hint; the rest of its network stays fp32.
PRECISION = {"openvino": "f32", "openvino-bf16": "bf16", "openvino-int8": "f32"}
Forward = Callable[[Union[np.ndarray, "torch.Tensor"]], np.ndarray]  # NHWC uint8 batch -> (N, D) float32 features


class RuntimeUnavailable(UserError):
    """A runtime that cannot run here (not installed, wrong device) or whose stored model is missing or changed."""


def openvino_module():
    """The openvino package, or RuntimeUnavailable saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise RuntimeUnavailable("the OpenVINO runtime is not installed; pip install 'featpipe[openvino]' "
                                 "or use --runtime torch") from None
    return openvino


def check_runtime(runtime: str, device: torch.device) -> None:
    """Refuse a runtime that cannot run on `device` or is not installed, before any work starts."""
    if runtime not in RUNTIMES:
        raise RuntimeUnavailable(f"--runtime {runtime}: choose one of {', '.join(RUNTIMES)}")
    if runtime != "torch":
        if device.type != "cpu":
            raise RuntimeUnavailable(f"--runtime {runtime} runs on the CPU; use --runtime torch with --device {device}")
        check_precision(openvino_module().Core(), PRECISION[runtime])
    if runtime == "openvino-int8":
        try:
            import nncf  # noqa: F401  (quantization needs it; inference alone does not)
        except ImportError:
            raise RuntimeUnavailable("INT8 quantization needs NNCF; pip install 'featpipe[openvino]' "
                                     "or use --runtime openvino") from None


def has_bf16(core) -> bool:
    """Whether OpenVINO (`core`, an `openvino.Core`) finds bf16 instructions (AVX512-BF16 or AMX) on this CPU."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def check_precision(core, precision: str) -> None:
    """Refuse bf16 on a CPU without bf16 instructions, where OpenVINO would quietly run fp32 instead: features
    of another arithmetic than the cache records. Checked again where the network is compiled (a Ray actor's
    node may be another CPU than the driver's)."""
    if precision == "bf16" and not has_bf16(core):
        raise RuntimeUnavailable("openvino-bf16 needs bf16 instructions (AVX512-BF16 or AMX), which this CPU "
                                 "lacks; use --runtime openvino")


def default_runtime(device: torch.device) -> str:
    """The fastest runtime proven on accuracy that can run here (BENCHMARKS.md, runtimes): OpenVINO in bf16
    on a CPU with bf16 instructions, else OpenVINO fp32 (torch's features to float rounding); torch on CUDA
    or where OpenVINO is not installed. The default head on bf16 features lost nothing against torch's, on
    the test split or on other shops' photos. INT8 is used only when asked for: on other shops' photos the
    default head on its features falls behind torch's by more than the half point the runtimes issue allows."""
    for runtime in ("openvino-bf16", "openvino"):
        try:
            check_runtime(runtime, device)
        except RuntimeUnavailable:
            continue
        return runtime
    return "torch"


def torch_forward(model: nn.Module, device: torch.device, pre: Preprocessing) -> Forward:
    """Eager torch: normalised on the device, channels_last, and autocast (bf16 where supported, else
    fp16) on CUDA."""
    import torch

    from .loader import normalise

    cuda = device.type == "cuda"
    model = model.to(device).to(memory_format=torch.channels_last)
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16

    def forward(batch: np.ndarray | torch.Tensor) -> np.ndarray:
        x = torch.as_tensor(batch).to(device, non_blocking=True)
        x = normalise(x, pre).permute(0, 3, 1, 2)  # NCHW view of channels_last memory
        with torch.inference_mode(), torch.autocast("cuda", dtype=amp_dtype) if cuda else nullcontext():
            return model(x).float().cpu().numpy()

    return forward


def flip_averaged(forward: Forward) -> Forward:
    """Test-time augmentation: the mean of the features of each image and its mirror image."""
    def averaged(batch: np.ndarray | torch.Tensor) -> np.ndarray:
        mirrored = np.ascontiguousarray(np.flip(np.asarray(batch), 2))  # NHWC: axis 2 is the width
        return (forward(batch) + forward(mirrored)) / 2

    return averaged


def to_openvino(model: nn.Module, pre: Preprocessing):
    """The torch module as an OpenVINO model that takes our uint8 NHWC batches as they are: the network
    itself converts, normalises and reads them as NCHW, with no float or transposed copy made outside."""
    import torch
    from openvino.preprocess import PrePostProcessor

    ov = openvino_module()

    size = pre.image_size
    with warnings.catch_warnings():  # convert_model traces with torch.jit, which warns that it is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        converted = ov.convert_model(model, example_input=torch.zeros(1, 3, size, size), input=[-1, 3, size, size])
    ppp = PrePostProcessor(converted)
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    ppp.input().preprocess().convert_element_type(ov.Type.f32).mean([255 * m for m in pre.mean]) \
        .scale([255 * s for s in pre.std])
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    return ppp.build()


OPENVINO_HINTS = ("THROUGHPUT", "LATENCY")


def openvino_forward(ov_model, batch_size: int, hint: str = "THROUGHPUT", precision: str = "f32") -> Forward:
    """Compile for the CPU with the arithmetic's `precision` (f32 or bf16) stated explicitly: CPUs with bf16
    instructions otherwise default to bf16.

    hint THROUGHPUT (default): OpenVINO runs parallel streams, each with its share of the cores, and each
    batch is split into one part per stream, run at once; a stream has no barrier to wait at between layers
    for the other cores. LATENCY: one request runs a whole batch on every core (BENCHMARKS.md, runtimes,
    measures both). Parts of a full batch run on a copy compiled for their static shape, which measured a
    few per cent faster than the dynamic one; the parts of a shorter batch (predict's last) that fall short
    run on the dynamic one. An image's features barely depend on the hint: each stream computes an image
    alone, in the same order, though on some CPUs a stream's single thread and the latency hint's several
    round the last bits differently."""
    if hint not in OPENVINO_HINTS:
        raise ValueError(f"hint {hint!r}: use one of {', '.join(OPENVINO_HINTS)}")
    core = openvino_module().Core()
    check_precision(core, precision)
    config = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": precision}
    dynamic = core.compile_model(ov_model, "CPU", config)
    streams = max(1, min(batch_size, int(dynamic.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))))
    part = -(-batch_size // streams)  # ceil: a full batch is `streams` parts, the last perhaps shorter
    static = ov_model.clone()
    static.reshape({static.input(0): [part, *list(static.input(0).get_partial_shape())[1:]]})
    compiled = core.compile_model(static, "CPU", config)
    full = [compiled.create_infer_request() for _ in range(streams)]
    short = dynamic.create_infer_request()

    def forward(batch: np.ndarray | torch.Tensor) -> np.ndarray:
        batch = np.asarray(batch)
        if len(batch) > part * streams:
            raise ValueError(f"a batch of {len(batch)} images; this forward pass was compiled for {batch_size}")
        running = []
        for k, start in enumerate(range(0, len(batch), part)):
            chunk = batch[start:start + part]
            if len(chunk) < part and len(batch) == batch_size:
                # the short last part of a full batch is padded onto the static shape too: every image of a
                # full batch then runs on one compiled network, wherever in the batch it fell
                chunk = pad_batch(chunk, part)
            request = full[k] if len(chunk) == part else short
            request.start_async([np.ascontiguousarray(chunk)])
            running.append(request)
        for request in running:
            request.wait()
        # a copy: each request reuses its output buffer
        return np.concatenate([np.asarray(r.get_output_tensor(0).data, dtype=np.float32) for r in running])[:len(batch)]

    return forward


INT8_RECIPE = "stem-fp32+bias-correction+seller-views"  # part of an INT8 cache's identity: another recipe, another cache


def stem(ov_model, n: int = 2) -> list[str]:
    """The network's first `n` convolutions (for MobileNets: the stem and the first depthwise layer)."""
    return [op.get_friendly_name() for op in ov_model.get_ordered_ops()
            if op.get_type_name() in ("Convolution", "GroupConvolution")][:n]


def quantize_int8(ov_model, calibration: list[np.ndarray], out_dir: Path) -> str:
    """Post-training INT8 quantization with NNCF on calibration batches (NNCF counts each batch as one
    sample); writes out_dir/model.xml and .bin and returns their identity.

    The recipe (`INT8_RECIPE`) was chosen on fidelity to the fp32 features of held-out training images and
    of seller-style views of them (`augment`), never on a test split: NNCF's defaults agreed with fp32 on
    far fewer seller-style views than on catalogue photos. Its accuracy-controlled search reverted the two
    first convolutions first, and keeping them fp32 with full (not fast) bias correction closed most of that
    gap at a fraction of the search's cost. Fast bias correction with that scope broke the network.
    Calibrating on seller-style views as well as catalogue photos (`extract.calibrate_int8`) raised the
    agreement on views again, at the same cost."""
    ov = openvino_module()
    import nncf

    quantized = nncf.quantize(ov_model, nncf.Dataset(calibration), subset_size=len(calibration),
                              fast_bias_correction=False, ignored_scope=nncf.IgnoredScope(names=stem(ov_model)))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "model.tmp.xml"
    ov.save_model(quantized, tmp, compress_to_fp16=False)
    tmp.with_suffix(".bin").replace(out_dir / "model.bin")
    tmp.replace(out_dir / "model.xml")
    return ir_identity(out_dir)


def ir_identity(ir_dir: Path) -> str:
    """sha256 over an IR's graph and weights: names the exact quantized network."""
    h = hashlib.sha256()
    for name in ("model.xml", "model.bin"):
        path = ir_dir / name
        if not path.is_file():
            raise RuntimeUnavailable(f"{ir_dir}: the INT8 model these features were made with is missing ({name}); "
                                     "re-extract the cache")
        h.update(path.read_bytes())
    return f"sha256:{h.hexdigest()}"


def load_int8(ir_dir: Path, expected_id: str):
    """The stored INT8 model, refused if it is not the one the features were made with, or if it takes
    float input: featpipe before uint8 batches normalised images outside the network, so such a model
    would read raw pixels as normalised ones and answer wrongly without an error."""
    ov = openvino_module()
    actual = ir_identity(ir_dir)
    if actual != expected_id:
        raise RuntimeUnavailable(f"{ir_dir}: INT8 model is {actual[:19]}..., but the features were made with "
                                 f"{expected_id[:19]}...; re-extract the cache")
    model = ov.Core().read_model(ir_dir / "model.xml")
    if model.input(0).get_element_type() != ov.Type.u8:
        raise RuntimeUnavailable(f"{ir_dir}: this INT8 model takes normalised float images (made by an older "
                                 "featpipe); re-extract the cache with `featpipe extract --runtime openvino-int8`")
    return model


def openvino_model(model: nn.Module | None, runtime: str, pre: Preprocessing, int8_dir: Path | None = None,
                   int8_id: str | None = None):
    """The network an OpenVINO runtime runs: `model` converted (openvino, openvino-bf16: the same network,
    compiled for another arithmetic), or the stored, calibrated IR (openvino-int8, which needs no torch module)."""
    if runtime != "openvino-int8":
        return to_openvino(model, pre)
    if int8_dir is None or int8_id is None:
        raise RuntimeUnavailable("openvino-int8 needs its calibrated model; it is made by `featpipe extract`")
    return load_int8(int8_dir, int8_id)


def ir_bytes(ov_model) -> tuple[bytes, bytes]:
    """An OpenVINO model as IR bytes (graph, weights) to send to other processes: a Ray actor then reads
    the converted network instead of building and converting the torch module itself."""
    ov = openvino_module()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(ov_model, xml, compress_to_fp16=False)
        return xml.read_bytes(), xml.with_suffix(".bin").read_bytes()


def read_ir(graph: bytes, weights: bytes):
    """The model `ir_bytes` wrote."""
    return openvino_module().Core().read_model(graph, weights)


def make_forward(model: nn.Module | None, runtime: str, device: torch.device, pre: Preprocessing, batch_size: int,
                 int8_dir: Path | None = None, int8_id: str | None = None) -> Forward:
    """The forward pass of `model` on `runtime`, from uint8 batches made with `pre`; openvino-int8 needs the
    stored IR and its identity instead of the module."""
    check_runtime(runtime, device)
    if runtime == "torch":
        return torch_forward(model, device, pre)
    return openvino_forward(openvino_model(model, runtime, pre, int8_dir, int8_id), batch_size,
                            precision=PRECISION[runtime])
