"""Datasets, partitions between nodes and per-node loaders (rumor.node.data)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rumor.node.data import (
    Dataset,
    TensorBatches,
    digits,
    dirichlet,
    get_dataset,
    iid,
    label_histogram,
    load_csv,
    load_npz,
    node_loaders,
    partition,
    shards,
    synthetic_least_squares,
    synthetic_logistic,
)
from rumor.node.data import datasets as datasets_module


@pytest.fixture(scope="module")
def dig() -> Dataset:
    return digits()


def assert_disjoint_cover(parts: list[np.ndarray], n: int, cover: bool = True) -> None:
    assert all(len(p) > 0 for p in parts)
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx), "an index is used twice"
    assert allidx.min() >= 0 and allidx.max() < n
    if cover:
        assert len(allidx) == n


def mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    hist = label_histogram(labels, parts).astype(float)
    p = hist / hist.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    return float(ent.mean())


# --- partitioners ------------------------------------------------------------------------


def test_iid_reproducible_disjoint_balanced() -> None:
    a, b = iid(1000, 7, seed=3), iid(1000, 7, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert_disjoint_cover(a, 1000)
    assert {len(p) for p in a} <= {142, 143}
    assert not all(np.array_equal(x, y) for x, y in zip(a, iid(1000, 7, seed=4), strict=True))
    assert all(p.dtype == np.int64 for p in a)


@settings(max_examples=40, deadline=None)
@given(
    n_nodes=st.integers(1, 20),
    extra=st.integers(0, 200),
    classes=st.integers(1, 6),
    seed=st.integers(0, 2**31),
)
def test_partitioners_disjoint_cover_property(
    n_nodes: int, extra: int, classes: int, seed: int
) -> None:
    n = 2 * n_nodes + extra
    labels = np.random.default_rng(seed).integers(0, classes, n)
    assert_disjoint_cover(iid(n, n_nodes, seed), n)
    assert_disjoint_cover(shards(labels, n_nodes, 2, seed), n)
    assert_disjoint_cover(dirichlet(labels, n_nodes, 10.0, seed, max_tries=10_000), n)


def test_dirichlet_reproducible_min_size_and_cover(dig: Dataset) -> None:
    y = dig.y_train
    a = dirichlet(y, 10, 0.5, seed=1, min_size=20)
    b = dirichlet(y.numpy(), 10, 0.5, seed=1, min_size=20)
    assert all(np.array_equal(x, z) for x, z in zip(a, b, strict=True))
    assert_disjoint_cover(a, len(y))
    assert min(len(p) for p in a) >= 20


def test_dirichlet_skew_grows_as_alpha_falls(dig: Dataset) -> None:
    y = dig.y_train.numpy()
    ent = {a: mean_label_entropy(y, dirichlet(y, 10, a, seed=0)) for a in (0.1, 1.0, 100.0)}
    assert ent[0.1] < ent[1.0] < ent[100.0]
    assert ent[100.0] > 0.95 * np.log(10)  # nearly uniform class mix at large alpha


def test_dirichlet_impossible_raises() -> None:
    labels = np.repeat(np.arange(2), 50)
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet(labels, 20, 1.0, seed=0, min_size=6)
    with pytest.raises(ValueError, match="larger alpha"):
        dirichlet(labels, 20, 0.001, seed=0, min_size=4, max_tries=20)
    with pytest.raises(ValueError, match="integer class labels"):
        dirichlet(np.linspace(0, 1, 100), 2, 1.0)


def test_shards_pathological_non_iid(dig: Dataset) -> None:
    y = dig.y_train.numpy()
    parts = shards(y, 10, 2, seed=0)
    assert_disjoint_cover(parts, len(y))
    again = shards(y, 10, 2, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    classes = (label_histogram(y, parts) > 0).sum(axis=1)
    assert classes.max() <= 4  # two shards, each straddling at most one class boundary
    assert classes.mean() < 3
    assert mean_label_entropy(y, parts) < mean_label_entropy(y, iid(len(y), 10, 0))
    with pytest.raises(ValueError):
        shards(y[:15], 10, 2)


def test_partition_specs(dig: Dataset) -> None:
    y = dig.y_train
    assert_disjoint_cover(partition("iid", y, 5, seed=0), len(y))
    d = partition("dirichlet:0.5", y, 5, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(d, dirichlet(y, 5, 0.5, seed=0), strict=True))
    assert min(len(p) for p in partition("dirichlet:0.3:30", y, 5, seed=0)) >= 30
    s = partition("shards:3", y, 4, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(s, shards(y, 4, 3, seed=2), strict=True))
    for bad in ("nope", "dirichlet", "dirichlet:x", "shards:a", "iid:3"):
        with pytest.raises(ValueError):
            partition(bad, y, 4, seed=0)


def test_label_histogram() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    hist = label_histogram(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])], num_classes=4)
    assert hist.tolist() == [[1, 1, 0, 0], [0, 1, 3, 0]]
    with pytest.raises(ValueError):
        label_histogram(labels, [np.arange(6)], num_classes=2)


# --- digits ------------------------------------------------------------------------------


def test_digits_shapes_range_and_split(dig: Dataset) -> None:
    assert dig.x_train.shape == (1347, 64) and dig.x_test.shape == (450, 64)
    assert dig.x_train.dtype == torch.float32 and dig.y_train.dtype == torch.int64
    assert dig.num_classes == 10 and dig.name == "digits"
    x = torch.cat([dig.x_train, dig.x_test])
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    y = torch.cat([dig.y_train, dig.y_test])
    assert len(y) == 1797 and set(y.tolist()) == set(range(10))
    # stratified: each class's test share is close to 25%
    share = torch.bincount(dig.y_test, minlength=10) / torch.bincount(y, minlength=10)
    assert torch.all((share - 0.25).abs() < 0.01)
    again = digits()
    assert torch.equal(again.x_train, dig.x_train) and torch.equal(again.y_test, dig.y_test)
    other = digits(seed=1)
    assert not torch.equal(other.y_train, dig.y_train)
    assert digits(test_fraction=0.5).x_test.shape[0] in range(895, 902)


def test_digits_matches_sklearn_pixels(dig: Dataset) -> None:
    # The first raw row of the bundled file is a 0 whose top row is 0 0 5 13 9 1 0 0.
    x = torch.cat([dig.x_train, dig.x_test]) * 16
    first = torch.tensor([0, 0, 5, 13, 9, 1, 0, 0], dtype=torch.float32)
    assert (x[:, :8] == first).all(dim=1).any()


def test_digits_without_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="scikit-learn is not installed"):
        digits()


def test_data_package_stays_light() -> None:
    code = (
        "import sys; from rumor.node.data import digits; import rumor.node.models, "
        "rumor.node.trainer; digits(); "
        "heavy = [m for m in ('sklearn', 'scipy', 'pandas') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- synthetic problems ------------------------------------------------------------------


@pytest.mark.parametrize("cond", [1.0, 300.0, 1e4])
def test_least_squares_optimum_and_conditioning(cond: float) -> None:
    d = synthetic_least_squares(1000, 20, cond, noise=0.1, seed=5)
    x = d.x_train.double().numpy()
    y = d.y_train.double().numpy().ravel()
    assert d.y_train.shape == (1000, 1) and d.y_train.dtype == torch.float32
    assert d.num_classes is None and d.x_test.shape == (250, 20)
    xs = d.info["x_star"]
    grad = x.T @ (x @ xs - y) / len(y)
    assert np.linalg.norm(grad) < 1e-8
    eig = np.linalg.eigvalsh(x.T @ x / len(y))
    assert d.info["L"] == pytest.approx(eig[-1]) and d.info["mu"] == pytest.approx(eig[0])
    assert d.info["condition_number"] == pytest.approx(cond, rel=0.01)
    r = x @ xs - y
    assert d.info["f_star"] == pytest.approx(r @ r / (2 * len(y)))


def test_least_squares_ridge_and_reproducible() -> None:
    d = synthetic_least_squares(300, 10, 100.0, noise=0.5, seed=1, l2=0.01)
    x, y = d.x_train.double().numpy(), d.y_train.double().numpy().ravel()
    xs = d.info["x_star"]
    assert np.linalg.norm(x.T @ (x @ xs - y) / 300 + 0.01 * xs) < 1e-8
    assert d.info["condition_number"] == pytest.approx((1 + 0.01) / (0.01 + 0.01), rel=0.01)
    assert d.info["mu"] == pytest.approx(0.02, rel=0.01)
    again = synthetic_least_squares(300, 10, 100.0, noise=0.5, seed=1, l2=0.01)
    assert torch.equal(again.x_train, d.x_train) and np.array_equal(again.info["x_star"], xs)
    with pytest.raises(ValueError):
        synthetic_least_squares(5, 10, 10.0)
    with pytest.raises(ValueError):
        synthetic_least_squares(50, 10, 0.5)


def test_logistic_optimum() -> None:
    d = synthetic_logistic(1000, 20, 100.0, l2=1e-3, seed=2)
    a, y = d.x_train.double().numpy(), d.y_train.double().numpy()
    assert d.num_classes == 2 and set(d.y_train.tolist()) == {0, 1}
    xs = d.info["x_star"]
    p = 1 / (1 + np.exp(-(a @ xs)))
    grad = a.T @ (p - y) / len(y) + 1e-3 * xs
    assert np.linalg.norm(grad) < 1e-8
    info = d.info
    assert info["L"] >= info["L_local"] >= info["mu_local"] >= info["mu"] == 1e-3
    # The planted model is recovered in direction.
    w = info["w_true"]
    assert xs @ w / (np.linalg.norm(xs) * np.linalg.norm(w)) > 0.8


# --- users' files ------------------------------------------------------------------------


def test_load_npz(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((40, 4, 4)).astype(np.float64)
    y = np.repeat(np.array([3, 5, 7, 9]), 10)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    d = load_npz(path, test_fraction=0.25, seed=0)
    assert d.x_train.shape == (32, 16) and d.x_train.dtype == torch.float32
    assert d.num_classes == 4 and d.info["classes"] == [3, 5, 7, 9]
    assert set(d.y_train.tolist()) == {0, 1, 2, 3} and d.info["feature_shape"] == (4, 4)
    assert torch.bincount(d.y_test).tolist() == [2, 2, 2, 2]  # stratified

    np.savez(tmp_path / "t.npz", x=x, y=y.astype(np.float64) + 0.5, x_test=x[:5], y_test=y[:5])
    r = load_npz(tmp_path / "t.npz")
    assert r.num_classes is None and r.y_train.shape == (40, 1) and r.x_test.shape == (5, 16)

    np.savez(tmp_path / "k.npz", features=x, labels=y)
    assert load_npz(tmp_path / "k.npz", x_key="features", y_key="labels").num_classes == 4
    with pytest.raises(KeyError, match="missing"):
        load_npz(tmp_path / "k.npz")
    np.savez(tmp_path / "bad.npz", x=x, y=y[:-1])
    with pytest.raises(ValueError, match="39 labels"):
        load_npz(tmp_path / "bad.npz")
    xn = x.copy()
    xn[0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=xn, y=y)
    with pytest.raises(ValueError, match="NaN"):
        load_npz(tmp_path / "nan.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([object()] * 40), y=y)
    with pytest.raises(ValueError, match=r"readable|pickle"):
        load_npz(tmp_path / "obj.npz")
    with pytest.raises(FileNotFoundError):
        load_npz(tmp_path / "missing.npz")


def test_load_csv(tmp_path) -> None:
    path = tmp_path / "d.csv"
    rows = ["label,a,b,c"] + [f"{i % 3},{i},{i * 0.5},{-i}" for i in range(30)]
    path.write_text("\n".join(rows) + "\n")
    d = load_csv(path, label_column=0, seed=1)
    assert d.num_classes == 3 and d.x_train.shape[1] == 3
    assert len(d.x_train) + len(d.x_test) == 30
    # the label is not among the features: feature b is always half of feature a
    x = torch.cat([d.x_train, d.x_test])
    assert torch.allclose(x[:, 1], x[:, 0] * 0.5)

    reg = tmp_path / "r.csv"
    reg.write_text("".join(f"{i},{i * 2.5 + 0.1}\n" for i in range(12)))
    r = load_csv(reg)
    assert r.num_classes is None and r.y_train.shape[1] == 1

    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n4,x,6\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: non-numeric"):
        load_csv(bad)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("1,2,3\n4,5\n")
    with pytest.raises(ValueError, match="2 columns, expected 3"):
        load_csv(ragged)
    with pytest.raises(ValueError, match="out of range"):
        load_csv(reg, label_column=5)


def test_get_dataset_specs(tmp_path) -> None:
    assert get_dataset("digits", seed=0).x_train.shape == (1347, 64)
    lsq = get_dataset("lsq:200:8:50", seed=3)
    assert lsq.info["condition_number"] == pytest.approx(50, rel=0.01)
    assert lsq.info["noise"] == 0.0 and lsq.info["l2"] == 0.0
    lsq2 = get_dataset("lsq:200:8:50:0.2:0.1", seed=3)
    assert lsq2.info["noise"] == 0.2 and lsq2.info["l2"] == 0.1
    lg = get_dataset("logistic:300:5:10", seed=0)
    assert lg.num_classes == 2 and lg.info["l2"] == 1e-3
    assert get_dataset("logistic:300:5:10:0.05").info["mu"] == 0.05
    np.savez(tmp_path / "a.npz", x=np.ones((8, 2)), y=np.arange(8) % 2)
    assert get_dataset(f"npz:{tmp_path / 'a.npz'}").num_classes == 2
    (tmp_path / "a.csv").write_text("1,2,0\n3,4,1\n5,6,0\n7,8,1\n")
    assert get_dataset(f"csv:{tmp_path / 'a.csv'}").in_features == 2
    for bad in ("mnist", "lsq:10", "lsq:a:b:c", "npz:"):
        with pytest.raises(ValueError):
            get_dataset(bad)


# --- loaders -----------------------------------------------------------------------------


def test_node_loaders(dig: Dataset) -> None:
    parts = partition("dirichlet:0.5", dig.y_train, 4, seed=0)
    train, test = node_loaders(dig, parts, 2, batch_size=32, seed=7)
    assert isinstance(train, TensorBatches) and train.samples == len(parts[2])
    assert len(train) == -(-len(parts[2]) // 32)

    def one_pass(loader: TensorBatches) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*loader, strict=True)
        return torch.cat(xs), torch.cat(ys)

    x1, y1 = one_pass(train)
    x2, _ = one_pass(train)
    # each pass is the node's shard exactly once, in a fresh order
    assert sorted(y1.tolist()) == sorted(dig.y_train[parts[2]].tolist())
    key = lambda x: sorted(map(tuple, x.tolist()))  # noqa: E731
    assert key(x1) == key(dig.x_train[parts[2]]) == key(x2)
    assert not torch.equal(x1, x2)
    # reproducible per (seed, node); different across nodes and seeds
    again, _ = node_loaders(dig, parts, 2, batch_size=32, seed=7)
    assert torch.equal(one_pass(again)[0], x1)
    other, _ = node_loaders(dig, parts, 2, batch_size=32, seed=8)
    assert not torch.equal(one_pass(other)[0], x1)
    # every node sees the same global test set
    _, test0 = node_loaders(dig, parts, 0, batch_size=8, seed=7)
    tx, ty = one_pass(test)
    assert torch.equal(tx, dig.x_test) and torch.equal(ty, dig.y_test)
    assert torch.equal(one_pass(test0)[0], tx)
    with pytest.raises(IndexError):
        node_loaders(dig, parts, 4, batch_size=8)


def test_dirichlet_splits_one_item_classes_over_every_node() -> None:
    """Floor cuts send a one-item class to the last node, always: labels made only of such
    classes could never give the first node anything. The multinomial draws that follow
    failed floor draws can."""
    labels = np.array([4, 3, 2, 1])
    parts = dirichlet(labels, 2, 10.0, seed=0, max_tries=50)
    assert_disjoint_cover(parts, 4)
    assert min(len(p) for p in parts) >= 1
