"""Hypernetwork core (Ha et al. 2016; VeLO, Metz et al. 2022): step rule, mixing, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from selfref.net.cores.hypernet import HypernetConfig, HypernetCore, tensor_statistics

D64 = torch.float64


def _setup(hidden=5, bank=3, mlp_hidden=4, **opts):
    core = HypernetCore(feature_dim=3, hidden=hidden, bank=bank, mlp_hidden=mlp_hidden, **opts)
    phi = {k: v.to(D64) for k, v in core.init_meta_params(torch.Generator().manual_seed(0)).items()}
    theta = {"w": torch.zeros(2, 3, dtype=D64), "b": torch.zeros(3, dtype=D64)}
    g = torch.Generator().manual_seed(1)
    feats = [
        {
            "w": torch.randn(2, 3, 3, generator=g, dtype=D64),
            "b": torch.randn(3, 3, generator=g, dtype=D64),
        }
        for _ in range(3)
    ]
    return core, phi, theta, feats


def test_step_matches_hand_computation_of_velo_rule():
    core, phi, theta, feats = _setup()
    state = core.init_state(phi, theta)
    upd, new_state, _ = core(phi, feats[0], state)
    # by hand: LSTM over statistics, mixing, MLP, d·exp(0.001 m)·0.001
    s = torch.stack([tensor_statistics(feats[0][k]) for k in ("w", "b")])
    gates = s @ phi["lstm.w_ih"].T + phi["lstm.b"]  # zero initial state
    i, f, g, o = gates.split(5, dim=-1)
    c = torch.sigmoid(i) * torch.tanh(g)
    z = torch.sigmoid(o) * torch.tanh(c)
    torch.testing.assert_close(new_state["h"], z)
    for t, k in enumerate(("w", "b")):
        alpha = phi["mix.w"] @ z[t] + phi["mix.b"]
        w1 = sum(alpha[j] * phi["bank.w1"][j] for j in range(3))
        b1 = sum(alpha[j] * phi["bank.b1"][j] for j in range(3))
        w2 = sum(alpha[j] * phi["bank.w2"][j] for j in range(3))
        b2 = sum(alpha[j] * phi["bank.b2"][j] for j in range(3))
        x = feats[0][k].reshape(-1, 3)
        out = torch.relu(x @ w1.T + b1) @ w2.T + b2
        want = out[:, 0] * torch.exp(0.001 * out[:, 1]) * 0.001
        torch.testing.assert_close(upd[k].reshape(-1), want)


def test_one_hot_mixing_selects_a_bank_entry_and_step_constants_apply():
    core = HypernetCore(feature_dim=1, hidden=2, bank=2, mlp_hidden=1, exp_mult=0.5, step_mult=2.0)
    phi = core.init_meta_params(torch.Generator().manual_seed(0))
    phi = {k: v.to(D64) for k, v in phi.items()}
    phi["mix.w"] = torch.zeros(2, 2, dtype=D64)
    phi["mix.b"] = torch.tensor([0.0, 1.0], dtype=D64)  # α = e_1 for every tensor
    phi["bank.w1"] = torch.tensor([[[9.0]], [[1.0]]], dtype=D64)
    phi["bank.b1"] = torch.zeros(2, 1, dtype=D64)
    phi["bank.w2"] = torch.tensor([[[9.0], [9.0]], [[1.0], [2.0]]], dtype=D64)
    phi["bank.b2"] = torch.zeros(2, 2, dtype=D64)
    theta = {"w": torch.zeros(4, dtype=D64)}
    x = torch.tensor([[0.5], [1.0], [-1.0], [2.0]], dtype=D64)
    upd, _, metrics = core(phi, {"w": x}, core.init_state(phi, theta))
    h = torch.relu(x[:, 0])  # MLP of bank entry 1: hidden = relu(x), d = h, m = 2h
    torch.testing.assert_close(upd["w"], h * torch.exp(0.5 * 2 * h) * 2.0)
    assert math.isclose(float(metrics["hypernet/direction_mean"]), float(h.mean()), rel_tol=1e-9)
    assert math.isclose(
        float(metrics["hypernet/magnitude_mean"]), float(2 * h.mean()), rel_tol=1e-9
    )


def test_grads_reach_every_meta_param_and_state_is_per_tensor():
    core, phi, theta, feats = _setup()
    leaves = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
    state = core.init_state(leaves, theta)
    assert state["h"].shape == (2, 5)
    total = 0.0
    for f in feats:
        upd, state, metrics = core(leaves, f, state)
        total = total + sum((u**2).sum() for u in upd.values())
    assert not torch.allclose(state["h"][0], state["h"][1])
    total.backward()
    for k, v in leaves.items():
        assert v.grad is not None and float(v.grad.abs().sum()) > 0, k
    assert set(metrics) >= {"hypernet/direction_std", "hypernet/step_abs_mean"}


def test_gradcheck_float64_short_sequence():
    core, phi, theta, feats = _setup(hidden=3, bank=2, mlp_hidden=2, step_mult=0.5, exp_mult=0.3)
    names = list(phi)

    def f(*leaves):
        mp = dict(zip(names, leaves))
        state = core.init_state(mp, theta)
        out = 0.0
        for fe in feats[:2]:
            upd, state, _ = core(mp, fe, state)
            out = out + sum((u**2).sum() for u in upd.values())
        return out

    leaves = tuple(phi[k].clone().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


def test_in_self_referential_net_step_and_vmapped_step():
    from selfref.net import SelfReferentialNet
    from selfref.tasks import make

    task = make("quadratic", dtype=D64)
    net = SelfReferentialNet.from_task(task, core="hypernet")
    phi = {k: v.to(D64) for k, v in net.init_meta_params(torch.Generator().manual_seed(0)).items()}
    theta = task.init_params(torch.Generator().manual_seed(1))
    state = net.init_state(phi, theta)
    new, state, m = net.step(phi, theta, state, task.batch("train", 0, seed=1))
    assert float(m["update_norm"]) > 0 and "hypernet/direction_mean" in m
    thetas = {k: torch.stack([v, v + 1]) for k, v in theta.items()}
    states = torch.func.vmap(lambda p: net.init_state(phi, p))(thetas)
    b = task.batch("train", 0, seed=1)
    batch = {k: torch.stack([v, v]) for k, v in b.items()}
    _, _, mm = net.step_many(phi, thetas, states, batch)
    assert mm["hypernet/step_abs_mean"].shape == (2,)
    rebuilt = SelfReferentialNet.from_description(task, net.describe())
    assert rebuilt.core.config == net.core.config


def test_interface_smoke():
    from core_smoke import check_core

    check_core(HypernetCore())


def test_bad_options():
    with pytest.raises(ValueError, match="unknown hypernet core option"):
        HypernetCore(hiden=3)
    with pytest.raises(ValueError, match="bank"):
        HypernetConfig(bank=0)
    core, phi, theta, feats = _setup()
    with pytest.raises(ValueError, match="feature_dim=3"):
        core(phi, {"w": torch.zeros(2, 3, 2, dtype=D64)}, core.init_state(phi, {"w": theta["w"]}))


def test_internals_logged_through_the_logger_protocol():
    from selfref.logging import MemoryLogger, log_metrics
    from selfref.net import SelfReferentialNet
    from selfref.tasks import make

    task = make("quadratic")
    logger = MemoryLogger()
    for core in ("hypernet", "srwm"):
        net = SelfReferentialNet.from_task(task, core=core)
        phi = net.init_meta_params(torch.Generator().manual_seed(0))
        theta = task.init_params(torch.Generator().manual_seed(1))
        state = net.init_state(phi, theta)
        for t in range(3):
            theta, state, m = net.step(phi, theta, state, task.batch("train", t, seed=1))
            log_metrics(logger, m, t, prefix="modify/")
    for tag in ("direction_mean", "direction_std", "magnitude_mean", "magnitude_std"):
        assert len(logger.values(f"modify/hypernet/{tag}")) == 3
    assert len(logger.values("modify/srwm/dW/q")) == 3
    assert len(logger.values("modify/srwm/k_entropy")) == 3
    assert logger.histograms["modify/srwm/beta/y"][0][1].numel() > 1


def test_momentum_features_option_reaches_the_step_and_the_meta_gradient():
    """``hypernet_mom`` of benchmarks/cores_quality.py: step_mult 0.1 and the analyzer's
    log/sign features of momentum averages at decays (0.5, 0.9, 0.99) beside those of g."""
    from selfref.net import SelfReferentialNet
    from selfref.net.analyzing import AnalyzerConfig
    from selfref.tasks import make

    task = make("quadratic", dtype=D64)
    decays = (0.5, 0.9, 0.99)
    net = SelfReferentialNet.from_task(
        task, core="hypernet", analyzer=AnalyzerConfig(momentum_decays=decays), step_mult=0.1
    )
    cfg = net.core.config
    assert (cfg.feature_dim, cfg.stats_dim, cfg.step_mult, cfg.exp_mult) == (8, 25, 0.1, 0.001)
    phi = {k: v.to(D64) for k, v in net.init_meta_params(torch.Generator().manual_seed(0)).items()}
    theta = task.init_params(torch.Generator().manual_seed(1))
    batch = task.batch("train", 0, seed=1)
    state = net.init_state(phi, theta)
    new, after, _ = net.step(phi, theta, state, batch)
    # from zero averages, one step leaves m_i = (1 - β_i) g for every decay
    g = torch.func.grad(lambda p: task.loss(p, batch))(theta)["theta"]
    for i, beta in enumerate(decays):
        torch.testing.assert_close(after["analyzer"][f"m{i}|theta"], (1 - beta) * g)
    # the same θ and gradient after another momentum history gives another step
    other = {**state, "analyzer": {k: -5.0 * v for k, v in after["analyzer"].items()}}
    new_other, _, _ = net.step(phi, theta, other, batch)
    assert not torch.allclose(new["theta"], new_other["theta"])
    # a 3-step unroll: the meta-gradient reaches every φ entry and is finite
    leaves = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
    th, st = theta, net.init_state(leaves, theta)
    for t in range(3):
        th, st, _ = net.step(leaves, th, st, task.batch("train", t, seed=1))
    task.loss(th, batch).backward()
    for k, v in leaves.items():
        if k.startswith("core."):
            assert v.grad is not None and torch.isfinite(v.grad).all(), k
            assert float(v.grad.abs().sum()) > 0, k
