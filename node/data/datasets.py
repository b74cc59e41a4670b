"""Datasets a node can train on: bundled digits, synthetic convex problems, users' files.

Every loader returns a :class:`Dataset` of CPU tensors (features float32, one row per sample)
with a train and a held-out test split, the number of classes (``None`` for regression) and
an ``info`` dict of facts about the problem (for the synthetic ones: the exact optimum and
the smoothness / strong-convexity constants, so benchmarks can measure suboptimality).

What this module must not do:

* download anything (nodes run without network access);
* import scikit-learn, scipy or anything else heavy: a node process has a tight memory
  budget, so the bundled digits are read straight from scikit-learn's data file;
* touch global random state: every random choice comes from a generator seeded by the
  caller.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "Dataset",
    "digits",
    "get_dataset",
    "load_csv",
    "load_npz",
    "logistic_newton",
    "synthetic_least_squares",
    "synthetic_logistic",
]

Task = Literal["auto", "classification", "regression"]


@dataclass
class Dataset:
    """A train/test pair of tensors.

    ``x_*`` are float32 of shape ``(n, features)``. For classification ``y_*`` are int64 class
    indices in ``[0, num_classes)``; for regression (``num_classes is None``) they are float32
    of shape ``(n, 1)``.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int | None
    name: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def in_features(self) -> int:
        return int(self.x_train.shape[1])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={tuple(self.x_train.shape)}, "
            f"test={tuple(self.x_test.shape)}, num_classes={self.num_classes})"
        )


# --- splitting ---------------------------------------------------------------------------


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def _split_indices(
    n: int, test_fraction: float, seed: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test index split; stratified by ``labels`` when given.

    Stratified: each class contributes ``round(test_fraction * count)`` items to the test set
    (at least one item stays in train), so class proportions match in both splits.
    """
    _check_fraction(test_fraction)
    if n < 2:
        raise ValueError(f"need at least 2 samples to split into train and test, got {n}")
    rng = np.random.default_rng(seed)
    if labels is None:
        perm = rng.permutation(n)
        n_test = min(max(1, round(test_fraction * n)), n - 1)
        return np.sort(perm[n_test:]), np.sort(perm[:n_test])
    test_parts = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = min(round(test_fraction * len(members)), len(members) - 1)
        test_parts.append(members[:k])
    test = np.sort(np.concatenate(test_parts)) if test_parts else np.empty(0, np.int64)
    if len(test) == 0:
        # Every class too small to stratify: fall back to a plain random split.
        return _split_indices(n, test_fraction, seed)
    mask = np.ones(n, dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask), test


# --- digits ------------------------------------------------------------------------------


def _sklearn_data_file(name: str) -> Path:
    """Path of a data file bundled with scikit-learn, found without importing it."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ModuleNotFoundError(
            "the 'digits' dataset is read from scikit-learn's bundled data, but scikit-learn "
            "is not installed (pip install scikit-learn)"
        )
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [os.path.dirname(spec.origin)]
    for root in roots:
        path = Path(root) / "datasets" / "data" / name
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"scikit-learn is installed at {roots} but its bundled data file datasets/data/{name} "
        "is missing"
    )


def digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """The UCI optical handwritten digits as bundled by scikit-learn (Alpaydin & Kaynak, 1998).

    1797 grey-scale 8x8 images of the digits 0-9, as 64 features scaled from 0..16 to [0, 1],
    split train/test stratified by class with a seeded permutation. Read from
    ``sklearn/datasets/data/digits.csv.gz`` (one comma-separated row per image: 64 pixel
    values, then the label) without importing scikit-learn.
    """
    path = _sklearn_data_file("digits.csv.gz")
    with gzip.open(path, "rt") as fh:
        raw = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    if raw.ndim != 2 or raw.shape[1] != 65:
        raise ValueError(f"{path}: expected rows of 64 pixels and a label, got shape {raw.shape}")
    x = raw[:, :64] / 16.0
    y = raw[:, 64].astype(np.int64)
    train, test = _split_indices(len(y), test_fraction, seed, labels=y)
    return Dataset(
        x_train=torch.from_numpy(np.ascontiguousarray(x[train])),
        y_train=torch.from_numpy(y[train]),
        x_test=torch.from_numpy(np.ascontiguousarray(x[test])),
        y_test=torch.from_numpy(y[test]),
        num_classes=10,
        name="digits",
        info={"source": str(path), "image_shape": (1, 8, 8), "seed": seed},
    )


