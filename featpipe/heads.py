"""The study's torch heads as scikit-learn estimators, trained on in-memory feature tensors.

An epoch is a shuffled pass of large-batch slicing over one tensor: no DataLoader, no Python
objects per sample, so the cost is the matrix work and little else.
"""
from __future__ import annotations

import math
import numbers
import time
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.model_selection import train_test_split
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, check_X_y, validate_data
from torch import nn
from torch.nn import functional as F

from .devices import resolve_device, tune_cpu_allocator

HEADS = ("fc", "batchnorm")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("none", "cosine")
LOSSES = ("cross_entropy", "hinge")


def _in_chunks(fn, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """fn over x in chunks of rows without autograd, concatenated: inference on any number of rows
    in bounded memory (an empty x still gives fn's empty output)."""
    with torch.inference_mode():
        return torch.cat([fn(x[i:i + chunk]) for i in range(0, max(len(x), 1), chunk)])


def signed_power(x: torch.Tensor, power: float) -> torch.Tensor:
    """sign(x) |x|^power, element-wise (power normalisation; x itself when power is 1). Below 1 it evens out
    a pooled feature vector: a few large activations no longer outweigh the many small ones, so a head
    leans less on the handful of channels that fire hardest on one photographic style."""
    # |x| is floored where the power's slope would be infinite: at 0 the plain form's gradient is 0 * inf = NaN,
    # which poisons fine-tuning through it (pooled ReLU6 features are often exactly 0)
    return x if power == 1 else x.sign() * x.abs().clamp_min(1e-6).pow(power)


def head_input(x: torch.Tensor, power: float, mean: torch.Tensor, scale: torch.Tensor,
               low: torch.Tensor | None = None, high: torch.Tensor | None = None) -> torch.Tensor:
    """What a head's layers read: features clipped to [low, high] (when given), power-normalised
    (`signed_power`), then standardised by `mean` and `scale`."""
    if low is not None:
        x = x.clamp(low, high)
    return (signed_power(x, power) - mean) / scale


def build_head(head: str, n_in: int, n_out: int, hidden: int = 512, dropout: float = 0.5,
               generator: torch.Generator | None = None) -> nn.Module:
    """`fc`: one Linear. `batchnorm`: Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear, Xavier-uniform.

    Initialisation draws from `generator` (torch's global RNG when None); `fc` keeps nn.Linear's own
    scheme (Kaiming-uniform weights, uniform bias), the study's `batchnorm` Xavier-uniform weights.
    """
    meta = {"device": "meta"}  # built without touching the global RNG, then initialised below
    if head == "fc":
        module = nn.Sequential(nn.Linear(n_in, n_out, **meta))
    elif head == "batchnorm":
        module = nn.Sequential(nn.Sequential(nn.Linear(n_in, hidden, **meta), nn.BatchNorm1d(hidden, **meta),
                                             nn.ReLU(), nn.Dropout(dropout)),
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


class LogitsClassifier(ClassifierMixin):
    """scikit-learn's classifier methods, all read from the subclass's `logits(X)` (a column per class of
    `classes_`): a head, and a bag of heads (`bagging.FoldBag`)."""

    def decision_function(self, X) -> np.ndarray:
        """scikit-learn's shape: the logits, or for two classes the margin of the second (n_samples,)."""
        z = self.logits(X)
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z

    def predict_proba(self, X) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.logits(X)), 1).numpy()

    def predict(self, X) -> np.ndarray:
        best = self.logits(X).argmax(1)  # first: it raises NotFittedError before classes_ is touched
        return self.classes_[best]


