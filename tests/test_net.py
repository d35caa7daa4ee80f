"""selfref.net: preprocessing, analyzer, LSTM core, registry, the pure step."""

from __future__ import annotations

import math

import pytest
import torch
from core_smoke import check_core
from torch.func import vmap

from selfref.meta.family import TaskFamily
from selfref.net import (
    Analyzer,
    AnalyzerConfig,
    EvaluationConfig,
    SelfReferentialNet,
    core_names,
    log_sign_preprocess,
    make_core,
)
from selfref.net.cores.lstm import LSTMConfig, LSTMCore
from selfref.tasks import make


def test_log_sign_preprocess_matches_appendix_a():
    p = 10.0
    g = torch.tensor([1.0, -math.exp(-5.0), 1e-6, -1e-6, 0.0], dtype=torch.float64)
    out = log_sign_preprocess(g, p)
    want = torch.tensor(
        [
            [0.0, 1.0],
            [-0.5, -1.0],
            [-1.0, math.exp(p) * 1e-6],
            [-1.0, -math.exp(p) * 1e-6],
            [-1.0, 0.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(out, want)


def test_preprocess_second_derivative_is_finite_at_zero():
    g = torch.tensor([0.0, 1e-7, 0.3], dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(log_sign_preprocess(g).sum(), g)
    assert torch.isfinite(d).all()


def test_analyzer_options_and_momentum_state():
    cfg = AnalyzerConfig(momentum_decays=(0.5, 0.9), include_param=True)
    an = Analyzer(cfg)
    assert an.feature_dim == 2 * 3 + 1
    theta = {"w": torch.ones(2, 3, dtype=torch.float64)}
    g = {"w": torch.full((2, 3), 2.0, dtype=torch.float64)}
    st = an.init_state(theta)
    feats, st = an(theta, g, st)
    assert feats["w"].shape == (2, 3, 7)
    torch.testing.assert_close(st["m0|w"], torch.full((2, 3), 1.0, dtype=torch.float64))
    torch.testing.assert_close(st["m1|w"], torch.full((2, 3), 0.2, dtype=torch.float64))
    torch.testing.assert_close(feats["w"][..., -1], theta["w"])


def test_analyzer_normalization_is_scale_free():
    an = Analyzer(AnalyzerConfig(normalize=True))
    theta = {"w": torch.zeros(4, dtype=torch.float64)}
    g = torch.tensor([0.1, -0.2, 0.3, 0.05], dtype=torch.float64)
    a, _ = an(theta, {"w": g}, {})
    b, _ = an(theta, {"w": 1000 * g}, {})
    torch.testing.assert_close(a["w"], b["w"])


def test_analyzer_rejects_bad_config():
    with pytest.raises(ValueError, match="log_sign"):
        AnalyzerConfig(preprocess="nope")
    with pytest.raises(ValueError, match="decay"):
        AnalyzerConfig(momentum_decays=(1.5,))


def test_lstm_core_smoke():
    check_core(LSTMCore())
    check_core(LSTMCore(LSTMConfig(feature_dim=3, hidden=5, layers=3)))


def test_lstm_paper_setting_and_output_scale():
    core = LSTMCore()
    assert (core.config.hidden, core.config.layers, core.config.output_scale) == (20, 2, 0.1)
    phi = core.init_meta_params(torch.Generator().manual_seed(0))
    assert phi["l0.w_ih"].shape == (80, 2) and phi["l1.w_hh"].shape == (80, 20)
    theta = {"w": torch.zeros(5)}
    feats = {"w": torch.randn(5, 2, generator=torch.Generator().manual_seed(1))}
    u1, _, _ = core(phi, feats, core.init_state(phi, theta))
    big = LSTMCore(output_scale=1.0)
    u2, _, _ = big(phi, feats, big.init_state(phi, theta))
    torch.testing.assert_close(u2["w"] * 0.1, u1["w"])


def test_lstm_is_coordinatewise():
    """Each coordinate's update depends only on its own features (shared weights)."""
    core = LSTMCore()
    phi = core.init_meta_params(torch.Generator().manual_seed(0))
    theta = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
    g = torch.Generator().manual_seed(2)
    feats = {"a": torch.randn(3, 2, generator=g), "b": torch.randn(2, 2, 2, generator=g)}
    u, _, _ = core(phi, feats, core.init_state(phi, theta))
    single = {"x": torch.zeros(1)}
    ux, _, _ = core(phi, {"x": feats["b"][1, 0][None]}, core.init_state(phi, single))
    torch.testing.assert_close(u["b"][1, 0], ux["x"][0])


def test_registry():
    assert "lstm" in core_names()
    assert isinstance(make_core("lstm", hidden=7), LSTMCore)
    with pytest.raises(ValueError, match="lstm"):
        make_core("nope")
    with pytest.raises(ValueError, match="bad"):
        make_core("lstm", nonsense=1)


def _net(dtype=torch.float64, **kw):
    task = make("digits-mlp", hidden=5, batch_size=16, dtype=dtype)
    return task, SelfReferentialNet.from_task(task, **kw)


def test_step_is_pure_and_deterministic():
    task, net = _net()
    phi = {k: v.double() for k, v in net.init_meta_params(torch.Generator().manual_seed(0)).items()}
    theta = task.init_params(torch.Generator().manual_seed(1))
    st = net.init_state(phi, theta)
    before = {k: v.clone() for k, v in theta.items()}
    batch = task.batch("train", 0, seed=1)
    a = net.step(phi, theta, st, batch)
    b = net.step(phi, theta, st, batch)
    for k in theta:
        assert torch.equal(theta[k], before[k])
        assert torch.equal(a[0][k], b[0][k])
        assert not torch.equal(a[0][k], theta[k]) or k.endswith("bias")
    assert int(a[1]["step"]) == 1 and int(st["step"]) == 0
    assert set(a[2]) >= {"loss", "grad_norm", "update_norm"}
    bound = net.bind(phi)(theta, st, batch)
    assert torch.equal(bound[0]["l0.weight"], a[0]["l0.weight"])


@pytest.mark.parametrize(
    "second_order,core,core_stats", [(False, "lstm", 0), (True, "lstm", 0), (False, "srwm", 4)]
)
def test_step_many_equals_vmap_of_step(second_order, core, core_stats):
    task, net = _net(
        evaluation=EvaluationConfig(second_order=second_order),
        analyzer=AnalyzerConfig(momentum_decays=(0.9,), core_stats=core_stats),
        core=core,
    )
    phi = {k: v.double() for k, v in net.init_meta_params(torch.Generator().manual_seed(0)).items()}
    fam = TaskFamily(task)
    seeds = [3, 4, 5]
    theta = fam.init_params(seeds)
    st = vmap(net.init_state, in_dims=(None, 0))(phi, theta)
    for t in range(2):
        batch = fam.batch("train", t, seeds)
        a = vmap(net.step, in_dims=(None, 0, 0, 0))(phi, theta, st, batch)
        b = net.step_many(phi, theta, st, batch)
        for k in theta:
            torch.testing.assert_close(a[0][k], b[0][k])
        torch.testing.assert_close(a[2]["loss"], b[2]["loss"])
        theta, st = b[0], b[1]


def test_feature_dim_mismatch_is_rejected():
    task = make("quadratic")
    with pytest.raises(ValueError, match="features"):
        SelfReferentialNet.from_task(task, core=LSTMCore(feature_dim=3))


def test_describe_roundtrip():
    task, net = _net(analyzer=AnalyzerConfig(momentum_decays=(0.5,)), hidden=8)
    again = SelfReferentialNet.from_description(task, net.describe())
    assert again.describe() == net.describe()
    assert again.core.config.hidden == 8


def test_learned_value_model_shapes():
    task, net = _net(evaluation=EvaluationConfig(learned_value=True, value_hidden=4))
    phi = net.init_meta_params(torch.Generator().manual_seed(0))
    assert {"eval.w1", "eval.b1", "eval.w2", "eval.b2"} <= set(phi)
    from selfref.net.network import split_meta_params

    _, ev = split_meta_params(phi)
    pred = net.evaluation.predict_value(ev, torch.zeros(7, 3))
    assert pred.shape == (7,)
