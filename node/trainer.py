"""Local training for one node: minibatch steps, evaluation, gradients, flat parameter views.

A :class:`Trainer` wraps any ``torch.nn.Module`` with a training loader (cycled forever), a
test loader, a loss and a pluggable optimizer. Mixing rules drive it through a few calls:
``train_steps(k)`` for local SGD, ``sam_steps(k, rho)`` for sharpness-aware local steps,
``gradient()`` for methods that need a gradient without a step (e.g. DADAO, SAM),
``parameters_vector()``/``load_vector()`` and ``state()`` to read and write the model.

What it must not do: know anything about networking, peers or the event loop; touch the
global RNG or the global thread count (``torch.set_num_threads``) -- in a real node its
methods run in a worker thread while the event loop owns the process; copy the model
behind the caller's back (``state()`` returns live references).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rumor.algorithms.sam import sam_step
from rumor.node.optim import SGD

__all__ = ["LOSSES", "OPTIMIZERS", "Trainer"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
Batch = tuple[torch.Tensor, torch.Tensor]

#: Rows per chunk when ``gradient("full")`` walks the local data in order.
FULL_BATCH_ROWS = 4096


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y.reshape(out.shape).to(out.dtype))


def _half_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * F.mse_loss(out, y.reshape(out.shape).to(out.dtype))


def _bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out, y.reshape(out.shape).to(out.dtype))


#: Built-in losses, all means over the batch:
#: ``cross_entropy`` (int64 class labels); ``mse`` = mean (out - y)^2; ``half_mse`` = mse / 2,
#: which is exactly ``1/(2n) ||X w - y||^2`` for a linear model; ``bce`` = logistic loss on a
#: single logit with {0, 1} labels, ``mean log(1 + exp(-b out))`` with ``b = 2y - 1``.
LOSSES: dict[str, LossFn] = {
    "cross_entropy": _cross_entropy,
    "mse": _mse,
    "half_mse": _half_mse,
    "bce": _bce,
}


def _correct(loss: str, out: torch.Tensor, y: torch.Tensor) -> int | None:
    """Number of correct predictions in a batch, or None when accuracy has no meaning."""
    if loss == "bce":
        return int(((out.reshape(-1) > 0).long() == y.reshape(-1).long()).sum())
    if loss in ("mse", "half_mse"):
        return None
    # cross_entropy, or a custom loss that looks like classification
    if out.ndim == 2 and out.shape[1] > 1 and not y.is_floating_point() and y.ndim == 1:
        return int((out.argmax(dim=1) == y).sum())
    return None


#: Built-in optimizers by name; ``momentum`` is ignored by the Adam family.
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    # rumor's own SGD: same updates as torch.optim.SGD, without the ~73 MiB of modules the
    # first torch.optim call imports (rumor.node.optim).
    "sgd": lambda p, lr, m, wd: SGD(p, lr=lr, momentum=m, weight_decay=wd),
    "adam": lambda p, lr, m, wd: torch.optim.Adam(p, lr=lr, weight_decay=wd),
    "adamw": lambda p, lr, m, wd: torch.optim.AdamW(p, lr=lr, weight_decay=wd),
}


class Trainer:
    """Local training of ``model`` on ``train_loader``, evaluation on ``test_loader``.

    ``train_loader`` and ``test_loader`` are re-iterable sources of ``(x, y)`` batches: a
    :class:`torch.utils.data.DataLoader` or a :class:`~rumor.node.data.TensorBatches`.
    ``test_loader`` may be None, in which case :meth:`evaluate` needs an explicit loader.

    ``loss`` is a name from :data:`LOSSES` or a callable ``(output, target) -> scalar`` (a
    mean over the batch). ``optimizer`` is a name from :data:`OPTIMIZERS` (built with
    ``lr``, ``momentum``, ``weight_decay``) or a callable that takes the list of trainable
    parameters and returns a ``torch.optim.Optimizer`` (then ``lr``, ``momentum`` and
    ``weight_decay`` are not used). With SGD, ``weight_decay=l2`` adds ``l2/2 ||w||^2`` to the
    objective, matching the ridge term of the synthetic datasets.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable[Any],
        test_loader: Iterable[Any] | None,
        loss: str | LossFn = "cross_entropy",
        optimizer: str | OptimizerFactory = "sgd",
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        self.model = model
        self.train_loader = train_loader
        self.test_loader = test_loader
        if callable(loss):
            self.loss_name, self.loss_fn = getattr(loss, "__name__", "custom"), loss
        elif loss in LOSSES:
            self.loss_name, self.loss_fn = loss, LOSSES[loss]
        else:
            raise ValueError(
                f"unknown loss {loss!r}; expected one of {sorted(LOSSES)} or a callable"
            )
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        if callable(optimizer):
            opt = optimizer(params)
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(
                    f"the optimizer factory returned {type(opt).__name__}, not a "
                    "torch.optim.Optimizer"
                )
        elif optimizer in OPTIMIZERS:
            opt = OPTIMIZERS[optimizer](params, lr, momentum, weight_decay)
        else:
            raise ValueError(
                f"unknown optimizer {optimizer!r}; expected one of {sorted(OPTIMIZERS)} "
                "or a callable params -> torch.optim.Optimizer"
            )
        self.optimizer: torch.optim.Optimizer = opt
        self.device = params[0].device
        #: Local minibatch steps taken, and full passes over the training loader completed.
        self.steps = 0
        self.epochs = 0
        self._batches: Iterator[Any] | None = None
        self._samples: int | None = None

    # --- data ----------------------------------------------------------------------------
    def _to_device(self, batch: Any) -> Batch:
        x, y = batch[0], batch[1]
        if x.device != self.device:
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def _next_batch(self) -> Batch:
        """The next training batch, starting a new pass when the loader is exhausted."""
        if self._batches is None:
            self._batches = iter(self.train_loader)
        try:
            return self._to_device(next(self._batches))
        except StopIteration:
            self.epochs += 1
            self._batches = iter(self.train_loader)
            try:
                return self._to_device(next(self._batches))
            except StopIteration:
                raise RuntimeError("the training loader yields no batches") from None

    def _full_batches(self) -> Iterator[Batch]:
        """The whole local training set once, in order when the loader allows it."""
        tensors = getattr(self.train_loader, "tensors", None)
        if tensors is not None:
            x, y = tensors
            for i in range(0, len(x), FULL_BATCH_ROWS):
                yield self._to_device((x[i : i + FULL_BATCH_ROWS], y[i : i + FULL_BATCH_ROWS]))
        else:
            for batch in self.train_loader:
                yield self._to_device(batch)

    @property
    def samples(self) -> int:
        """Size of the local training set."""
        if self._samples is None:
            loader = self.train_loader
            if isinstance(getattr(loader, "samples", None), int):
                self._samples = loader.samples  # type: ignore[attr-defined]
            elif hasattr(loader, "dataset") and hasattr(loader.dataset, "__len__"):
                self._samples = len(loader.dataset)  # type: ignore[attr-defined]
            else:
                self._samples = sum(len(batch[0]) for batch in loader)
        return self._samples

    # --- training ------------------------------------------------------------------------
    def train_steps(self, k: int) -> float:
        """Take ``k`` optimizer steps on consecutive minibatches; return their mean loss.

        The training loader is cycled forever: a pass that runs out mid-call continues with
        a fresh pass (freshly shuffled, for shuffling loaders).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        model, opt = self.model, self.optimizer
        model.train()
        total = torch.zeros((), dtype=torch.float64)
        for _ in range(k):
            x, y = self._next_batch()
            opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(model(x), y)
            loss.backward()
            opt.step()
            total += loss.detach().double().cpu()
        self.steps += k
        return float(total) / k

    def sam_steps(self, k: int, rho: float) -> float:
        """Take ``k`` sharpness-aware (SAM) steps on consecutive minibatches; return the mean
        loss at the unperturbed weights.

        Each step takes a second gradient on the same minibatch at the weights moved by
        ``rho * g / ||g||`` and lets the optimizer step from the restored weights with it
        (:func:`rumor.algorithms.sam.sam_step`). ``rho = 0`` is exactly
        :meth:`train_steps`. Batches come from the same stream as :meth:`train_steps`.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        model, opt = self.model, self.optimizer
        model.train()
        total = torch.zeros((), dtype=torch.float64)
        for _ in range(k):
            loss = sam_step(model, self.loss_fn, opt, self._next_batch(), rho)
            total += loss.double().cpu()
        self.steps += k
        return float(total) / k

    @property
    def lr(self) -> float:
        """The learning rate of the first parameter group."""
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group (for schedules)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def evaluate(self, loader: Iterable[Any] | None = None) -> dict[str, Any]:
        """Mean loss, accuracy (None for regression) and sample count on ``loader``
        (default: the test loader). The model's train/eval mode is restored afterwards."""
        loader = loader if loader is not None else self.test_loader
        if loader is None:
            raise ValueError("no test loader: pass one to Trainer or to evaluate()")
        model = self.model
        was_training = model.training
        model.eval()
        loss_sum, correct, n = 0.0, 0, 0
        has_accuracy = True
        try:
            for batch in loader:
                x, y = self._to_device(batch)
                out = model(x)
                b = len(x)
                loss_sum += float(self.loss_fn(out, y)) * b
                c = _correct(self.loss_name, out, y)
                if c is None:
                    has_accuracy = False
                else:
                    correct += c
                n += b
        finally:
            model.train(was_training)
        return {
            "loss": loss_sum / n if n else math.nan,
            "accuracy": correct / n if n and has_accuracy else None,
            "samples": n,
        }

    # --- gradients -----------------------------------------------------------------------
    def gradient(self, batch: Batch | str | None = None) -> dict[str, torch.Tensor]:
        """Gradient of the loss with respect to each trainable parameter, without a step.

        ``batch`` is ``None`` (the next training minibatch, which advances the training
        stream like a step would), an explicit ``(x, y)`` pair, or ``"full"``: the mean loss
        over the whole local training set (chunks of :data:`FULL_BATCH_ROWS` rows, weighted
        by size). The forward pass runs in training mode, as in :meth:`train_steps`, but
        buffers (BatchNorm running statistics) are restored afterwards and ``.grad`` fields
        and the optimizer are left untouched. Returns new tensors keyed like
        ``named_parameters()``.
        """
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        if isinstance(batch, str):
            if batch != "full":
                raise ValueError(f"batch must be None, (x, y) or 'full', got {batch!r}")
            batches: Iterable[Batch] = self._full_batches()
            total = self.samples
        else:
            one = self._next_batch() if batch is None else self._to_device(batch)
            batches, total = [one], len(one[0])
        model = self.model
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        was_training = model.training
        model.train()
        grads = [torch.zeros_like(p) for p in params]
        seen = 0
        try:
            for x, y in batches:
                weight = len(x) / total
                loss = self.loss_fn(model(x), y) * weight
                parts = torch.autograd.grad(loss, params, allow_unused=True)
                for acc, g in zip(grads, parts, strict=True):
                    if g is not None:
                        acc += g
                seen += len(x)
        finally:
            model.train(was_training)
            with torch.no_grad():
                for buf, saved in buffers:
                    buf.copy_(saved)
        if seen != total:
            raise RuntimeError(f"gradient('full') saw {seen} samples, expected {total}")
        return {name: g for (name, _), g in zip(named, grads, strict=True)}

    # --- parameters ----------------------------------------------------------------------
    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def parameters_vector(self) -> torch.Tensor:
        """A flat copy of the trainable parameters (buffers excluded), in ``parameters()``
        order."""
        return torch.cat([p.detach().reshape(-1) for p in self._trainable()])

    @torch.no_grad()
    def load_vector(self, vector: torch.Tensor) -> None:
        """Copy a flat vector (as from :meth:`parameters_vector`) into the parameters, in
        place: parameter tensors keep their identity, and never alias ``vector``."""
        params = self._trainable()
        numel = sum(p.numel() for p in params)
        if vector.ndim != 1 or vector.numel() != numel:
            raise ValueError(f"expected a flat vector of {numel} values, got {tuple(vector.shape)}")
        offset = 0
        for p in params:
            p.copy_(vector[offset : offset + p.numel()].reshape(p.shape))
            offset += p.numel()

    def state(self) -> dict[str, torch.Tensor]:
        """The model's ``state_dict()``: parameters and buffers, as references sharing
        storage with the live model (not copies)."""
        return self.model.state_dict()

    def __repr__(self) -> str:
        return (
            f"Trainer({type(self.model).__name__}, loss={self.loss_name!r}, "
            f"optimizer={type(self.optimizer).__name__}, steps={self.steps})"
        )
