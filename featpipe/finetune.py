"""Partial fine-tuning from cached activations: the backbone's last blocks and a head, trained together.

The expensive part of the backbone (everything up to an inner block) still runs once: `extract
--activations` stores that block's output for every image of the cache beside it
(`<cache>.h5.acts/<block>.h5`, float16). `fit-head --finetune` then trains the remaining blocks plus the head
on those activations, starting from the frozen pipeline: the blocks start at their ImageNet weights and the
head's input is standardised with the frozen features' statistics. The model file carries the trained
blocks, so predict rebuilds the network from it alone: the frozen part on the cache's runtime, the
fine-tuned blocks in torch.

BatchNorm inside the fine-tuned blocks stays in eval mode: its ImageNet statistics (folded into the
convolutions in some weight files) are part of what the blocks learned, and batch statistics of the
catalogue's studio shots replace them with one narrow domain's.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .backbones import BLOCKS, load_backbone, split_backbone
from .devices import resolve_device, tune_cpu_allocator
from .errors import UserError
from .harness import save_fitted
from .heads import TorchHead, build_head, class_weights, head_input, signed_power
from .models import Model
from .features.pipeline import pipeline_forward
from .features.weights import locate_weights
from .sidefiles import SideSummary, extract_rows, made_from, open_rows
from .store import CacheError, FeatureCache

FORMAT = "featpipe-activations"


def activations_path(cache_path: Path, block: str) -> Path:
    return Path(str(cache_path) + ".acts") / f"{block}.h5"


def _block(cache: FeatureCache) -> str:
    if "parts" in cache.attrs:
        raise CacheError(f"{cache.backbone}: fine-tuning runs on one backbone's cache, not on joined caches")
    if cache.backbone not in BLOCKS:
        raise UserError(f"--finetune/--activations: supported for {', '.join(BLOCKS)}, not {cache.backbone}")
    if cache.runtime == "openvino-int8":
        raise UserError("--finetune/--activations: an INT8 cache's network is quantized as a whole; "
                        "use a torch, openvino or openvino-bf16 cache")
    return BLOCKS[cache.backbone]


def extract_activations(cache: FeatureCache, batch_size: int = 64, workers: int | None = None,
                        device: str = "auto", progress: bool = True) -> SideSummary:
    """The fine-tuning block's output for every image of `cache`, on the cache's own runtime, beside it."""
    block = _block(cache)
    return extract_rows(cache, activations_path(cache.path, block), made_from(cache) | {"block": block},
                        FORMAT, cache.ids, {},
                        lambda: pipeline_forward(cache.provenance(), batch_size=batch_size, device=device, bottom=True),
                        None, batch_size, workers, "float16", "images", progress)


@dataclass
class Activations:
    path: Path
    attrs: dict
    block: str
    features: torch.Tensor  # (rows of the cache, C, H, W) float16, in the cache's row order


def open_activations(cache: FeatureCache) -> Activations:
    block = _block(cache)
    path = activations_path(cache.path, block)
    arrays, attrs = open_rows(cache, path, FORMAT, (), "featpipe extract ... --activations", "activations")
    if not np.array_equal(arrays["ids"], cache.ids):
        raise CacheError(f"{path}: does not hold one row per image of {cache.path.name}; delete it and rerun "
                         "`featpipe extract ... --activations`")
    bottom, _ = split_backbone(load_backbone(cache.backbone, "none")[0], cache.backbone)
    size = cache.provenance()["preprocessing"]["image_size"]
    with torch.inference_mode():
        shape = bottom(torch.zeros(1, 3, size, size)).shape[1:]  # the block's output shape at this resolution
    return Activations(path, attrs, block, torch.from_numpy(arrays["features"]).view(-1, *shape))


def _in_batches(net: nn.Module, x: torch.Tensor, rows: np.ndarray, dev: torch.device, chunk: int = 1024) -> torch.Tensor:
    """net over x's `rows` (float16 on the CPU) on `dev`, in chunks, without autograd."""
    with torch.inference_mode():
        return torch.cat([net(x.index_select(0, torch.as_tensor(rows[i:i + chunk])).to(dev).float())
                          for i in range(0, len(rows), chunk)])


