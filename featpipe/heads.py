"""The study's torch heads as scikit-learn estimators, trained on in-memory feature tensors.

An epoch is a shuffled pass of large-batch slicing over one tensor: no DataLoader, no Python
objects per sample, so the cost is the matrix work and little else.
"""
from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils.validation import check_is_fitted
from torch import nn
from torch.nn import functional as F

from .devices import resolve_device, tune_cpu_allocator

HEADS = ("fc", "batchnorm")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("none", "cosine")
LOSSES = ("cross_entropy", "hinge")


class Dropout(nn.Dropout):
    """nn.Dropout with its own random generator, its mask drawn as uniform samples.

    Its own generator keeps a fit reproducible when several fits share a process (the sweep runs
    them side by side in threads); uniform samples cost a third of torch's CPU bernoulli_, which
    took a sixth of a batchnorm head's training step. Same distribution and scaling.
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        super().__init__(p)
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        u = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        return x * (u >= self.p) * (1.0 / (1.0 - self.p))


def build_head(head: str, n_in: int, n_out: int, hidden: int = 512, dropout: float = 0.5,
               generator: torch.Generator | None = None, dropout_generator: torch.Generator | None = None) -> nn.Module:
    """`fc`: one Linear. `batchnorm`: Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear, Xavier-uniform.

    Initialisation draws from `generator` (torch's global RNG when None); `fc` keeps nn.Linear's own
    scheme (Kaiming-uniform weights, uniform bias), the study's `batchnorm` Xavier-uniform weights.
    """
    meta = {"device": "meta"}  # built without touching the global RNG, then initialised below
    if head == "fc":
        module = nn.Sequential(nn.Linear(n_in, n_out, **meta))
    elif head == "batchnorm":
        module = nn.Sequential(nn.Sequential(nn.Linear(n_in, hidden, **meta), nn.BatchNorm1d(hidden, **meta),
                                             nn.ReLU(), Dropout(dropout, dropout_generator)),
                               nn.Linear(hidden, n_out, **meta))
    else:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.BatchNorm1d):
                layer.reset_parameters()
            if isinstance(layer, nn.Linear):
                if head == "batchnorm":
                    nn.init.xavier_uniform_(layer.weight, generator=generator)
                else:
                    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                bound = 1 / math.sqrt(layer.in_features)
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return module


def head_flops(head: str, n_in: int, n_out: int, hidden: int, n_train: int, n_val: int, epochs: int) -> float:
    """Matrix-multiply FLOPs of training: forward + weight gradients (+ input gradients of inner layers)."""
    if head == "fc":
        fwd, bwd = 2 * n_in * n_out, 2 * n_in * n_out  # the input needs no gradient
    else:
        fwd = 2 * n_in * hidden + 2 * hidden * n_out
        bwd = 2 * n_in * hidden + 2 * (2 * hidden * n_out)
    return float(epochs * (n_train * (fwd + bwd) + n_val * fwd))


class TorchHead(ClassifierMixin, BaseEstimator):
    """A classifier head on frozen features that keeps the epoch with the best validation loss.

    fit(X, y, X_val, y_val): without validation data, `val_fraction` of the training data is held out.
    """

    def __init__(self, head: str = "batchnorm", hidden: int = 512, dropout: float = 0.5, optimizer: str = "sgd",
                 lr: float = 0.01, momentum: float = 0.9, epochs: int = 10, batch_size: int = 256,
                 weight_decay: float = 0.0, class_weight: str | None = None, label_smoothing: float = 0.0,
                 standardize: bool = True, schedule: str = "none", loss: str = "cross_entropy",
                 val_fraction: float = 0.1, seed: int = 0, device: str = "auto", verbose: bool = False):
        self.head = head
        self.hidden = hidden
        self.dropout = dropout
        self.optimizer = optimizer
        self.lr = lr
        self.momentum = momentum
        self.epochs = epochs
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.class_weight = class_weight
        self.label_smoothing = label_smoothing
        self.standardize = standardize
        self.schedule = schedule
        self.loss = loss
        self.val_fraction = val_fraction
        self.seed = seed
        self.device = device
        self.verbose = verbose

    # -- training ---------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; choose one of {', '.join(HEADS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight must be None or 'balanced', not {self.class_weight!r}")

    def _make_optimizer(self, params) -> torch.optim.Optimizer:
        # fused kernels: one pass per parameter instead of a Python loop of tensor ops per step
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, fused=True)
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, fused=True)

    def fit(self, X, y, X_val=None, y_val=None) -> "TorchHead":
        self._check_params()
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        if X_val is None:
            X, X_val, y, y_val = train_test_split(X, y, test_size=self.val_fraction, random_state=self.seed,
                                                  stratify=y)
        # a class seen only in validation still gets an output, so the two label sets never clash
        self.classes_ = np.unique(np.concatenate([y, np.asarray(y_val)]))
        y_idx, yv_idx = np.searchsorted(self.classes_, y), np.searchsorted(self.classes_, y_val)
        self.n_features_in_ = X.shape[1]
        dev = resolve_device(self.device)
        if dev.type == "cpu":
            tune_cpu_allocator()
        gen = torch.Generator().manual_seed(self.seed)  # init and shuffling; never the global RNG
        dropout_gen = torch.Generator(device=dev).manual_seed(self.seed)

        x_cpu = torch.from_numpy(X)  # torch reductions use every core; numpy's took ~0.2 s a fit here
        self.mean_ = x_cpu.mean(0).numpy() if self.standardize else np.zeros(X.shape[1], np.float32)
        self.scale_ = (x_cpu.std(0) + 1e-6).numpy() if self.standardize else np.ones(X.shape[1], np.float32)
        xt = self._to_tensor(X, dev)
        yt = torch.as_tensor(y_idx, dtype=torch.long, device=dev)
        xv = self._to_tensor(np.asarray(X_val, dtype=np.float32), dev)
        yv = torch.as_tensor(yv_idx, dtype=torch.long, device=dev)
        n_classes = len(self.classes_)
        weight = None
        if self.class_weight == "balanced":
            counts = np.bincount(y_idx, minlength=n_classes).astype(np.float32)
            weight = torch.as_tensor(len(y_idx) / (n_classes * np.maximum(counts, 1)), device=dev)

        module = build_head(self.head, X.shape[1], n_classes, self.hidden, self.dropout, gen, dropout_gen).to(dev)
        opt = self._make_optimizer(module.parameters())
        steps = self.epochs * -(-len(xt) // self.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1)) if self.schedule == "cosine" else None
        self.history_: list[dict] = []
        best_loss, best_state, self.best_epoch_ = float("inf"), None, 0
        for epoch in range(1, self.epochs + 1):
            t0 = time.perf_counter()
            module.train()
            perm = torch.randperm(len(xt), generator=gen).to(dev)
            loss_sum, correct, seen = torch.zeros((), device=dev), torch.zeros((), device=dev), 0
            for start in range(0, len(xt), self.batch_size):
                idx = perm[start:start + self.batch_size]
                if len(idx) < 2:  # BatchNorm cannot train on one sample
                    continue
                logits = module(xt[idx])
                loss = self._loss(logits, yt[idx], weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                loss_sum += loss.detach() * len(idx)
                correct += (logits.detach().argmax(1) == yt[idx]).sum()
                seen += len(idx)
            val_logits = self._logits(module, xv)
            val_loss = (F.multi_margin_loss if self.loss == "hinge" else F.cross_entropy)(val_logits, yv).item()
            row = {"epoch": epoch, "train_loss": (loss_sum / seen).item(), "train_acc": (correct / seen).item(),
                   "val_loss": val_loss, "val_acc": (val_logits.argmax(1) == yv).float().mean().item(),
                   "seconds": time.perf_counter() - t0}
            self.history_.append(row)
            if self.verbose:
                print(" ".join(f"{k}={v:.4g}" for k, v in row.items()))
            if np.isfinite(val_loss) and val_loss < best_loss:
                best_loss, self.best_epoch_ = val_loss, epoch
                best_state = copy.deepcopy(module.state_dict())
        if best_state is not None:
            module.load_state_dict(best_state)
        self.module_ = module.eval().cpu()
        return self

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """Cross-entropy, or the multi-class hinge loss that makes an `fc` head a linear SVM."""
        if self.loss == "hinge":
            return F.multi_margin_loss(logits, y, weight=weight)
        return F.cross_entropy(logits, y, weight=weight, label_smoothing=self.label_smoothing)

    # -- inference --------------------------------------------------------------------------------
    def _to_tensor(self, X: np.ndarray, dev: torch.device) -> torch.Tensor:
        x = torch.as_tensor(X, dtype=torch.float32, device=dev)
        return (x - torch.as_tensor(self.mean_, device=dev)) / torch.as_tensor(self.scale_, device=dev)

    @staticmethod
    def _logits(module: nn.Module, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        module.eval()
        with torch.inference_mode():
            return torch.cat([module(x[i:i + chunk]) for i in range(0, len(x), chunk)]) if len(x) else module(x)

    def decision_function(self, X) -> np.ndarray:
        """Raw logits (temperature scaling and thresholds work on these)."""
        check_is_fitted(self, "module_")
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"expected features of shape (n, {self.n_features_in_}), got {X.shape}")
        return self._logits(self.module_, self._to_tensor(X, torch.device("cpu"))).numpy()

    def predict_proba(self, X) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.decision_function(X)), 1).numpy()

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.decision_function(X).argmax(1)]

    def transform(self, X) -> np.ndarray:
        """The head's own embedding: the hidden layer of `batchnorm`, the logits of `fc`."""
        check_is_fitted(self, "module_")
        if self.head == "fc":
            return self.decision_function(X)
        x = self._to_tensor(np.asarray(X, dtype=np.float32), torch.device("cpu"))
        with torch.inference_mode():
            return self.module_[0](x).numpy()

    # -- persistence (tensors and plain values only, so loading needs no pickle) -----------------
    def to_state(self) -> dict:
        check_is_fitted(self, "module_")
        return {"params": self.get_params(), "classes": self.classes_.tolist(),
                "state_dict": self.module_.state_dict(), "mean": torch.from_numpy(self.mean_),
                "scale": torch.from_numpy(self.scale_), "history": self.history_, "best_epoch": self.best_epoch_}

    @classmethod
    def from_state(cls, state: dict) -> "TorchHead":
        est = cls(**state["params"])
        est.classes_ = np.array(state["classes"])
        est.mean_, est.scale_ = state["mean"].numpy(), state["scale"].numpy()
        est.n_features_in_ = len(est.mean_)
        est.module_ = build_head(est.head, est.n_features_in_, len(est.classes_), est.hidden, est.dropout)
        est.module_.load_state_dict(state["state_dict"])
        est.module_.eval()
        est.history_, est.best_epoch_ = state["history"], state["best_epoch"]
        return est
