"""Model zoo for nodes: small MLPs, linear models, a tiny CNN for 8x8 digits, sized MLPs.

Every builder is deterministic in its ``seed`` and leaves the global torch RNG exactly as it
found it (initialisation runs inside :func:`torch.random.fork_rng`), so building a model in
a node or a test never changes what other code draws. Models take flat ``(batch,
in_features)`` float32 inputs, like every :class:`~rumor.node.data.Dataset`.

This module must not load data or know about training, gossip or networking.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

__all__ = ["build_model", "count_bytes", "mlp", "mlp_of_size"]


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with the CPU RNG seeded by ``seed``; the global RNG state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def count_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters (buffers excluded)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def mlp(in_features: int, hidden: Sequence[int], out_features: int) -> nn.Sequential:
    """``Linear -> ReLU`` for each hidden width, then a final ``Linear`` (unseeded)."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def _cnn_digits(num_classes: int) -> nn.Sequential:
    """Two 3x3 convolutions (16 and 32 channels; BatchNorm after the first), a 2x2 max-pool
    and a linear head: about 10k parameters for 1x8x8 inputs."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, num_classes),
    )


def _hidden_sizes(arg: str, spec: str) -> list[int]:
    if not arg:
        return [64]
    try:
        sizes = [int(s) for s in arg.lower().split("x")]
    except ValueError:
        raise ValueError(
            f"model {spec!r}: hidden sizes must look like '128' or '256x256'"
        ) from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"model {spec!r}: hidden sizes must be positive")
    return sizes


def build_model(spec: str, in_features: int, num_classes: int | None, seed: int = 0) -> nn.Module:
    """The model a spec string names, initialised from ``seed``.

    * ``"mlp"`` (one hidden layer of 64), ``"mlp:128"``, ``"mlp:256x256"``: ReLU MLPs with
      ``num_classes`` outputs, or one output for regression (``num_classes=None``).
    * ``"logreg"``: multinomial logistic regression, one linear layer with ``num_classes``
      outputs.
    * ``"linear"``: one linear layer with a single output (least squares; or binary
      logistic regression with the ``"bce"`` loss); ``"linear:nobias"`` drops the bias, to
      match the objectives of the synthetic datasets exactly.
    * ``"cnn-digits"``: a tiny CNN for 1x8x8 images given as 64 flat features; it has a
      ``BatchNorm2d``, so its state has buffers besides parameters.
    """
    kind, _, arg = spec.strip().partition(":")
    kind = kind.lower()
    if in_features < 1:
        raise ValueError(f"in_features must be >= 1, got {in_features}")
    if num_classes is not None and num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 or None (regression), got {num_classes}")
    out = num_classes if num_classes is not None else 1
    build: Callable[[], nn.Module]
    if kind == "mlp":
        hidden = _hidden_sizes(arg, spec)
        build = partial(mlp, in_features, hidden, out)
    elif kind == "logreg" and not arg:
        if num_classes is None:
            raise ValueError("model 'logreg' needs a classification dataset; use 'linear'")
        build = partial(nn.Linear, in_features, num_classes)
    elif kind == "linear" and arg in ("", "bias", "nobias"):
        build = partial(nn.Linear, in_features, 1, bias=arg != "nobias")
    elif kind == "cnn-digits" and not arg:
        if in_features != 64:
            raise ValueError(f"model 'cnn-digits' needs 64 (8x8) input features, got {in_features}")
        if num_classes is None:
            raise ValueError("model 'cnn-digits' needs a classification dataset")
        build = partial(_cnn_digits, num_classes)
    else:
        raise ValueError(
            f"unknown model spec {spec!r}; expected mlp[:H[xH...]], logreg, linear[:nobias] "
            "or cnn-digits"
        )
    return _seeded(seed, build)


def mlp_of_size(
    target_bytes: int,
    in_features: int,
    num_classes: int | None,
    seed: int = 0,
    hidden_layers: int = 2,
) -> nn.Sequential:
    """A ReLU MLP of ``hidden_layers`` equal widths whose float32 parameters total as close
    to ``target_bytes`` as an integer width allows.

    With width ``h``, ``k`` hidden layers, ``d`` inputs and ``c`` outputs the parameter
    count is ``(k-1) h^2 + (d + c + k) h + c``; the width is the nearest integer root.
    Meant for benchmarks of transfer and mixing cost (e.g. 1, 10 and 50 MB models).
    """
    if hidden_layers < 1:
        raise ValueError(f"hidden_layers must be >= 1, got {hidden_layers}")
    out = num_classes if num_classes is not None else 1
    target = target_bytes / 4  # float32 parameters

    def params(h: int) -> int:
        return (hidden_layers - 1) * h * h + (in_features + out + hidden_layers) * h + out

    a, b, c = hidden_layers - 1, in_features + out + hidden_layers, out - target
    root = -c / b if a == 0 else (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    candidates = {max(1, math.floor(root)), max(1, math.ceil(root))}
    width = min(candidates, key=lambda h: abs(params(h) - target))
    if params(width) > 2 * target:
        raise ValueError(
            f"target_bytes={target_bytes} is below the smallest such MLP "
            f"({4 * params(1)} bytes at width 1)"
        )
    return _seeded(seed, partial(mlp, in_features, [width] * hidden_layers, out))
