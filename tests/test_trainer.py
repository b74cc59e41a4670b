"""Models (rumor.node.models) and local training (rumor.node.trainer)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from rumor.node.data import (
    Dataset,
    digits,
    node_loaders,
    partition,
    synthetic_least_squares,
    synthetic_logistic,
)
from rumor.node.models import build_model, count_bytes, mlp_of_size
from rumor.node.trainer import Trainer

MB = 1 << 20


@pytest.fixture(scope="module")
def dig() -> Dataset:
    return digits()


def digits_trainer(dig: Dataset, spec: str = "mlp", **kwargs) -> Trainer:
    parts = partition("iid", dig.y_train, 1, seed=0)
    train, test = node_loaders(dig, parts, 0, batch_size=32, seed=0)
    return Trainer(build_model(spec, 64, 10, seed=0), train, test, **kwargs)


def full_trainer(ds: Dataset, spec: str, loss: str, **kwargs) -> Trainer:
    parts = [np.arange(len(ds.y_train))]
    train, test = node_loaders(ds, parts, 0, batch_size=len(ds.y_train), seed=0)
    nc = ds.num_classes if loss == "cross_entropy" else None
    return Trainer(build_model(spec, ds.in_features, nc, seed=0), train, test, loss=loss, **kwargs)


# --- models ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "classes", "out"),
    [
        ("mlp", 10, 10),
        ("mlp:128", 10, 10),
        ("mlp:256x32", 3, 3),
        ("mlp", None, 1),
        ("logreg", 10, 10),
        ("linear", None, 1),
        ("linear:nobias", None, 1),
        ("cnn-digits", 10, 10),
    ],
)
def test_build_model_shapes(spec: str, classes: int | None, out: int) -> None:
    model = build_model(spec, 64, classes, seed=0)
    assert model(torch.rand(5, 64)).shape == (5, out)


def test_model_details() -> None:
    hidden = [m.out_features for m in build_model("mlp:256x32", 64, 3, 0) if hasattr(m, "bias")]
    assert hidden == [256, 32, 3]
    assert build_model("mlp", 64, 10, 0)[0].out_features == 64
    assert build_model("linear:nobias", 8, None, 0).bias is None
    buffers = dict(build_model("cnn-digits", 64, 10, 0).named_buffers())
    assert any(k.endswith("running_mean") for k in buffers)
    for spec, classes in [("mlp:0", 10), ("cnn", 10), ("logreg", None), ("linear:x", None)]:
        with pytest.raises(ValueError):
            build_model(spec, 64, classes, 0)
    with pytest.raises(ValueError):
        build_model("cnn-digits", 32, 10, 0)


def test_seeded_init_reproducible_and_global_rng_untouched() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_model("cnn-digits", 64, 10, seed=4).state_dict()
    b = build_model("cnn-digits", 64, 10, seed=4).state_dict()
    c = build_model("cnn-digits", 64, 10, seed=5).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["1.weight"], c["1.weight"])
    m1, m2 = mlp_of_size(100_000, 64, 10, seed=1), mlp_of_size(100_000, 64, 10, seed=1)
    assert torch.equal(m1[0].weight, m2[0].weight)


@pytest.mark.parametrize("target", [1 * MB, 10 * MB, 50 * MB])
def test_mlp_of_size_close_to_target(target: int) -> None:
    model = mlp_of_size(target, 64, 10)
    assert abs(count_bytes(model) - target) / target < 0.05
    assert model(torch.rand(2, 64)).shape == (2, 10)


def test_mlp_of_size_variants() -> None:
    one = mlp_of_size(400_000, 784, None, hidden_layers=1)
    assert abs(count_bytes(one) - 400_000) / 400_000 < 0.05
    assert one(torch.rand(1, 784)).shape == (1, 1)
    with pytest.raises(ValueError):
        mlp_of_size(100, 64, 10)


# --- training ----------------------------------------------------------------------------


def test_mlp_learns_digits(dig: Dataset) -> None:
    trainer = digits_trainer(dig, lr=0.05, momentum=0.9)
    before = trainer.evaluate()
    first = trainer.train_steps(20)
    trainer.train_steps(160)
    last = trainer.train_steps(20)
    after = trainer.evaluate()
    assert last < first * 0.5
    assert after["loss"] < before["loss"] * 0.5
    assert after["accuracy"] > 0.85 and after["samples"] == 450
    assert trainer.steps == 200 and trainer.epochs >= 4  # 43 batches a pass: cycled
    assert trainer.samples == 1347


def test_cnn_with_adam_learns(dig: Dataset) -> None:
    trainer = digits_trainer(dig, "cnn-digits", optimizer="adam", lr=0.01)
    trainer.train_steps(60)
    assert trainer.evaluate()["accuracy"] > 0.85
    assert isinstance(trainer.optimizer, torch.optim.Adam)


def test_pluggable_optimizer(dig: Dataset) -> None:
    frozen = digits_trainer(dig, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    v0 = frozen.parameters_vector()
    frozen.train_steps(5)
    assert torch.equal(frozen.parameters_vector(), v0)

    made: list[torch.optim.Optimizer] = []

    def rmsprop(params):
        made.append(torch.optim.RMSprop(params, lr=0.003))
        return made[-1]

    trainer = digits_trainer(dig, optimizer=rmsprop)
    assert trainer.optimizer is made[0] and trainer.lr == 0.003
    first = trainer.train_steps(10)
    trainer.train_steps(60)
    assert trainer.train_steps(10) < first
    trainer.set_lr(0.5)
    assert all(g["lr"] == 0.5 for g in trainer.optimizer.param_groups)
    with pytest.raises(TypeError):
        digits_trainer(dig, optimizer=lambda p: "sgd")
    with pytest.raises(ValueError):
        digits_trainer(dig, optimizer="lbfgs-ish")
    with pytest.raises(ValueError):
        digits_trainer(dig, loss="hinge")


def test_custom_loss_and_plain_dataloader() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    model = build_model("mlp:16", 8, 3, seed=0)
    trainer = Trainer(model, loader, loader, loss=torch.nn.functional.cross_entropy)
    assert trainer.samples == 64
    trainer.train_steps(9)  # more than one pass of 4 batches
    result = trainer.evaluate()
    assert result["samples"] == 64 and result["accuracy"] is not None


# --- gradients ---------------------------------------------------------------------------


def manual_gradient(model: torch.nn.Module, x, y, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss(model(x), y).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def test_gradient_matches_autograd(dig: Dataset) -> None:
    trainer = digits_trainer(dig)
    trainer.train_steps(3)
    ce = torch.nn.functional.cross_entropy
    before = trainer.parameters_vector()
    x, y = dig.x_train[:50], dig.y_train[:50]
    got = trainer.gradient((x, y))
    want = manual_gradient(trainer.model, x, y, ce)
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in got)
    # full local data: the gradient of the mean loss over every training row
    full = trainer.gradient("full")
    want = manual_gradient(trainer.model, dig.x_train, dig.y_train, ce)
    assert all(torch.allclose(full[k], want[k], atol=1e-6) for k in full)
    # a minibatch from the stream; nothing stepped, no .grad left behind
    mb = trainer.gradient()
    assert all(
        v.shape == p.shape for v, p in zip(mb.values(), trainer.model.parameters(), strict=True)
    )
    assert torch.equal(trainer.parameters_vector(), before)
    assert all(p.grad is None for p in trainer.model.parameters())
    with pytest.raises(ValueError):
        trainer.gradient("half")


def test_gradient_leaves_batchnorm_buffers(dig: Dataset) -> None:
    trainer = digits_trainer(dig, "cnn-digits")
    trainer.model.eval()
    buffers = {k: v.clone() for k, v in trainer.model.named_buffers()}
    trainer.gradient("full")
    trainer.gradient()
    assert all(torch.equal(buffers[k], v) for k, v in trainer.model.named_buffers())
    assert not trainer.model.training  # mode restored


def test_least_squares_objective_matches_trainer() -> None:
    ds = synthetic_least_squares(400, 10, 50.0, noise=0.1, seed=0)
    trainer = full_trainer(ds, "linear:nobias", "half_mse", lr=1.0 / ds.info["L"])
    trainer.load_vector(torch.from_numpy(ds.info["x_star"]).float())
    g = torch.cat([v.reshape(-1) for v in trainer.gradient("full").values()])
    assert float(g.norm()) < 1e-4  # stationary, up to float32 rounding
    assert trainer.evaluate(trainer.train_loader)["loss"] == pytest.approx(
        ds.info["f_star"], rel=1e-4
    )
    assert trainer.evaluate()["accuracy"] is None
    # gradient descent with step 1/L from zero approaches f*
    trainer.load_vector(torch.zeros(10))
    trainer.train_steps(300)
    gap = trainer.evaluate(trainer.train_loader)["loss"] - ds.info["f_star"]
    assert 0 <= gap < 1e-2 * ds.info["f_star"] + 1e-6


def test_logistic_objective_matches_trainer() -> None:
    ds = synthetic_logistic(500, 8, 20.0, l2=1e-2, seed=1)
    trainer = full_trainer(ds, "linear:nobias", "bce", weight_decay=1e-2)
    xs = torch.from_numpy(ds.info["x_star"]).float()
    trainer.load_vector(xs)
    g = trainer.gradient("full")["weight"].reshape(-1) + 1e-2 * xs  # ridge term
    assert float(g.norm()) < 1e-5
    f = trainer.evaluate(trainer.train_loader)["loss"] + 1e-2 / 2 * float(xs @ xs)
    assert f == pytest.approx(ds.info["f_star"], rel=1e-5)
    assert 0.5 < trainer.evaluate()["accuracy"] <= 1.0


# --- parameters and state ----------------------------------------------------------------


def test_vector_round_trip_and_state_references(dig: Dataset) -> None:
    trainer = digits_trainer(dig, "cnn-digits")
    params = list(trainer.model.parameters())
    vec = trainer.parameters_vector()
    assert vec.numel() == sum(p.numel() for p in params)
    new = torch.arange(vec.numel(), dtype=torch.float32)
    trainer.load_vector(new)
    assert torch.equal(trainer.parameters_vector(), new)
    assert all(a is b for a, b in zip(params, trainer.model.parameters(), strict=True))
    new.zero_()  # the model does not alias the loaded vector
    assert float(trainer.parameters_vector().abs().sum()) > 0
    vec.zero_()  # nor does the returned vector alias the model
    assert float(trainer.parameters_vector().abs().sum()) > 0
    with pytest.raises(ValueError):
        trainer.load_vector(torch.zeros(3))
    state = trainer.state()
    assert "2.running_mean" in state
    state["1.weight"].fill_(0.25)  # references, not copies
    assert float(params[0].detach().mean()) == 0.25


def test_training_in_worker_thread_is_deterministic(dig: Dataset) -> None:
    main = digits_trainer(dig)
    main.train_steps(30)
    other = digits_trainer(dig)
    worker = threading.Thread(target=other.train_steps, args=(30,))
    worker.start()
    worker.join()
    assert torch.equal(main.parameters_vector(), other.parameters_vector())