def fit_finetune(cache: FeatureCache, acts: Activations, out: str | Path, head: TorchHead, top_lr: float = 1e-4,
                 target_precision: float = 0.99, alpha: float = 0.05, patience: int | None = 3) -> Model:
    """Train the blocks after `acts.block` and `head` (its architecture, optimizer settings, epochs and seed)
    on the cached activations of the training split; keep the epoch with the best validation loss, then
    calibrate, evaluate and save as fit-head does. Training stops early once `patience` epochs in a row
    have not improved the validation loss (an epoch here costs what the whole frozen head's fit does)."""
    if head.members != 1:
        raise UserError(f"fine-tuning trains one network, not an ensemble of {head.members}; use --members 1")
    t0 = time.perf_counter()
    dev = resolve_device(head.device)
    if dev.type == "cpu":
        tune_cpu_allocator()  # without it every batch's activations page-fault in again: epochs took twice as long
    prov = cache.provenance()
    _, top = split_backbone(load_backbone(cache.backbone, locate_weights(prov))[0], cache.backbone)
    top.eval().requires_grad_(True)  # load_backbone freezes every parameter
    train, val, test = (np.flatnonzero(cache.split == code) for code in (0, 1, 2))
    classes = np.unique(cache.labels[np.concatenate([train, val])])
    y = torch.as_tensor(np.searchsorted(classes, cache.labels), dtype=torch.long)  # test-only classes: never right
    x = acts.features
    # the head's input standardised as the frozen head's is: at the start, top's output is the cached features,
    # so their statistics are the ones to use (no pass of top over the training split needed)
    raw = torch.from_numpy(cache.subset("train")[0])
    low, high = raw.min(0).values, raw.max(0).values  # the range a clipping head keeps its input to, as the frozen head's
    start = signed_power(raw, head.power)
    dim = start.shape[1]
    mean = start.mean(0) if head.standardize else torch.zeros(dim)
    scale = start.std(0) + 1e-6 if head.standardize else torch.ones(dim)
    generator = torch.Generator().manual_seed(head.seed)
    layers = build_head(head.head, dim, len(classes), head.hidden, head.dropout, generator)
    net = nn.Sequential(top, _HeadInput(head.power, mean, scale, *((low, high) if head.clip else ())), layers).to(dev)
    opt_cls = torch.optim.Adam if head.optimizer == "adam" else torch.optim.SGD
    extra = {} if head.optimizer == "adam" else {"momentum": head.momentum}
    opt = opt_cls([{"params": top.parameters(), "lr": top_lr}, {"params": layers.parameters(), "lr": head.lr}],
                  weight_decay=head.weight_decay, **extra)
    weight = class_weights(head.class_weight, y[train].numpy(), classes, dev)
    y_val = y[val].to(dev)
    best, history = (float("inf"), None, 0), []
    # epochs take minutes on a CPU: a bar on a terminal (tqdm turns itself off when stderr is not one)
    bar = tqdm(total=head.epochs * -(-len(train) // head.batch_size), unit="batch", desc="fine-tuning", disable=None)
    # dropout draws from torch's global RNG: seeded here, on a fork that leaves the caller's stream as it was,
    # so one seed gives one model
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(head.seed)
        for epoch in range(1, head.epochs + 1):
            t_epoch = time.perf_counter()
            layers.train()  # the head's BatchNorm and dropout train; top's BatchNorm stays in eval (module docstring)
            order = train[torch.randperm(len(train), generator=generator).numpy()]
            total, correct = 0.0, 0
            for i in range(0, len(order), head.batch_size):
                rows = torch.as_tensor(order[i:i + head.batch_size])
                if len(rows) < 2:  # BatchNorm cannot train on one sample
                    continue
                yb = y[rows].to(dev)
                logits = net(x.index_select(0, rows).to(dev).float())
                loss = F.cross_entropy(logits, yb, weight=weight, label_smoothing=head.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(rows)
                bar.update()
                correct += int((logits.argmax(1) == yb).sum())
            layers.eval()
            val_logits = _in_batches(net, x, val, dev)
            val_loss = F.cross_entropy(val_logits, y_val, weight=weight).item()
            row = {"epoch": epoch, "train_loss": total / len(train), "train_acc": correct / len(train), "val_loss": val_loss,
                   "val_acc": (val_logits.argmax(1) == y_val).float().mean().item(),
                   "seconds": time.perf_counter() - t_epoch}
            history.append(row)
            bar.set_postfix(epoch=epoch, val_loss=f"{val_loss:.4f}")
            if head.verbose:
                print(" ".join(f"{k}={v:.4g}" for k, v in row.items()))
            if np.isfinite(val_loss) and val_loss < best[0]:
                best = (val_loss, copy.deepcopy(net.state_dict()), epoch)
            elif patience is not None and epoch - best[2] >= patience:
                break
    bar.close()
    if best[1] is not None:
        net.load_state_dict(best[1])
    net.eval().cpu()
    # the fitted head as a TorchHead on top's output, so calibration, evaluation and the model file are fit-head's
    est = copy.deepcopy(head)
    est.classes_, est.n_features_in_ = classes, dim
    est.mean_, est.scale_, est.data_min_, est.data_max_ = mean.numpy(), scale.numpy(), low.numpy(), high.numpy()
    est.module_, est.history_, est.best_epoch_ = layers, history, best[2]
    X_val, X_test = (_in_batches(top, x, rows, torch.device("cpu")).numpy() for rows in (val, test))
    provenance = prov | {"finetune": {"block": acts.block, "top_lr": top_lr, "state_dict": top.state_dict()}}
    return save_fitted(cache, out, est, (est.logits(X_val), cache.labels[val], "validation split"),
                       (X_test, cache.labels[test]), len(train), time.perf_counter() - t0, provenance,
                       target_precision, alpha, {"train_views": f"finetune {acts.block}"})


class _HeadInput(nn.Module):
    """What `TorchHead` does to its features before its layers (`heads.head_input`), as a module of the network."""

    def __init__(self, power: float, mean: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None = None,
                 high: torch.Tensor | None = None):
        super().__init__()
        self.power = power
        for name, t in (("mean", mean), ("scale", scale), ("low", low), ("high", high)):
            self.register_buffer(name, t)  # None: no clipping (a None buffer moves with .to() as a no-op)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return head_input(x, self.power, self.mean, self.scale, self.low, self.high)
