"""Functional optimizers against torch.optim (float64, real task), purity, hypergradients."""

from __future__ import annotations

import math

import pytest
import torch

from selfref.optim import DEFAULT_HPARAMS, OPTIMIZERS, make_optimizer, resolve_hparams
from selfref.tasks import make

STEPS = 20


def _torch_reference(name: str, params, lr: float, wd: float):
    """The torch.optim instance matching optimizer ``name`` (single-tensor code path)."""
    ps = list(params.values())
    if name == "sgd":
        return torch.optim.SGD(ps, lr=lr, weight_decay=wd, foreach=False)
    if name == "momentum":
        return torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=wd, foreach=False)
    if name == "nesterov":
        return torch.optim.SGD(
            ps, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd, foreach=False
        )
    if name == "rmsprop":
        return torch.optim.RMSprop(ps, lr=lr, alpha=0.99, eps=1e-8, weight_decay=wd, foreach=False)
    return torch.optim.Adam(ps, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd, foreach=False)


@pytest.fixture(scope="module")
def digits64():
    return make("digits-mlp", dtype=torch.float64)


@pytest.mark.parametrize("wd", [0.0, 1e-2])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_matches_torch_optim(digits64, name, wd):
    task = digits64
    lr = {"sgd": 0.1, "momentum": 0.05, "nesterov": 0.05, "rmsprop": 0.01, "adam": 0.01}[name]
    p0 = task.init_params(torch.Generator().manual_seed(3))
    ref = {k: v.clone().requires_grad_(True) for k, v in p0.items()}
    torch_opt = _torch_reference(name, ref, lr, wd)

    opt = make_optimizer(name)
    hp = {"lr": lr, "weight_decay": wd}
    if name in ("momentum", "nesterov"):
        hp["momentum"] = 0.9
    params, state = dict(p0), opt.init(p0)
    grad_fn = torch.func.grad(task.loss)
    for t in range(STEPS):
        batch = task.batch("train", t, seed=1)
        torch_opt.zero_grad()
        task.loss(ref, batch).backward()
        torch_opt.step()
        params, state = opt.update(params, grad_fn(params, batch), state, hp)

    diff = max(float((params[k] - ref[k].detach()).abs().max()) for k in params)
    moved = max(float((params[k] - p0[k]).abs().max()) for k in params)
    assert diff <= 1e-10
    assert moved > 1e-3  # the comparison is not vacuous
    assert float(state["step"]) == STEPS


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_update_is_pure(name):
    opt = make_optimizer(name)
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g)}
    grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
    before = {k: v.clone() for k, v in params.items()}
    state = opt.init(params)
    state_before = {
        k: (v.clone() if torch.is_tensor(v) else {kk: vv.clone() for kk, vv in v.items()})
        for k, v in state.items()
    }
    new, new_state = opt.update(params, grads, state, {"lr": 0.1})
    for k in params:
        assert torch.equal(params[k], before[k])
        assert not torch.equal(new[k], before[k])
    for k, v in state.items():
        if torch.is_tensor(v):
            assert torch.equal(v, state_before[k])
        else:
            for kk in v:
                assert torch.equal(v[kk], state_before[k][kk])
    assert float(new_state["step"]) == 1.0


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_hypergradient_wrt_lr_matches_finite_differences(name):
    """d(loss after 3 updates)/d(lr) through the unrolled updates, float64 gradcheck."""
    task = make("quadratic", dtype=torch.float64, init="gaussian")
    opt = make_optimizer(name)
    p0 = task.init_params(torch.Generator().manual_seed(0))
    batch = task.batch("train", 0, seed=0)
    base_lr = {"sgd": 0.01, "momentum": 0.005, "nesterov": 0.005, "rmsprop": 0.01, "adam": 0.05}

    def loss_after(lr):
        params, state = dict(p0), opt.init(p0)
        for _ in range(3):
            grads = torch.func.grad(task.loss)(params, batch)
            params, state = opt.update(params, grads, state, {"lr": lr})
        return task.loss(params, batch)

    lr = torch.tensor(base_lr[name], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss_after, (lr,), eps=1e-7, atol=1e-6, rtol=1e-5)


def test_hypergradient_wrt_momentum_flows():
    task = make("quadratic", dtype=torch.float64)
    opt = make_optimizer("momentum")
    p0 = task.init_params(torch.Generator().manual_seed(0))
    batch = task.batch("train", 0, seed=0)

    def loss_after(mu):
        params, state = dict(p0), opt.init(p0)
        for _ in range(4):
            grads = torch.func.grad(task.loss)(params, batch)
            params, state = opt.update(params, grads, state, {"lr": 0.005, "momentum": mu})
        return task.loss(params, batch)

    mu = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss_after, (mu,), eps=1e-7, atol=1e-6, rtol=1e-5)


def test_adam_lr_tensor_gives_same_values_as_float():
    opt = make_optimizer("adam")
    g = torch.Generator().manual_seed(1)
    p = {"w": torch.randn(5, generator=g, dtype=torch.float64)}
    grads = {"w": torch.randn(5, generator=g, dtype=torch.float64)}
    a, _ = opt.update(p, grads, opt.init(p), {"lr": 0.1, "beta1": 0.8})
    b, _ = opt.update(
        p,
        grads,
        opt.init(p),
        {"lr": torch.tensor(0.1, dtype=torch.float64), "beta1": torch.tensor(0.8)},
    )
    assert torch.allclose(a["w"], b["w"], atol=1e-7)


def test_unknown_optimizer_lists_valid_names():
    with pytest.raises(
        ValueError, match="unknown optimizer 'adamw'.*sgd, momentum, nesterov, rmsprop, adam"
    ):
        make_optimizer("adamw")


@pytest.mark.parametrize(
    "name, hparams, match",
    [
        ("adam", {"momentum": 0.9}, "no hyperparameter 'momentum'.*lr, beta1"),
        ("sgd", {"lr": 0.0}, "lr=0.0 is out of range"),
        ("sgd", {"lr": -1.0}, "lr=-1.0"),
        ("sgd", {"lr": math.nan}, "lr=nan"),
        ("momentum", {"momentum": 1.0}, r"momentum=1.0 .*\[0, 1\)"),
        ("adam", {"beta2": 1.5}, "beta2=1.5"),
        ("rmsprop", {"eps": 0.0}, "eps=0.0"),
        ("sgd", {"weight_decay": -0.1}, "weight_decay=-0.1"),
        ("sgd", {"lr": "fast"}, "must be a number"),
        ("sgd", {"lr": torch.ones(2)}, "must be a scalar"),
    ],
)
def test_bad_hparams_raise(name, hparams, match):
    opt = make_optimizer(name)
    p = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match=match):
        opt.update(p, {"w": torch.ones(2)}, opt.init(p), hparams)
    with pytest.raises(ValueError, match=match):
        resolve_hparams(name, hparams)


def test_mismatched_grad_keys_raise():
    opt = make_optimizer("sgd")
    p = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="grads keys"):
        opt.update(p, {"v": torch.ones(2)}, opt.init(p), {"lr": 0.1})


def test_defaults_cover_hparam_names():
    for name in OPTIMIZERS:
        opt = make_optimizer(name)
        assert opt.name == name
        assert tuple(DEFAULT_HPARAMS[name]) == opt.hparam_names
        assert resolve_hparams(name) == DEFAULT_HPARAMS[name]