# --- synthetic convex problems -----------------------------------------------------------


def _conditioned_design(
    n: int, dim: int, condition_number: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``X`` (n x dim) with ``X^T X / n`` having eigenvalues log-spaced in [1/cond, 1].

    Built as ``X = sqrt(n) U diag(sqrt(lam)) V^T`` with orthonormal ``U`` (n x dim) and
    orthogonal ``V``, so the spectrum is exact up to float32 rounding. Returns ``X``, the
    eigenvalues and ``V`` (to draw test rows with the same second moment).
    """
    if dim < 1 or n < dim:
        raise ValueError(f"need n_samples >= dim >= 1 for a full-rank design, got n={n}, dim={dim}")
    if not condition_number >= 1.0 or not math.isfinite(condition_number):
        raise ValueError(f"condition_number must be a finite number >= 1, got {condition_number}")
    lam = np.geomspace(1.0, 1.0 / condition_number, dim) if dim > 1 else np.ones(1)
    u, _ = np.linalg.qr(rng.standard_normal((n, dim)))
    v, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    x = math.sqrt(n) * (u * np.sqrt(lam)) @ v.T
    return x, lam, v


def _test_rows(n_test: int, lam: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian rows whose second moment is ``V diag(lam) V^T``, like the training rows."""
    return (rng.standard_normal((n_test, len(lam))) * np.sqrt(lam)) @ v.T


def synthetic_least_squares(
    n_samples: int,
    dim: int,
    condition_number: float,
    noise: float = 0.0,
    seed: int = 0,
    l2: float = 0.0,
    n_test: int | None = None,
) -> Dataset:
    """A least-squares problem whose Hessian has a chosen condition number.

    The training objective is, for ``X`` = ``x_train`` (n x d) and ``y`` = ``y_train``::

        f(w) = 1/(2n) ||X w - y||^2 + l2/2 ||w||^2

    with Hessian ``X^T X / n + l2 I``. The eigenvalues of ``X^T X / n`` are log-spaced in
    ``[1/condition_number, 1]``, so with ``l2 = 0`` the condition number is exactly the one
    asked for (up to float32 rounding of ``X``). Targets are ``y = X w_true + noise * N(0, 1)``
    with ``w_true ~ N(0, I/d)``.

    ``info`` holds, all computed in float64 from the float32 tensors actually returned:
    ``x_star`` (the minimiser of ``f``, by ``numpy.linalg.lstsq`` on the ridge-augmented
    system), ``f_star``, ``L`` and ``mu`` (largest and smallest eigenvalue of the Hessian,
    ``l2`` included), ``condition_number`` (``L / mu``), ``w_true`` and ``l2``.

    To train exactly ``f`` with :class:`~rumor.node.trainer.Trainer`, use the model
    ``"linear:nobias"``, ``loss="half_mse"`` and ``weight_decay=l2``; the default ``"mse"``
    loss is ``2 f`` without the ridge term (same minimiser when ``l2 = 0``, twice the
    gradient).

    The test set (``n_test`` rows, default ``n_samples // 4``) is drawn from a Gaussian with
    the same second moment as the training rows and the same planted model and noise.
    """
    if noise < 0 or l2 < 0:
        raise ValueError(f"noise and l2 must be >= 0, got noise={noise}, l2={l2}")
    rng = np.random.default_rng(seed)
    x, lam, v = _conditioned_design(n_samples, dim, condition_number, rng)
    w_true = rng.standard_normal(dim) / math.sqrt(dim)
    y = x @ w_true + noise * rng.standard_normal(n_samples)
    n_test = max(1, n_samples // 4) if n_test is None else n_test
    if n_test < 1:
        raise ValueError(f"n_test must be >= 1, got {n_test}")
    xt = _test_rows(n_test, lam, v, rng)
    yt = xt @ w_true + noise * rng.standard_normal(n_test)

    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    x64, y64 = x32.astype(np.float64), y32.astype(np.float64)
    n = n_samples
    # 1/(2n)||Xw - y||^2 + l2/2||w||^2 = 1/2 ||[X/sqrt(n); sqrt(l2) I] w - [y/sqrt(n); 0]||^2
    a, b = x64 / math.sqrt(n), y64 / math.sqrt(n)
    if l2 > 0:
        a = np.vstack([a, math.sqrt(l2) * np.eye(dim)])
        b = np.concatenate([b, np.zeros(dim)])
    x_star, *_ = np.linalg.lstsq(a, b, rcond=None)
    eig = np.linalg.eigvalsh(x64.T @ x64 / n) + l2
    resid = x64 @ x_star - y64
    f_star = float(resid @ resid / (2 * n) + l2 / 2 * x_star @ x_star)
    return Dataset(
        x_train=torch.from_numpy(x32),
        y_train=torch.from_numpy(y32).reshape(-1, 1),
        x_test=torch.from_numpy(xt.astype(np.float32)),
        y_test=torch.from_numpy(yt.astype(np.float32)).reshape(-1, 1),
        num_classes=None,
        name=f"lsq:{n_samples}:{dim}:{condition_number:g}",
        info={
            "objective": "f(w) = 1/(2n) ||X w - y||^2 + l2/2 ||w||^2",
            "x_star": x_star,
            "f_star": f_star,
            "L": float(eig[-1]),
            "mu": float(eig[0]),
            "condition_number": float(eig[-1] / eig[0]),
            "w_true": w_true,
            "l2": float(l2),
            "noise": float(noise),
            "seed": seed,
        },
    )


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def _logistic_value(a: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float) -> float:
    z = a @ w
    # log(1 + exp(z)) - y z, stably
    return float(np.mean(np.logaddexp(0.0, z) - y * z) + l2 / 2 * w @ w)


def logistic_newton(
    a: np.ndarray,
    y: np.ndarray,
    l2: float,
    tol: float = 1e-12,
    max_iter: int = 100,
) -> tuple[np.ndarray, int]:
    """Minimise ``1/n sum_i [log(1 + exp(a_i.w)) - y_i a_i.w] + l2/2 ||w||^2`` in float64.

    Damped Newton's method (Nocedal & Wright, "Numerical Optimization", 2006, Alg. 3.1 with
    Armijo backtracking) from ``w = 0``, stopped when the gradient's Euclidean norm is below
    ``tol``. Labels ``y`` are in {0, 1}. Returns the minimiser and the iteration count;
    raises :class:`RuntimeError` when it does not converge (e.g. separable data and
    ``l2 = 0``, where no minimiser exists).
    """
    a = np.asarray(a, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = a.shape
    w = np.zeros(d)
    f = _logistic_value(a, y, w, l2)
    for it in range(max_iter):
        p = _sigmoid(a @ w)
        g = a.T @ (p - y) / n + l2 * w
        if np.linalg.norm(g) < tol:
            return w, it
        h = (a.T * (p * (1 - p))) @ a / n + l2 * np.eye(d)
        try:
            step = np.linalg.solve(h, -g)
        except np.linalg.LinAlgError as exc:
            raise RuntimeError(f"Newton's method: singular Hessian at iteration {it}") from exc
        t, slope = 1.0, float(g @ step)
        while True:
            w_new = w + t * step
            f_new = _logistic_value(a, y, w_new, l2)
            # Near the optimum f stops changing in float64; accept the full step then.
            if f_new <= f + 1e-4 * t * slope or t < 1e-10 or abs(f_new - f) <= 1e-15 * abs(f):
                break
            t *= 0.5
        w, f = w_new, f_new
    p = _sigmoid(a @ w)
    gnorm = float(np.linalg.norm(a.T @ (p - y) / n + l2 * w))
    if gnorm < tol:
        return w, max_iter
    raise RuntimeError(
        f"Newton's method did not reach gradient norm {tol:g} in {max_iter} iterations "
        f"(last {gnorm:.3g}); with l2 = 0 the data may be separable"
    )


def synthetic_logistic(
    n_samples: int,
    dim: int,
    condition_number: float,
    l2: float,
    seed: int = 0,
    n_test: int | None = None,
) -> Dataset:
    """Binary logistic regression with a planted model and a chosen feature conditioning.

    Features ``X`` are built like :func:`synthetic_least_squares` (``X^T X / n`` has
    eigenvalues log-spaced in ``[1/condition_number, 1]``); labels are
    ``y_i ~ Bernoulli(sigmoid(x_i . w_true))`` with ``w_true ~ N(0, 4 I / d)`` (so the classes
    are learnable but noisy). Labels are int64 in {0, 1} and ``num_classes = 2``.

    The objective, with ``b_i = 2 y_i - 1`` in {-1, +1}::

        f(w) = 1/n sum_i log(1 + exp(-b_i x_i . w)) + l2/2 ||w||^2

    ``info["x_star"]`` is its minimiser from :func:`logistic_newton` (float64, gradient norm
    below 1e-12). Bounds on the Hessian over all ``w``: ``L = lambda_max(X^T X / n) / 4 + l2``
    and ``mu = l2`` (the logistic loss alone is not strongly convex globally);
    ``L_local`` / ``mu_local`` are the extreme Hessian eigenvalues at ``x_star``.

    To train exactly ``f`` with :class:`~rumor.node.trainer.Trainer`, use the model
    ``"linear:nobias"`` (one logit), ``loss="bce"`` and ``weight_decay=l2``. The default
    ``"cross_entropy"`` with a two-output model also learns the task, in an
    over-parameterised form with a different optimum.
    """
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    rng = np.random.default_rng(seed)
    x, lam, v = _conditioned_design(n_samples, dim, condition_number, rng)
    w_true = 2.0 * rng.standard_normal(dim) / math.sqrt(dim)
    y = (rng.random(n_samples) < _sigmoid(x @ w_true)).astype(np.int64)
    n_test = max(1, n_samples // 4) if n_test is None else n_test
    if n_test < 1:
        raise ValueError(f"n_test must be >= 1, got {n_test}")
    xt = _test_rows(n_test, lam, v, rng)
    yt = (rng.random(n_test) < _sigmoid(xt @ w_true)).astype(np.int64)

    x32 = x.astype(np.float32)
    x64 = x32.astype(np.float64)
    x_star, iters = logistic_newton(x64, y, l2)
    n = n_samples
    lam_max = float(np.linalg.eigvalsh(x64.T @ x64 / n)[-1])
    p = _sigmoid(x64 @ x_star)
    local = np.linalg.eigvalsh((x64.T * (p * (1 - p))) @ x64 / n) + l2
    return Dataset(
        x_train=torch.from_numpy(x32),
        y_train=torch.from_numpy(y),
        x_test=torch.from_numpy(xt.astype(np.float32)),
        y_test=torch.from_numpy(yt),
        num_classes=2,
        name=f"logistic:{n_samples}:{dim}:{condition_number:g}",
        info={
            "objective": "f(w) = 1/n sum_i log(1 + exp(-b_i x_i.w)) + l2/2 ||w||^2, b = 2y - 1",
            "x_star": x_star,
            "f_star": _logistic_value(x64, y.astype(np.float64), x_star, l2),
            "L": lam_max / 4 + l2,
            "mu": float(l2),
            "L_local": float(local[-1]),
            "mu_local": float(local[0]),
            "newton_iterations": iters,
            "w_true": w_true,
            "l2": float(l2),
            "seed": seed,
        },
    )


# --- users' files ------------------------------------------------------------------------


def _labels_and_task(y: np.ndarray, task: Task, source: str) -> tuple[np.ndarray, int | None, dict]:
    """Validate labels; classification labels are remapped to 0..K-1."""
    if task not in ("auto", "classification", "regression"):
        raise ValueError(f"task must be 'auto', 'classification' or 'regression', got {task!r}")
    if y.dtype.kind not in "biuf":
        raise TypeError(f"{source}: labels must be numeric, got dtype {y.dtype}")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        raise ValueError(f"{source}: labels contain NaN or infinity")
    y = y.reshape(-1)
    integral = y.dtype.kind in "biu" or bool(np.all(y == np.round(y)))
    if task == "auto":
        task = "classification" if integral else "regression"
    if task == "regression":
        return y.astype(np.float32).reshape(-1, 1), None, {"task": "regression"}
    if not integral:
        raise ValueError(f"{source}: classification labels must be integers")
    classes, mapped = np.unique(y, return_inverse=True)
    info = {"task": "classification", "classes": classes.tolist()}
    return mapped.astype(np.int64).reshape(-1), len(classes), info


def _features(x: np.ndarray, source: str) -> tuple[np.ndarray, tuple[int, ...]]:
    if x.dtype.kind not in "biuf":
        raise TypeError(f"{source}: features must be numeric, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{source}: no samples (features have shape {x.shape})")
    shape = tuple(int(s) for s in x.shape[1:])
    x = x.reshape(x.shape[0], -1).astype(np.float32)
    if x.shape[1] == 0:
        raise ValueError(f"{source}: samples have no features (shape {shape})")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{source}: features contain NaN or infinity")
    return x, shape


def _from_arrays(
    x: np.ndarray,
    y: np.ndarray,
    name: str,
    source: str,
    test_fraction: float,
    seed: int,
    task: Task,
    test: tuple[np.ndarray, np.ndarray] | None = None,
) -> Dataset:
    x, shape = _features(x, source)
    if len(y) != len(x):
        raise ValueError(f"{source}: {len(x)} feature rows but {len(y)} labels")
    if test is not None:
        xt, shape_t = _features(test[0], source + " (test)")
        if shape_t != shape:
            raise ValueError(f"{source}: test features have shape {shape_t}, train {shape}")
        if len(test[1]) != len(xt):
            raise ValueError(f"{source}: {len(xt)} test feature rows but {len(test[1])} labels")
        y_all, num_classes, info = _labels_and_task(np.concatenate([y, test[1]]), task, source)
        y_tr, y_te = y_all[: len(x)], y_all[len(x) :]
        x_tr, x_te = x, xt
    else:
        y_all, num_classes, info = _labels_and_task(y, task, source)
        strat = y_all if num_classes is not None else None
        tr, te = _split_indices(len(x), test_fraction, seed, labels=strat)
        x_tr, x_te, y_tr, y_te = x[tr], x[te], y_all[tr], y_all[te]
    info.update(source=source, feature_shape=shape, seed=seed)
    return Dataset(
        x_train=torch.from_numpy(np.ascontiguousarray(x_tr)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_te)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_te)),
        num_classes=num_classes,
        name=name,
        info=info,
    )


def load_npz(
    path: str | os.PathLike[str],
    x_key: str = "x",
    y_key: str = "y",
    test_fraction: float = 0.25,
    seed: int = 0,
    task: Task = "auto",
) -> Dataset:
    """Load a dataset from a NumPy ``.npz`` file.

    ``x_key`` holds the features, ``(n, ...)`` numeric (flattened to ``(n, features)``; the
    original per-sample shape is kept in ``info["feature_shape"]``); ``y_key`` holds ``n``
    labels. If the file also holds ``{x_key}_test`` and ``{y_key}_test``, they are the test
    set; otherwise a seeded split (stratified for classification) holds out
    ``test_fraction``. ``task="auto"`` treats integer-valued labels as classes (remapped to
    ``0..K-1``, originals in ``info["classes"]``) and anything else as regression targets.
    Pickled object arrays are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such .npz file: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable .npz file: {exc}") from exc
    with archive:
        keys = set(archive.files)
        missing = [k for k in (x_key, y_key) if k not in keys]
        if missing:
            raise KeyError(f"{path}: missing array(s) {missing}; the file holds {sorted(keys)}")
        x, y = archive[x_key], archive[y_key]
        test = None
        if f"{x_key}_test" in keys and f"{y_key}_test" in keys:
            test = (archive[f"{x_key}_test"], archive[f"{y_key}_test"])
    if y.ndim > 1 and not (y.ndim == 2 and y.shape[1] == 1):
        raise ValueError(f"{path}: labels must have shape (n,) or (n, 1), got {y.shape}")
    if test is not None and test[1].ndim > 1 and test[1].shape[1:] != (1,):
        raise ValueError(f"{path}: test labels must have shape (n,) or (n, 1)")
    if test is not None:
        test = (test[0], test[1].reshape(-1))
    return _from_arrays(
        x, y.reshape(-1), f"npz:{path}", str(path), test_fraction, seed, task, test=test
    )


def load_csv(
    path: str | os.PathLike[str],
    label_column: int = -1,
    delimiter: str = ",",
    header: bool | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    task: Task = "auto",
) -> Dataset:
    """Load a dataset from a delimited text file of numbers, one sample per row.

    ``label_column`` (negative counts from the end) holds the label; all other columns are
    features. ``header=None`` skips the first row if and only if it is not all numbers.
    Labels are handled as in :func:`load_npz`. Errors name the offending line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such CSV file: {path}")
    rows: list[list[float]] = []
    width = None
    first = True
    with open(path, newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh, delimiter=delimiter), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            is_first, first = first, False
            try:
                values = [float(c) for c in row]
            except ValueError:
                if is_first and header is not False:
                    continue
                raise ValueError(f"{path}:{lineno}: non-numeric value in {row!r}") from None
            if is_first and header:
                continue
            if width is None:
                width = len(values)
            elif len(values) != width:
                raise ValueError(f"{path}:{lineno}: {len(values)} columns, expected {width}")
            rows.append(values)
    if not rows:
        raise ValueError(f"{path}: no data rows")
    data = np.asarray(rows, dtype=np.float64)
    ncol = data.shape[1]
    if ncol < 2:
        raise ValueError(f"{path}: need at least one feature column and a label column")
    if not -ncol <= label_column < ncol:
        raise ValueError(f"{path}: label_column {label_column} out of range for {ncol} columns")
    col = label_column % ncol
    y = data[:, col]
    x = np.delete(data, col, axis=1)
    return _from_arrays(x, y, f"csv:{path}", str(path), test_fraction, seed, task)


# --- specs -------------------------------------------------------------------------------


def _numbers(spec: str, parts: list[str], types: list[type], required: int) -> list[Any]:
    if not required <= len(parts) <= len(types):
        raise ValueError(f"dataset spec {spec!r}: expected {required}..{len(types)} fields")
    try:
        return [t(p) for t, p in zip(types, parts, strict=False)]
    except ValueError as exc:
        raise ValueError(f"dataset spec {spec!r}: {exc}") from None


def get_dataset(spec: str, seed: int = 0) -> Dataset:
    """Build a dataset from a spec string.

    * ``"digits"`` or ``"digits:<test_fraction>"``
    * ``"lsq:<n>:<dim>:<cond>[:<noise>[:<l2>]]"`` (:func:`synthetic_least_squares`)
    * ``"logistic:<n>:<dim>:<cond>[:<l2>]"`` (:func:`synthetic_logistic`, default l2 1e-3)
    * ``"npz:<path>"`` and ``"csv:<path>"`` (:func:`load_npz`, :func:`load_csv`; the path
      may contain colons)
    """
    kind, _, rest = spec.strip().partition(":")
    kind = kind.lower()
    if kind == "digits":
        frac = float(rest) if rest else 0.25
        return digits(test_fraction=frac, seed=seed)
    if kind in ("npz", "csv"):
        if not rest:
            raise ValueError(
                f"dataset spec {spec!r}: missing file path (e.g. '{kind}:data.{kind}')"
            )
        return load_npz(rest, seed=seed) if kind == "npz" else load_csv(rest, seed=seed)
    parts = rest.split(":") if rest else []
    if kind in ("lsq", "least_squares"):
        values = _numbers(spec, parts, [int, int, float, float, float], 3)
        n, d, cond, noise, l2 = values + [0.0, 0.0][len(values) - 3 :]
        return synthetic_least_squares(n, d, cond, noise=noise, seed=seed, l2=l2)
    if kind == "logistic":
        values = _numbers(spec, parts, [int, int, float, float], 3)
        n, d, cond, l2 = values + [1e-3][len(values) - 3 :]
        return synthetic_logistic(n, d, cond, l2, seed=seed)
    raise ValueError(
        f"unknown dataset spec {spec!r}; expected digits, lsq:n:dim:cond, "
        "logistic:n:dim:cond, npz:PATH or csv:PATH"
    )