class TorchHead(LogitsClassifier, BaseEstimator):
    """A classifier head on frozen features that keeps the epoch with the best validation loss.

    fit(X, y, X_val, y_val): without validation data, `val_fraction` of the training data is held out.
    `clip`: clip each feature of the rows it scores to the range the training rows span (`data_min_`,
    `data_max_`, as scikit-learn's MinMaxScaler(clip=True)), so a photo unlike any it trained on cannot push
    the layers beyond anything they were fitted to: the layers are linear in their input, and a feature that
    barely varies over studio shots but fires on a seller's background would be standardised into a huge value.
    """

    def __init__(self, head: str = "batchnorm", hidden: int = 512, dropout: float = 0.5, optimizer: str = "sgd",
                 lr: float = 0.01, momentum: float = 0.9, epochs: int = 10, batch_size: int = 256,
                 weight_decay: float = 0.0, class_weight: str | None = None, label_smoothing: float = 0.0,
                 standardize: bool = True, power: float = 1.0, clip: bool = False, schedule: str = "none",
                 loss: str = "cross_entropy", members: int = 1, val_fraction: float = 0.1, seed: int = 0,
                 device: str = "auto", verbose: bool = False):
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
        self.power = power
        self.clip = clip
        self.schedule = schedule
        self.loss = loss
        self.members = members
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
        if not (self.class_weight in (None, "balanced") or isinstance(self.class_weight, dict)):
            raise ValueError(f"class_weight must be None, 'balanced' or a dict class -> weight, not {self.class_weight!r}")
        if not self.power > 0:
            raise ValueError(f"power must be positive, not {self.power!r}")
        if not (isinstance(self.members, numbers.Integral) and self.members >= 1):
            raise ValueError(f"members must be a whole number >= 1, not {self.members!r}")

    def fit(self, X, y, X_val=None, y_val=None) -> "TorchHead":
        """Fit the head; with `members` > 1, fit that many copies with seeds seed, seed + 1, ... (each its own
        initialisation, batch order and dropout) on the same data, and average their logits: a deep ensemble."""
        self._check_params()
        if self.members == 1:
            fit_stack([self], X, y, X_val, y_val)
            return self
        if X_val is None:  # one hold-out for every member, so all standardise alike and stop on the same rows
            X, y = check_X_y(X, y, dtype=np.float32, ensure_min_samples=2)
            X, X_val, y, y_val = _hold_out(X, y, self.val_fraction, self.seed)
        fitted = [clone(self).set_params(members=1, seed=self.seed + k) for k in range(self.members)]
        for est in fitted:
            fit_stack([est], X, y, X_val, y_val)
        first = fitted[0]
        for attr in ("classes_", "n_features_in_", "mean_", "scale_", "data_min_", "data_max_"):
            setattr(self, attr, getattr(first, attr))
        self.module_ = MeanOfLogits([est.module_ for est in fitted]).eval()
        self.history_ = [{"member": k} | row for k, est in enumerate(fitted) for row in est.history_]
        self.best_epoch_ = [est.best_epoch_ for est in fitted]
        return self

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """Each head's mean loss over a batch of logits (batch, heads, classes): cross-entropy, or the
        multi-class hinge loss that makes an `fc` head a linear SVM. Same means as torch's reductions."""
        b, k, c = logits.shape
        flat, yk = logits.reshape(b * k, c), y.repeat_interleave(k)
        if self.loss == "hinge":
            return F.multi_margin_loss(flat, yk, weight=weight, reduction="none").view(b, k).mean(0)
        per = F.cross_entropy(flat, yk, weight=weight, label_smoothing=self.label_smoothing, reduction="none")
        return per.view(b, k).sum(0) / (weight[y].sum() if weight is not None else b)

    def _val_loss(self, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> float:
        """The training loss without label smoothing, class weights included (they say which mistakes
        cost more): the criterion for the best epoch."""
        return (F.multi_margin_loss if self.loss == "hinge" else F.cross_entropy)(logits, y, weight=weight).item()

    # -- inference --------------------------------------------------------------------------------
    def _to_tensor(self, X: np.ndarray, dev: torch.device) -> torch.Tensor:
        """The layers' input (`head_input`)."""
        def on_dev(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(a, device=dev)

        bounds = (on_dev(self.data_min_), on_dev(self.data_max_)) if self.clip else ()
        return head_input(torch.as_tensor(X, dtype=torch.float32, device=dev), self.power, on_dev(self.mean_),
                          on_dev(self.scale_), *bounds)

    def logits(self, X) -> np.ndarray:
        """Raw logits, one column per class (temperature scaling and thresholds work on these)."""
        check_is_fitted(self, "module_")
        X = validate_data(self, X, reset=False, dtype=np.float32)
        return _in_chunks(self.module_.eval(), self._to_tensor(X, torch.device("cpu"))).numpy()

    def embed(self, X) -> np.ndarray:
        """The head's own embedding for similarity search: the hidden layer of `batchnorm`, the logits of `fc`.
        (Not `transform`: a head is a classifier, and scikit-learn would then hold it to the transformer contract.)"""
        if self.head == "fc":
            return self.logits(X)
        check_is_fitted(self, "module_")
        x = self._to_tensor(validate_data(self, X, reset=False, dtype=np.float32), torch.device("cpu"))
        # an ensemble's first member: its members' layers are alike, and one is `members` times smaller
        layers = self.module_.members[0] if isinstance(self.module_, MeanOfLogits) else self.module_
        with torch.inference_mode():
            return layers[0](x).numpy()

    # -- persistence (tensors and plain values only, so loading needs no pickle) -----------------
    def _module(self, state_dict: dict) -> nn.Module:
        """The head's module holding `state_dict`, built on the meta device: an initialisation that the state dict
        replaces would cost seconds for a wide head's weights; the global RNG is left as it was."""
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            layers = [build_head(self.head, self.n_features_in_, len(self.classes_), self.hidden, self.dropout)
                      for _ in range(self.members)]
            module = layers[0] if self.members == 1 else MeanOfLogits(layers)
        module.load_state_dict(state_dict, assign=True)
        return module.eval()

    def to_state(self) -> dict:
        check_is_fitted(self, "module_")
        return {"params": self.get_params(), "classes": self.classes_.tolist(),
                "state_dict": self.module_.state_dict(), "mean": torch.from_numpy(self.mean_),
                "scale": torch.from_numpy(self.scale_), "data_min": torch.from_numpy(self.data_min_),
                "data_max": torch.from_numpy(self.data_max_), "history": self.history_, "best_epoch": self.best_epoch_}

    @classmethod
    def from_state(cls, state: dict) -> "TorchHead":
        est = cls(**state["params"])
        est.classes_ = np.array(state["classes"])
        est.mean_, est.scale_ = state["mean"].numpy(), state["scale"].numpy()
        est.n_features_in_ = len(est.mean_)
        # files from before clipping have no range, and their params no clip (so it is off)
        unbounded = np.full(est.n_features_in_, np.inf, np.float32)
        est.data_min_ = state["data_min"].numpy() if "data_min" in state else -unbounded
        est.data_max_ = state["data_max"].numpy() if "data_max" in state else unbounded
        est.module_ = est._module(state["state_dict"])
        est.history_, est.best_epoch_ = state["history"], state["best_epoch"]
        return est


class MeanOfLogits(nn.Module):
    """A deep ensemble's layers: the mean of its members' logits, so temperature scaling, the auto-tag
    threshold and the model file treat it as one head."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


# -- stacks: several heads trained as one ------------------------------------------------------------
# What heads in one stack may differ in: their layers (head, hidden, dropout), what only their
# optimizer sees, and printing. Everything that shapes the data and the loss is shared.
STACKABLE_PARAMS = ("head", "hidden", "dropout", "optimizer", "lr", "momentum", "weight_decay", "schedule", "verbose")


def _architecture(est: TorchHead) -> tuple:
    """What decides a head's layers and dropout masks (fc has no hidden layer and no dropout)."""
    return ("fc",) if est.head == "fc" else (est.head, est.hidden, est.dropout)


class _Group:
    """k copies of one architecture inside a `_Stack`: their rows of the shared first layer and the
    rest of their tensors side by side (leading dimension k)."""

    def __init__(self, est: TorchHead, template: nn.Module, k: int, rows: int, dev: torch.device):
        self.head, self.dropout, self.k = est.head, est.dropout, k
        self.first = next(name for name, m in template.named_modules() if isinstance(m, nn.Linear))
        self.width = template.get_submodule(self.first).out_features  # rows of the first layer per copy
        self.rows = slice(rows, rows + k * self.width)
        trainable = {name for name, _ in template.named_parameters()}
        self.tensors = {name: t.detach().unsqueeze(0).repeat(k, *[1] * t.dim()).requires_grad_(name in trainable)
                        for name, t in template.state_dict().items() if not name.startswith(self.first + ".")}
        self.trainable = [name for name in self.tensors if name in trainable]
        bn = next((m for m in template.modules() if isinstance(m, nn.BatchNorm1d)), None)
        self.bn_momentum, self.bn_eps = (bn.momentum, bn.eps) if bn is not None else (None, None)
        # its own dropout stream, seeded as a head fitted alone seeds it
        self.generator = torch.Generator(device=dev).manual_seed(est.seed)

    def copy_rows(self, j: int) -> slice:
        start = self.rows.start + j * self.width
        return slice(start, start + self.width)

    def __call__(self, h: torch.Tensor, train: bool) -> torch.Tensor:
        """This group's rows of the first layer's output (k*width, B) -> logits (B, k, classes), as in
        `build_head`. Rows stay rows: BatchNorm sees them as (N=1, C=k*width, L=B), which normalises
        each row over the batch, and the second layer is one batched product (k, C, H) @ (k, H, B), so
        nothing is transposed in memory (BatchNorm's backward on a transposed input took 20x longer)."""
        t = self.tensors
        if self.head == "fc":
            return h.unflatten(0, (self.k, self.width)).permute(2, 0, 1)
        if train:
            t["0.1.num_batches_tracked"].add_(1)
        h = F.batch_norm(h.unsqueeze(0), t["0.1.running_mean"].view(-1), t["0.1.running_var"].view(-1),
                         t["0.1.weight"].flatten(), t["0.1.bias"].flatten(), train, self.bn_momentum, self.bn_eps)
        h = F.relu(h).view(self.k, self.width, -1)
        if train and self.dropout > 0:
            # uniform samples: a third of the cost of CPU bernoulli_; one mask serves all k copies
            keep = torch.rand((self.width, h.shape[2]), generator=self.generator, device=h.device) >= self.dropout
            h = h * (keep * (1.0 / (1.0 - self.dropout)))  # one full-size multiply
        return torch.baddbmm(t["1.bias"].unsqueeze(2), t["1.weight"], h).permute(2, 0, 1)


class _Stack:
    """Heads trained as one: copies of one or more architectures whose tensors lie side by side.

    Every head's first layer reads the same input batch, so all of them are one matrix product
    forward and one for the weight gradients, whatever their kind; the layers after it run once per
    architecture for all its copies (BENCHMARKS.md, sweep). The copies of an architecture start from
    the same weights and every head sees the same batches and, within an architecture, the same
    dropout masks; no head's gradient depends on another's, so each ends as it would alone. Each
    head's optimizer updates views of its own slices.
    """

    def __init__(self, groups: list[tuple[TorchHead, nn.Module, int]], dev: torch.device):
        self.groups, rows, w, b = [], 0, [], []
        for est, template, k in groups:
            group = _Group(est, template, k, rows, dev)
            layer = template.get_submodule(group.first)
            w.append(layer.weight.detach().repeat(k, 1))
            b.append(layer.bias.detach().repeat(k))
            self.groups.append(group)
            rows = group.rows.stop
        self.weight = torch.cat(w).requires_grad_()  # every head's first layer: (sum of k*width, features)
        self.bias = torch.cat(b).requires_grad_()
        # leaf views of each head's slices, in stack order: what its optimizer updates in place
        self.views = [[self.weight.detach()[g.copy_rows(j)], self.bias.detach()[g.copy_rows(j)]]
                      + [g.tensors[name].detach()[j] for name in g.trainable]
                      for g in self.groups for j in range(g.k)]

    def __call__(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """Logits (B, heads, classes) in stack order."""
        # (heads' rows, B) = W @ x^T: MKL ran this 10-25% faster than x @ W^T at these shapes, and
        # each group's rows are then one contiguous block
        h = torch.addmm(self.bias.unsqueeze(1), self.weight, x.t())
        out = [g(part, train) for g, part in zip(self.groups, h.split([g.k * g.width for g in self.groups]))]
        return out[0] if len(out) == 1 else torch.cat(out, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return _in_chunks(lambda part: self(part, train=False), x)

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of `loss`, handed to each head's views."""
        leaves = [self.weight, self.bias] + [g.tensors[name] for g in self.groups for name in g.trainable]
        for t in leaves:
            t.grad = None
        loss.backward()
        views = iter(self.views)
        for g in self.groups:
            if g.head == "batchnorm":
                # BatchNorm in training subtracts the batch mean, so the bias before it has a zero gradient;
                # what backward leaves there is rounding noise that depends on the matrix shapes, and Adam
                # (which divides by its running size) turns it into full-size steps that the running mean
                # then follows. Zero it, as exact arithmetic would: fits no longer depend on the stack.
                self.bias.grad[g.rows] = 0
            for j in range(g.k):
                rows = g.copy_rows(j)
                grads = [self.weight.grad[rows], self.bias.grad[rows]] + [g.tensors[n].grad[j] for n in g.trainable]
                for view, grad in zip(next(views), grads):
                    view.grad = grad

    def state_dict(self, i: int) -> dict:
        """Head i's tensors under `build_head`'s names."""
        for g in self.groups:
            if i < g.k:
                rows = g.copy_rows(i)
                first = {f"{g.first}.weight": self.weight[rows], f"{g.first}.bias": self.bias[rows]}
                return {name: t.detach().clone() for name, t in (first | {n: t[i] for n, t in g.tensors.items()}).items()}
            i -= g.k
        raise IndexError(i)


def _optimizers(estimators: Sequence[TorchHead], views: list[list[torch.Tensor]], steps: int) -> list:
    """(optimizer, scheduler or None) per kind of optimizer and schedule, a parameter group per head:
    fewer Python calls per step than one optimizer per head, the same updates. Fused kernels: one pass
    per parameter instead of a Python loop of tensor ops."""
    kinds: dict[tuple, list] = {}
    for est, params in zip(estimators, views):
        kinds.setdefault((est.optimizer, est.schedule), []).append(
            {"params": params, "lr": est.lr, "weight_decay": est.weight_decay}
            | ({"momentum": est.momentum} if est.optimizer == "sgd" else {}))
    out = []
    for (kind, schedule), groups in kinds.items():
        opt = (torch.optim.SGD if kind == "sgd" else torch.optim.Adam)(groups, fused=True)
        out.append((opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if schedule == "cosine" else None))
    return out


def _hold_out(X: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> list[np.ndarray]:
    """Validation rows taken from the training data: stratified when every class can give one,
    else a plain random draw (tiny data, rare classes); always at least one row on each side."""
    n_val = min(max(1, math.ceil(fraction * len(y))), len(y) - 1)
    _, counts = np.unique(y, return_counts=True)
    stratify = y if counts.min() >= 2 and len(counts) <= n_val <= len(y) - len(counts) else None
    return train_test_split(X, y, test_size=n_val, random_state=seed, stratify=stratify)


def class_weights(class_weight: str | dict | None, y_idx: np.ndarray, classes: np.ndarray,
                  dev: torch.device) -> torch.Tensor | None:
    """The loss weight of each class: None, 'balanced' (inverse to its count among the training labels
    `y_idx`, as scikit-learn's) or a dict class -> weight (1 for classes it leaves out)."""
    if class_weight == "balanced":
        counts = np.bincount(y_idx, minlength=len(classes)).astype(np.float32)
        return torch.as_tensor(len(y_idx) / (len(classes) * np.maximum(counts, 1)), device=dev)
    if isinstance(class_weight, dict):
        return torch.tensor([float(class_weight.get(c, 1.0)) for c in classes.tolist()], device=dev)
    return None


def fit_stack(estimators: Sequence[TorchHead], X, y, X_val=None, y_val=None) -> list[TorchHead]:
    """Fit heads that differ only in STACKABLE_PARAMS as one stack (`_Stack`); each ends as if fitted alone.

    Without validation data, the first head's `val_fraction` of the training data is held out.
    """
    # heads of one architecture next to each other: each architecture is one group of the stack
    given = list(estimators)
    kinds = list(dict.fromkeys(_architecture(est) for est in given))
    estimators = sorted(given, key=lambda est: kinds.index(_architecture(est)))
    first = estimators[0]
    shared = {k: v for k, v in first.get_params().items() if k not in STACKABLE_PARAMS}
    for est in estimators:
        est._check_params()
        if est.members != 1:  # a stack's copies share initialisation, batches and dropout: no ensemble
            raise ValueError("a stack fits single heads; fit a head with members > 1 on its own (TorchHead.fit)")
        differ = sorted(k for k, v in shared.items() if est.get_params()[k] != v)
        if differ:
            raise ValueError(f"heads in one stack may differ only in {', '.join(STACKABLE_PARAMS)}; "
                             f"these differ: {', '.join(differ)}")
    # scikit-learn's input checks, once for the stack: a clear message for sparse, NaN, empty or 1-d input
    X, y = check_X_y(X, y, dtype=np.float32, ensure_min_samples=2)
    check_classification_targets(y)
    if X_val is not None:
        X_val, y_val = check_X_y(X_val, y_val, dtype=np.float32)
        if X_val.shape[1] != X.shape[1]:
            raise ValueError(f"validation features have {X_val.shape[1]} columns, training features {X.shape[1]}")
    if X_val is None:
        X, X_val, y, y_val = _hold_out(X, y, first.val_fraction, first.seed)
    # a class seen only in validation still gets an output, so the two label sets never clash
    classes = np.unique(np.concatenate([y, np.asarray(y_val)]))
    y_idx, yv_idx = np.searchsorted(classes, y), np.searchsorted(classes, y_val)
    dev = resolve_device(first.device)
    if dev.type == "cpu":
        tune_cpu_allocator()
    # initialisation and shuffling draw from generators of their own (never the global RNG), so heads
    # of every kind with one seed see the same batches and fitted alone start as they do here
    shuffle = torch.Generator().manual_seed(first.seed)

    mean, scale = np.zeros(X.shape[1], np.float32), np.ones(X.shape[1], np.float32)
    if first.standardize:
        # two passes of plain torch reductions: 0.04 s on the training split here, std_mean's 0.14 s
        xs = signed_power(torch.from_numpy(X), first.power)
        mean_t = xs.mean(0)
        std = (xs - mean_t).square_().sum(0).div_(max(len(xs) - 1, 1)).sqrt_()
        mean, scale = mean_t.numpy(), (std + 1e-6).numpy()
    # the range the training rows span (not the validation rows': a clipped head never scores beyond its training)
    data_min, data_max = X.min(0), X.max(0)
    for est in estimators:
        est.classes_, est.n_features_in_, est.mean_, est.scale_ = classes, X.shape[1], mean, scale
        est.data_min_, est.data_max_ = data_min, data_max
    xt = first._to_tensor(X, dev)
    yt = torch.as_tensor(y_idx, dtype=torch.long, device=dev)
    xv = first._to_tensor(np.asarray(X_val, dtype=np.float32), dev)
    yv = torch.as_tensor(yv_idx, dtype=torch.long, device=dev)
    weight = class_weights(first.class_weight, y_idx, classes, dev)

    groups = []
    for kind in kinds:
        members = [est for est in estimators if _architecture(est) == kind]
        est = members[0]
        template = build_head(est.head, X.shape[1], len(classes), est.hidden, est.dropout,
                              torch.Generator().manual_seed(est.seed)).to(dev)
        groups.append((est, template, len(members)))
    stack = _Stack(groups, dev)
    optimizers = _optimizers(estimators, stack.views, steps=max(first.epochs * -(-len(xt) // first.batch_size), 1))
    best = [(float("inf"), None, 0)] * len(estimators)  # (val loss, state, epoch) per head
    for est in estimators:
        est.history_ = []
    for epoch in range(1, first.epochs + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(len(xt), generator=shuffle).to(dev)
        loss_sum = torch.zeros(len(estimators), device=dev)
        correct, seen = torch.zeros(len(estimators), device=dev), 0
        for start in range(0, len(xt), first.batch_size):
            idx = perm[start:start + first.batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on one sample (skipped for every kind alike)
                continue
            # index_select gathers rows twice as fast as x[idx] here
            logits, yb = stack(xt.index_select(0, idx), train=True), yt.index_select(0, idx)
            losses = first._loss(logits, yb, weight)
            stack.backward(losses.sum())  # no head's loss depends on another's weights
            for opt, sched in optimizers:
                opt.step()
                if sched is not None:
                    sched.step()
            loss_sum += losses.detach() * len(idx)
            correct += (logits.detach().argmax(2) == yb.unsqueeze(1)).sum(0)
            seen += len(idx)
        val_logits = stack.logits(xv)
        seconds = time.perf_counter() - t0
        for i, est in enumerate(estimators):
            val_loss = est._val_loss(val_logits[:, i], yv, weight)
            row = {"epoch": epoch, "train_loss": (loss_sum[i] / seen).item(), "train_acc": (correct[i] / seen).item(),
                   "val_loss": val_loss, "val_acc": (val_logits[:, i].argmax(1) == yv).float().mean().item(),
                   "seconds": seconds}
            est.history_.append(row)
            if est.verbose:
                print((f"[{i}] " if len(estimators) > 1 else "") + " ".join(f"{k}={v:.4g}" for k, v in row.items()))
            if np.isfinite(val_loss) and val_loss < best[i][0]:
                best[i] = (val_loss, stack.state_dict(i), epoch)
    for i, est in enumerate(estimators):
        _, state, est.best_epoch_ = best[i]
        est.module_ = est._module(state if state is not None else stack.state_dict(i)).cpu()
    return given
