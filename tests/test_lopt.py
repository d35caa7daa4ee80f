"""The generalizing learned optimizer's parts: task distribution, analyzer features, the lopt
core, the task-distribution meta-problem and the tuned baselines."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.func import vmap

from selfref import checkpoints
from selfref.meta import MetaTrainConfig
from selfref.meta.baselines import GridRun, best_setting, early_stopped, log_grid, run_grid
from selfref.meta.family import TaskFamily
from selfref.meta.problems import TaskDistributionProblem
from selfref.meta.trainer import init_state, train_step
from selfref.net import AnalyzerConfig, EvaluationConfig, SelfReferentialNet
from selfref.net.analyzing import Analyzer
from selfref.net.cores.lopt import LoptCore, lopt_analyzer, mup_log_scales
from selfref.net.optimizer import default_checkpoint
from selfref.optim import make_optimizer
from selfref.tasks.distribution import (
    HELDOUT_SOURCES,
    SELECTION_SOURCES,
    DistributionConfig,
    TaskDistribution,
    TaskSpec,
    build_task,
)

# -- the task distribution -----------------------------------------------------------------


def test_distribution_is_deterministic_varied_and_contains_its_samples():
    dist = TaskDistribution()
    specs = [dist.sample(s) for s in range(60)]
    assert specs == [dist.sample(s) for s in range(60)]
    assert all(dist.contains(s) for s in specs)
    assert len({s.data for s in specs}) == 5
    assert {s.activation for s in specs if s.hidden} == {"relu", "tanh", "sigmoid"}
    assert {len(s.hidden) for s in specs} == {0, 1, 2}
    assert len({s.batch_size for s in specs}) == 4
    assert any(s.proj_dim for s in specs) and any(s.param_scale != 1.0 for s in specs)
    assert any(s.permute_labels for s in specs)
    assert TaskSpec.from_dict(specs[3].to_dict()) == specs[3]


def test_contains_rejects_what_the_distribution_never_draws():
    dist = TaskDistribution()
    base = TaskSpec("digits", hidden=(32,), activation="relu", batch_size=64)
    assert dist.contains(base)
    for other in (
        TaskSpec("wine", hidden=(32,), activation="relu", batch_size=64),  # held-out data
        TaskSpec("digits", hidden=(256,), activation="relu", batch_size=64),  # too wide
        TaskSpec("digits", hidden=(32,) * 3, activation="relu", batch_size=64),  # too deep
        TaskSpec("digits", hidden=(32,), activation="gelu", batch_size=64),  # not sampled
        TaskSpec("digits", hidden=(32,), activation="relu", batch_size=100),
    ):
        assert not dist.contains(other)
    assert not set(HELDOUT_SOURCES) & set(dist.config.sources)
    with pytest.raises(ValueError, match="unknown data"):
        TaskSpec("mnist")
    with pytest.raises(ValueError, match="unknown activation"):
        DistributionConfig(activations=("swish",))
    with pytest.raises(ValueError, match="param_scale range"):
        DistributionConfig(param_scale=(3.0, 0.3))
    with pytest.raises(ValueError, match="param_scale range"):
        DistributionConfig(param_scale=(0.0, 3.0))
    with pytest.raises(ValueError, match="param_scale_prob"):
        DistributionConfig(param_scale_prob=1.5)


def test_reparameterization_keeps_the_function_and_scales_the_parameters():
    spec = TaskSpec("classification", hidden=(16,), n_features=8, n_classes=3, data_seed=5)
    plain = build_task(spec)
    scaled = build_task(TaskSpec(**{**spec.to_dict(), "hidden": (16,), "param_scale": 4.0}))
    p0 = plain.init_params(torch.Generator().manual_seed(1))
    p1 = scaled.init_params(torch.Generator().manual_seed(1))
    x = plain.data["train"][0][:20]
    torch.testing.assert_close(plain.forward(p0, x), scaled.forward(p1, x))
    torch.testing.assert_close(p1["l0.weight"] * 4.0, p0["l0.weight"])
    b = plain.batch("train", 0, 0)
    g0 = torch.func.grad(plain.loss)(p0, b)["l0.weight"]
    g1 = torch.func.grad(scaled.loss)(p1, b)["l0.weight"]
    torch.testing.assert_close(g1, 4.0 * g0)  # gradients c× as large


def test_swap_sources_pairs_the_specs_and_xor_has_no_linear_signal():
    plain = TaskDistribution(DistributionConfig(label_noise_prob=0.6))
    swapped = TaskDistribution(
        DistributionConfig(label_noise_prob=0.6, swap_sources=("xor",), swap_prob=0.5)
    )
    pairs = [(plain.sample(s), swapped.sample(s)) for s in range(120)]
    changed = [(a, b) for a, b in pairs if a != b]
    # every other task is the one without the swap; only MLP classification tasks swap
    assert all(replace(b, data=a.data) == a and b.data == "xor" for a, b in changed)
    assert all(a.hidden and a.kind == "classification" for a, _ in changed)
    eligible = sum(bool(a.hidden) and a.kind == "classification" for a, _ in pairs)
    assert 0.25 < len(changed) / eligible < 0.75
    assert all(swapped.contains(b) for _, b in pairs)
    assert not plain.contains(changed[0][1])
    with pytest.raises(ValueError, match="swap_sources"):
        DistributionConfig(swap_sources=("diabetes",), swap_prob=0.5)
    with pytest.raises(ValueError, match="swap_sources"):
        DistributionConfig(swap_prob=0.5)
    task = build_task(TaskSpec("xor", hidden=(16,), n_samples=1200, n_features=20, data_seed=3))
    x, y = task.data["train"]
    assert x.shape[1] == 8 and set(y.tolist()) == {0, 1}  # at most 8 inputs
    # no linear signal: least squares on the inputs explains almost none of the labels
    xb = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    yc = y.double() - y.double().mean()
    fit = xb @ torch.linalg.lstsq(xb, yc.unsqueeze(1)).solution
    assert float((fit.squeeze(1) ** 2).sum() / (yc**2).sum()) < 0.05


def test_label_noise_flips_about_the_asked_fraction():
    clean = build_task(TaskSpec("blobs", n_samples=1500, n_classes=4, data_seed=2))
    noisy = build_task(TaskSpec("blobs", n_samples=1500, n_classes=4, data_seed=2, label_noise=0.2))
    y0, y1 = clean.data["train"][1], noisy.data["train"][1]
    changed = float((y0 != y1).double().mean())
    assert 0.1 < changed < 0.2  # 20 % replaced by a random class: 3/4 of them change


def test_regression_and_every_heldout_source_build():
    for data in HELDOUT_SOURCES + ("quadratic",):
        t = build_task(TaskSpec(data, hidden=(8,), n_samples=300, n_features=6, difficulty=0.1))
        p = t.init_params(torch.Generator().manual_seed(0))
        loss = t.loss(p, t.batch("train", 0, 0))
        assert math.isfinite(float(loss))
        ev = t.evaluate(p, "test")
        assert ("accuracy" in ev) == (t.spec.kind == "classification")


# -- analyzer features ---------------------------------------------------------------------


def test_default_analyzer_is_unchanged():
    cfg = AnalyzerConfig()
    assert cfg.feature_dim == 2 and cfg.feature_names == ("grad.log", "grad.sign")
    assert Analyzer(cfg).init_state({"w": torch.zeros(3)}) == {}


def test_normalized_momentum_is_adams_direction():
    an = Analyzer(
        AnalyzerConfig(preprocess="raw", momentum_decays=(0.9,), second_moment_decay=0.999)
    )
    adam = make_optimizer("adam")
    g = torch.Generator().manual_seed(0)
    theta = {"w": torch.randn(5, 3, generator=g, dtype=torch.float64)}
    st, ost = an.init_state(theta), adam.init(theta)
    for _ in range(4):
        grad = {"w": torch.randn(5, 3, generator=g, dtype=torch.float64)}
        feats, st = an(theta, grad, st)
        new, ost = adam.update(theta, grad, ost, {"lr": 1.0})
        # Adam's step with lr 1 is m̂ / (√v̂ + ε): the momentum feature, column 1
        torch.testing.assert_close(theta["w"] - new["w"], feats["w"][..., 1])


def test_progress_and_loss_features():
    an = Analyzer(lopt_analyzer())
    names = an.config.feature_names
    theta = {"w": torch.ones(2, dtype=torch.float64)}
    with pytest.raises(ValueError, match="horizon"):
        an.init_state(theta)
    st = an.init_state(theta, horizon=10)
    grad = {"w": torch.ones(2, dtype=torch.float64)}
    col = {n: i for i, n in enumerate(names)}
    for t in range(12):
        ctx = {"loss": torch.tensor(2.0**-t, dtype=torch.float64)}
        if t >= 3:
            ctx["heldout_loss"] = torch.tensor(1.0 + 0.1 * t, dtype=torch.float64)
        feats, st = an(theta, grad, st, None, ctx)
        f = feats["w"][0]
        assert float(f[col["progress"]]) == pytest.approx(min(t / 10, 1.0))
        assert float(f[col["heldout_seen"]]) == (1.0 if t >= 3 else 0.0)
        if t < 3:
            assert float(f[col["heldout_gap"]]) == 0.0 and float(f[col["heldout_trend"]]) == 0.0
    assert float(f[col["loss_progress"]]) < 0  # the training loss fell
    assert float(f[col["loss_trend"]]) < 0  # and is still falling
    assert float(f[col["heldout_trend"]]) > 0  # the held-out loss rises: overfitting
    assert float(f[col["heldout_gap"]]) > 0
    assert int(st["t"]) == 12


# -- the lopt core -------------------------------------------------------------------------


class _PerturbedLopt(LoptCore):
    """The output layers start at zero by design; perturb them so the smoke test's check
    that gradients reach every weight is meaningful."""

    def init_meta_params(self, generator):
        phi = super().init_meta_params(generator)
        for k in ("ctrl.w_out", "mlp.w_out", "ctrl.b_out", "mlp.b_out"):
            phi[k] = 0.1 * torch.randn(phi[k].shape, generator=generator)
        return phi


def test_lopt_core_contract():
    from core_smoke import check_core

    check_core(_PerturbedLopt(feature_dim=5, base_index=1, param_index=2, hidden=6, ctrl_hidden=4))
    check_core(_PerturbedLopt(feature_dim=3, base_index=0, param_index=-1, hidden=4, ctrl_hidden=3))
    with pytest.raises(ValueError, match="base_index"):
        LoptCore(feature_dim=3, base_index=3)
    with pytest.raises(ValueError, match="bad name"):
        LoptCore(nope=1)


def test_lopt_hyper_feature_contract_and_sign():
    """With ``hyper_feature`` the controller reads cos(g_t, Δθ_{t-1}): -1 on a quadratic
    while Adam-sized steps are far too small to cross the minimum."""
    from core_smoke import check_core

    check_core(
        _PerturbedLopt(
            feature_dim=5, base_index=1, param_index=2, hidden=6, ctrl_hidden=4, hyper_feature=True
        )
    )
    core = LoptCore(feature_dim=2, base_index=1, param_index=-1, out_init=0.0, hyper_feature=True)
    phi = core.init_meta_params(torch.Generator().manual_seed(0))
    theta = torch.linspace(1.0, 2.0, 6)
    state = core.init_state(phi, {"w": theta})
    cos = []
    for _ in range(3):
        g = theta  # ∇ ½|θ|², also the base direction here: each step is -3e-3 g
        feats = {"w": torch.stack([g, g], dim=-1)}
        upd, state, m = core(phi, feats, state)
        theta = theta + upd["w"]
        cos.append(float(m["lopt/hyper_cos_mean"]))
    assert cos[0] == 0.0 and cos[1] == pytest.approx(-1.0, abs=1e-6)
    assert state["prev"].shape == (6,)


def test_lopt_hyper_rate_grows_small_steps_and_shrinks_overshooting_ones():
    """With ``hyper_rate`` κ, A_T moves by -κ·cos(g_t, Δθ_{t-1}) (Baydin et al. 2018): on
    ½|θ|², steps far too small to cross the minimum grow by κ a step; steps that overshoot
    it (cos = +1) shrink."""
    from core_smoke import check_core

    check_core(
        _PerturbedLopt(
            feature_dim=5, base_index=1, param_index=2, hidden=6, ctrl_hidden=4, hyper_rate=0.1
        )
    )
    with pytest.raises(ValueError, match="hyper_rate"):
        LoptCore(hyper_rate=-1.0)

    def run(lr: float) -> list[float]:
        core = LoptCore(
            feature_dim=2, base_index=1, param_index=-1, out_init=0.0, lr_init=lr, hyper_rate=0.1
        )
        phi = core.init_meta_params(torch.Generator().manual_seed(0))
        assert set(phi) - set(LoptCore(out_init=0.0).init_meta_params(torch.Generator())) == {
            "hyper.log_rate"
        }
        theta = torch.linspace(0.1, 0.2, 6)  # small enough that no step hits max_update
        state = core.init_state(phi, {"w": theta})
        adapt = []
        for _ in range(4):
            g = theta  # the gradient of ½|θ|²
            feats = {"w": torch.stack([g, g / 2], dim=-1)}  # base: along g
            upd, state, _ = core(phi, feats, state)
            theta = theta + upd["w"]
            adapt.append(float(state["adapt"][0]))
        return adapt

    small = run(1e-3)  # never reaches the minimum: cos = -1 from the second step on
    assert small[0] == 0.0 and small[1:] == pytest.approx([0.1, 0.2, 0.3], abs=1e-6)
    big = run(5.0)  # every step jumps across the minimum: cos = +1
    assert big[1:] == pytest.approx([-0.1, -0.2, -0.3], abs=1e-6)


def test_lopt_backoff_shrinks_steps_only_while_the_training_loss_rises():
    """With ``backoff_rate`` γ, A_T falls by γ·relu(r), r the loss-trend feature (bold
    driver): a rising loss (r > 0) cuts every tensor's step, a falling one (r < 0) leaves
    A_T alone; the update is Adam's times exp(4 tanh(A_T / 4)), the bounded offset."""
    from core_smoke import check_core

    check_core(
        _PerturbedLopt(
            feature_dim=5, base_index=1, param_index=2, hidden=6, ctrl_hidden=4,
            backoff_rate=0.1, trend_index=3,
        )
    )  # fmt: skip
    with pytest.raises(ValueError, match="backoff_rate"):
        LoptCore(backoff_rate=-1.0)
    with pytest.raises(ValueError, match="trend_index"):
        LoptCore(feature_dim=5, base_index=1, param_index=2, backoff_rate=0.1, trend_index=7)
    core = LoptCore(
        feature_dim=3, base_index=1, param_index=-1, trend_index=2, out_init=0.0,
        backoff_rate=0.1,
    )  # fmt: skip
    phi = core.init_meta_params(torch.Generator().manual_seed(0))
    assert set(phi) - set(LoptCore(out_init=0.0).init_meta_params(torch.Generator())) == {
        "backoff.log_rate"
    }
    params = {"a": torch.zeros(4), "b": torch.zeros(2, 3)}
    state = core.init_state(phi, params)
    adapt, steps = [], []
    for trend in (0.5, 2.0, -1.0, 0.0):
        feats = {
            k: torch.stack([torch.ones_like(v), torch.ones_like(v), torch.full_like(v, trend)], -1)
            for k, v in params.items()
        }
        upd, state, _ = core(phi, feats, state)
        assert state["adapt"][0] == state["adapt"][1]  # the same trend reaches every tensor
        adapt.append(float(state["adapt"][0]))
        steps.append(float(upd["a"][0]))
    assert adapt == pytest.approx([-0.05, -0.25, -0.25, -0.25])
    # the offset is 4 tanh(A_T / 4) (max_log_offset 4)
    assert steps == pytest.approx([-3e-3 * math.exp(4 * math.tanh(a / 4)) for a in adapt], rel=1e-5)


def test_lopt_dir_gate_scales_the_direction_correction_per_tensor():
    """With ``dir_gate`` the step is −exp(log α + a_T + s_i)·(b_i + g_T·d_i), g_T =
    2·sigmoid(w·c_T + b): at its start (b = 0) the core without the gate, with the same
    other meta-parameters; a very negative b removes the correction (Adam's direction with
    the learned magnitude), a very positive one doubles it."""
    from core_smoke import check_core

    opts = dict(feature_dim=5, base_index=1, param_index=2, hidden=6, ctrl_hidden=4)
    check_core(_PerturbedLopt(dir_gate=True, **opts))
    gated, plain = LoptCore(dir_gate=True, **opts), LoptCore(**opts)
    phi = _PerturbedLopt(**opts).init_meta_params(torch.Generator().manual_seed(1))
    phi_g = gated.init_meta_params(torch.Generator().manual_seed(1))
    assert set(phi_g) - set(phi) == {"gate.w", "gate.b"}
    assert float(phi_g["gate.b"]) == 0.0
    gen = torch.Generator().manual_seed(2)
    params = {"a": torch.randn(4, generator=gen), "b": torch.randn(2, 3, generator=gen)}
    feats = {k: torch.randn(*v.shape, 5, generator=gen) for k, v in params.items()}

    def step(core, p):
        return core(p, feats, core.init_state(p, params))[0]

    ref = step(plain, phi)
    no_dir = step(
        plain,
        {
            **phi,
            "mlp.w_out": phi["mlp.w_out"] * torch.tensor([[0.0], [1.0]]),
            "mlp.b_out": phi["mlp.b_out"] * torch.tensor([0.0, 1.0]),
        },
    )

    def gated_step(w, b):
        return step(gated, {**phi, "gate.w": w, "gate.b": torch.full((1,), b)})

    start = gated_step(torch.zeros(4), 0.0)
    removed = gated_step(torch.randn(4, generator=gen), -60.0)
    doubled = gated_step(torch.zeros(4), 60.0)
    for k in params:
        torch.testing.assert_close(start[k], ref[k])
        torch.testing.assert_close(removed[k], no_dir[k])
        # b + 2d versus b + d and b: the correction doubled
        torch.testing.assert_close(doubled[k] - no_dir[k], 2 * (ref[k] - no_dir[k]))
    assert not torch.allclose(ref["a"], no_dir["a"])  # the correction is not zero here


def test_untrained_lopt_is_adam_on_a_real_task():
    task = build_task(TaskSpec("breast_cancer", hidden=(8,), batch_size=32), dtype=torch.float64)
    net = SelfReferentialNet.from_task(task, core="lopt", analyzer=lopt_analyzer(), out_init=0.0)
    phi = {k: v.double() for k, v in net.init_meta_params(torch.Generator().manual_seed(0)).items()}
    phi["core.log_lr"] = torch.tensor([math.log(3e-3)], dtype=torch.float64)  # no float32 rounding
    fam = TaskFamily(task)
    seeds = [3, 4]
    p = fam.init_params(seeds)
    q = {k: v.clone() for k, v in p.items()}
    st = vmap(lambda x: net.init_state(phi, x, horizon=30))(p)
    adam = make_optimizer("adam")
    ost = vmap(adam.init)(q)
    for t in range(15):
        b = fam.batch("train", t, seeds)
        p, st, _ = net.step_many(phi, p, st, {**b, "heldout": fam.batch("val", t, seeds)})
        g = vmap(torch.func.grad(task.loss))(q, b)
        q, ost = vmap(lambda a, b_, c: adam.update(a, b_, c, {"lr": 3e-3}))(q, g, ost)
    for k in p:
        torch.testing.assert_close(p[k], q[k], atol=1e-12, rtol=1e-10)


def test_lopt_guards_bound_the_step():
    core = LoptCore(feature_dim=3, base_index=0, param_index=1, max_update=0.01, out_init=0.0)
    phi = core.init_meta_params(torch.Generator().manual_seed(0))
    phi["log_lr"] = torch.tensor([5.0])  # an absurd learning rate
    feats = {"w": torch.tensor([[1e6, 1.0, 0.0], [float("nan"), 1.0, 0.0]])}
    upd, _, _ = core(phi, feats, core.init_state(phi, {"w": torch.zeros(2)}))
    assert torch.equal(upd["w"], torch.tensor([-0.01, 0.0]))


# -- the meta-problem ----------------------------------------------------------------------


def _problem(**kw):
    return TaskDistributionProblem.from_config(
        {"eval_tasks": 2, "eval_instances": 2, "eval_steps": 6, **kw},
        {
            "core": "lopt",
            "core_options": {"hidden": 4, "ctrl_hidden": 3},
            "analyzer": lopt_analyzer().__dict__,
            "evaluation": {"heldout_every": 2},
        },
    )


def test_problem_unroll_carry_and_meta_gradient_reach_every_weight():
    prob = _problem()
    phi = prob.init_meta_params(torch.Generator().manual_seed(0))
    phi = {
        k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
        for k, v in phi.items()
    }
    inner = prob.init_inner(phi, torch.Generator().manual_seed(3), 3, 20, 0)
    assert inner.n == 3 and 10 <= inner.horizon <= 20
    task_seed = int(inner.data["task"][0])
    assert torch.equal(inner.data["task"], torch.full((3,), task_seed))
    leaves = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
    tr = prob.unroll(leaves, inner, 4)
    assert tr.loss.shape == (3,) and tr.inner.t == 4 and tr.per_step.shape == (3, 4)
    task = prob.task(task_seed)[0]
    outer = min(512, task.num_examples("test")) / task.batch_size  # the outer pass, in batches
    assert tr.grad_evals == pytest.approx(3 * 4 * (1 + 0.5 * outer) + 3 * 2 * 0.5)  # 2 reads
    grads = torch.autograd.grad(tr.loss.mean(), list(leaves.values()))
    dead = [k for k, g in zip(leaves, grads) if not bool(g.abs().sum() > 0)]
    assert not dead
    # the carry continues where it stopped: 2 + 2 steps equal 4 steps
    a = prob.unroll(phi, inner, 2)
    b = prob.unroll(phi, a.inner.detached(), 2)
    for k in tr.inner.data["params"]:
        torch.testing.assert_close(b.inner.data["params"][k], tr.inner.data["params"][k].detach())
    with pytest.raises(ValueError, match="passes"):
        prob.unroll(phi, inner, 100)


def test_problem_per_instance_meta_params_match_shared():
    prob = _problem()
    phi = prob.init_meta_params(torch.Generator().manual_seed(0))
    inner = prob.init_inner(phi, torch.Generator().manual_seed(5), 2, 10, 0)
    shared = prob.unroll(phi, inner, 3)
    stacked = {k: torch.stack([v, v]) for k, v in phi.items()}
    per = prob.unroll(stacked, inner, 3, per_instance=True)
    torch.testing.assert_close(per.loss, shared.loss)


def test_problem_trains_resumes_and_evaluates_against_tuned_adam():
    prob = _problem()
    cfg = MetaTrainConfig(meta_steps=3, meta_batch=2, unroll=3, inner_steps=6, eval_every=0)
    est = cfg.make_estimator()
    s0 = init_state(prob, est, cfg)
    s1, m = train_step(prob, est, cfg, s0)
    assert math.isfinite(m["meta/loss"]) and s1["step"] == 1
    s2, _ = train_step(prob, est, cfg, s1)
    again, _ = train_step(prob, est, cfg, s1)  # a step is a pure function of the state
    for k in s2["meta_params"]:
        assert torch.equal(s2["meta_params"][k], again["meta_params"][k])
    ev = prob.evaluate(s2["meta_params"])
    assert math.isfinite(ev["score"]) and 0 <= ev["win_frac"] <= 1 and ev["grad_evals"] > 0
    assert prob.describe()["kind"] == "task_distribution"
    with pytest.raises(ValueError, match="unknown problem option"):
        TaskDistributionProblem.from_config({"nope": 1}, {"core": "lopt"})
    with pytest.raises(ValueError, match="outer_split"):
        _problem(outer_split="train")


# -- tuned baselines -----------------------------------------------------------------------


def test_grid_runs_match_single_runs_and_choose_on_val():
    task = build_task(TaskSpec("wine", hidden=(8,), batch_size=16))
    fam = TaskFamily(task)
    grid = [{"lr": lr} for lr in log_grid(1e-3, 1e-1, 3)]
    run = run_grid(fam, "adam", grid, [0, 1], 20, curve_points=4)
    assert run.val.shape == (3, 2) and run.curve.shape == (3, 2, 4) and run.curve_steps[-1] == 20
    assert run.val_curve.shape == (3, 2, 4)
    torch.testing.assert_close(run.val_curve[..., -1], run.val)  # the last point is the end
    torch.testing.assert_close(run.curve[..., -1], run.test)
    single = run_grid(fam, "adam", grid[1:2], [1], 20)
    torch.testing.assert_close(single.test[0, 0], run.test[1, 1])
    assert best_setting(run) == int(torch.argmin(run.val.mean(1)))
    tie = GridRun(
        [{"lr": 0.1}, {"lr": 0.01}],
        torch.zeros(2, 1),
        torch.ones(2, 1),
        [],
        run.curve[:2],
        run.val_curve[:2],
        run.train[:2],
    )
    assert best_setting(tie) == 1  # a tie goes to the smaller learning rate
    # early stopping: seed 0 of setting 1 is lowest on val at its 2nd point, seed 1 at its
    # last; setting 0 ends lower on val but stops higher, so setting 1 is chosen
    dip = GridRun(
        [{"lr": 0.1}, {"lr": 0.01}],
        torch.tensor([[0.25, 0.25], [0.9, 0.3]]),
        torch.zeros(2, 2),
        [10, 20, 30],
        torch.tensor([[[5.0, 6.0, 7.0]] * 2, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]),
        torch.tensor([[[0.4, 0.3, 0.25]] * 2, [[0.5, 0.1, 0.9], [0.6, 0.5, 0.3]]]),
        torch.zeros(2, 2),
    )
    es = early_stopped(dip)
    assert best_setting(dip) == 0 and es.setting == 1 and es.stop_steps == [20, 30]
    torch.testing.assert_close(es.val, torch.tensor([0.1, 0.3]))
    torch.testing.assert_close(es.test, torch.tensor([2.0, 6.0]))
    with pytest.raises(ValueError, match="val curve"):
        early_stopped(single)
    wd = run_grid(
        fam,
        "adamw",
        [{"lr": 0.01, "weight_decay": 0.0}, {"lr": 0.01, "weight_decay": 1.0}],
        [0],
        20,
    )
    plain = run_grid(fam, "adam", [{"lr": 0.01}], [0], 20)
    torch.testing.assert_close(wd.val[0], plain.val[0])  # no decay: AdamW is Adam
    assert not torch.equal(wd.val[1], plain.val[0])
    mom = run_grid(fam, "momentum", [{"lr": 0.01}], [0], 5)
    assert torch.isfinite(mom.val).all()
    with pytest.raises(ValueError, match="unknown optimizer"):
        run_grid(fam, "lion", grid, [0], 2)


def test_cosine_grid_run_is_torch_adam_under_cosine_annealing():
    task = build_task(TaskSpec("wine", hidden=(8,), batch_size=16))
    fam, steps, lr = TaskFamily(task), 12, 0.05
    run = run_grid(fam, "adam", [{"lr": lr}], [3], steps, schedule="cosine")
    params = {k: v.clone().requires_grad_() for k, v in task.init_params(
        torch.Generator().manual_seed(3)).items()}  # fmt: skip
    opt = torch.optim.Adam(params.values(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.0)
    for t in range(steps):
        opt.zero_grad()
        task.loss(params, task.batch("train", t, 3)).backward()
        opt.step()
        sched.step()
    final = {k: v.detach() for k, v in params.items()}
    expected = task.loss(final, task.full_batch("val"))
    torch.testing.assert_close(run.val[0, 0], expected, rtol=1e-5, atol=1e-6)
    train = task.loss(final, task.full_batch("train"))  # the whole train split, not a batch
    torch.testing.assert_close(run.train[0, 0], train, rtol=1e-5, atol=1e-6)
    const = run_grid(fam, "adam", [{"lr": lr}], [3], steps)
    assert not torch.allclose(const.val, run.val)
    with pytest.raises(ValueError, match="unknown schedule"):
        run_grid(fam, "adam", [{"lr": lr}], [3], steps, schedule="step")


def test_evaluation_config_heldout_schedule():
    ev = EvaluationConfig(heldout_every=5)
    net = SelfReferentialNet.from_task(build_task(TaskSpec("iris", hidden=(4,))), evaluation=ev)
    assert [net.evaluation.reads_heldout(t) for t in range(6)] == [True] + [False] * 4 + [True]
    with pytest.raises(ValueError, match="heldout_every"):
        EvaluationConfig(heldout_every=-1)


def test_heldout_suite_lies_outside_the_meta_training_distribution():
    from benchmarks.lopt_heldout import SUITE

    dist = TaskDistribution()
    assert len(SUITE) >= 10 and len({t.name for t in SUITE}) == len(SUITE)
    assert not [t.name for t in SUITE if dist.contains(t.spec)]
    assert {t.horizon_mult for t in SUITE} == {2, 5}
    assert any(t.spec.activation not in dist.config.activations for t in SUITE if t.spec.hidden)
    widths = [h for t in SUITE for h in t.spec.hidden]
    assert max(widths) > dist.config.width[1] and min(widths) < dist.config.width[0]
    assert max(len(t.spec.hidden) for t in SUITE) > dist.config.depth[1]


def test_heldout_run_records_the_learned_schedule():
    """The suite's learned run records the mean log step size it took (the schedule it chose)
    at evenly spaced steps, ending on the last one; the shipped checkpoint stays finite."""
    from benchmarks.lopt_heldout import LOG_STEP_POINTS, SEEDS, SUITE, run_learned

    ht = next(t for t in SUITE if t.name == "wine-logreg")
    out = run_learned(checkpoints.load(default_checkpoint()), TaskFamily(build_task(ht.spec)), 35)
    curve = out["log_step_curve"]
    assert [t for t, _ in curve] == [*range(0, 35, 35 // LOG_STEP_POINTS), 34]
    assert all(math.isfinite(v) and -20 < v < 2 for _, v in curve)
    assert not out["diverged"] and len(out["test_per_seed"]) == 3
    # its training-loss curve: at the same steps, the first point the loss of the first
    # minibatch at the initial weights (a window of one step), mean over the seeds
    losses = out["train_loss_curve"]
    assert [t for t, _ in losses] == [t for t, _ in curve]
    fam = TaskFamily(build_task(ht.spec))
    first = fam.loss(fam.init_params(list(SEEDS)), fam.batch("train", 0, list(SEEDS))).mean()
    assert losses[0][1] == pytest.approx(float(first), rel=1e-5)
    assert losses[-1][1] < losses[0][1]  # it trains


def test_tuned_baseline_records_the_test_oracle_beside_its_val_choice():
    """``tuned`` chooses on val; its ``test_oracle`` is the tried setting with the lowest mean
    test loss (a bound for lopt_headroom), under the schedule asked for."""
    from benchmarks.lopt_heldout import SEEDS, tuned

    fam = TaskFamily(build_task(TaskSpec("wine", hidden=(8,), batch_size=16)))
    out = tuned(fam, "adam", 15, log_grid(1e-3, 1e-1, 3), None, schedule="cosine")
    lo, hi, n = out["lr_grid"]
    grid = [{"lr": lr} for lr in log_grid(lo, hi, n)]
    test = run_grid(fam, "adam", grid, list(SEEDS), 15, schedule="cosine").test.mean(1)
    o = int(torch.argmin(test))
    assert out["test_oracle"]["setting"]["lr"] == pytest.approx(grid[o]["lr"])
    assert out["test_oracle"]["test_mean"] == pytest.approx(float(test[o]), rel=1e-6)
    assert out["test_oracle"]["test_mean"] <= out["test"]["mean"]


def test_tuned_widens_off_an_edge_the_early_stopped_choice_lies_on(monkeypatch):
    """With ``widen_early_stop``, an early-stopped choice on the grid's edge widens the grid
    (the val-tuned constant choice inside it does not); without it the grid stays put."""
    import benchmarks.lopt_heldout as heldout
    from selfref.meta.baselines import EarlyStop

    def fake_grid(family, optimizer, settings, seeds, steps, curve_points, schedule):
        lr = torch.tensor([st["lr"] for st in settings])
        val = (torch.log10(lr) + 1.0).pow(2).unsqueeze(1).expand(-1, 3)  # best at 0.1
        empty = torch.zeros(len(settings), 3, 0)
        return GridRun(list(settings), val, val.clone(), [], empty, empty, val.clone())

    def fake_early_stop(run):  # the setting nearest lr 3 in log space
        d = [abs(math.log10(st["lr"]) - math.log10(3.0)) for st in run.settings]
        i = d.index(min(d))
        return EarlyStop(i, run.val[i], run.test[i], [0, 0, 0])

    monkeypatch.setattr(heldout, "run_grid", fake_grid)
    monkeypatch.setattr(heldout, "early_stopped", fake_early_stop)
    grid = log_grid(1e-2, 1.0, 3)
    plain = heldout.tuned(None, "adam", 10, grid, None)
    assert plain["lr_grid"] == [1e-2, 1.0, 3] and plain["early_stop"]["lr_on_edge"]
    wide = heldout.tuned(None, "adam", 10, grid, None, widen_early_stop=True)
    assert wide["lr_grid"][1] == pytest.approx(1e3) and wide["lr_grid"][2] == 6
    assert wide["early_stop"]["setting"]["lr"] == 1.0 and not wide["early_stop"]["lr_on_edge"]
    assert wide["setting"]["lr"] == plain["setting"]["lr"] == pytest.approx(0.1)


def test_heldout_rows_tell_underfit_losses_from_regularized_wins():
    """A row says whether the learned optimizer fit the train split less than tuned Adam; a
    cached row written before the train column gets it by rerunning only the chosen setting,
    the same number tuning measures; the summary counts losses and wins by it."""
    from benchmarks.lopt_heldout import SUITE, _fit_summary, evaluate_task, tuned

    ht = next(t for t in SUITE if t.name == "wine-logreg")
    fam = TaskFamily(build_task(ht.spec))
    ck = checkpoints.load(default_checkpoint())
    lrs = log_grid(1e-3, 1e-1, 3)
    wds = [1e-4, 1e-2]
    plan = (("adam", "adam", None), ("adamw", "adamw", wds), ("sgd_momentum", "momentum", None))
    fresh = {k: tuned(fam, opt, 12, lrs, wd) for k, opt, wd in plan}
    old = {k: {kk: vv for kk, vv in v.items() if kk != "train"} for k, v in fresh.items()}
    row = evaluate_task(ck, ht, 12, lrs, wds, cached=old)
    for k in fresh:
        assert row[k]["train"]["mean"] == pytest.approx(fresh[k]["train"]["mean"], rel=1e-6)
    assert "train" not in old["adam"]  # the cache itself is not written to
    fits = row["learned"]["train"]["mean"] > row["adam"]["train"]["mean"]
    assert row["learned_fits_less"] == fits
    rows = [
        {"learned_le_adam": False, "learned_fits_less": True},  # underfit loss
        {"learned_le_adam": False, "learned_fits_less": False},  # overfit loss
        {"learned_le_adam": True, "learned_fits_less": True},  # regularized win
        {"learned_le_adam": True, "learned_fits_less": False},
    ]
    assert _fit_summary(rows) == {"learned_train_le_adam_frac": 0.5, "underfit_losses": 1,
                                  "overfit_losses": 1, "regularized_wins": 1}  # fmt: skip
    assert _fit_summary([{"learned_le_adam": True}]) == {}  # a row from before the column


def test_heldout_baseline_cache_reuses_only_matching_rows(tmp_path):
    """``--baselines`` reuses a row's tuned baselines only where the task's spec, seeds and
    grids are this run's, and refuses a result written without the curves."""
    import json

    from benchmarks.lopt_heldout import BASELINES, cached_baselines

    base = {k: {"curve": [1.0], "test": {"mean": 0.5}} for k in BASELINES}
    spec = {"data": "wine", "horizon_mult": 2}
    cfg = {"seeds": [0, 1, 2], "lr_grid": [1e-4, 1.0, 13], "adamw_wd_grid": [1e-4, 1.0],
           "quick": False, "tasks": {"a": spec, "b": spec}}  # fmt: skip
    old = {**cfg, "tasks": {"a": spec, "b": {**spec, "horizon_mult": 5}},
           "per_task": [{"task": "a", "steps": 400, **base}, {"task": "b", "steps": 400, **base}],
           "per_task_x10": [{"task": "a", "steps": 2000, **base}]}  # fmt: skip
    f = tmp_path / "old.json"
    f.write_text(json.dumps({"config": old}))
    assert set(cached_baselines(str(f), cfg)) == {("a", 400), ("a", 2000)}  # b's spec changed
    with pytest.raises(SystemExit, match="lr_grid"):
        cached_baselines(str(f), {**cfg, "lr_grid": [1e-4, 1.0, 12]})
    old["per_task"][0]["adam"] = {"test": {"mean": 0.5}}
    f.write_text(json.dumps({"config": old}))
    with pytest.raises(SystemExit, match="curves"):
        cached_baselines(str(f), cfg)


def test_heldout_merge_recombines_parts_and_keeps_where_their_baselines_came_from(tmp_path):
    """``--merge`` of the committed result cut in two parts gives back its summaries, and
    carries the reused baselines' source and machine (one machine when the parts agree)."""
    import json

    from benchmarks.common import RESULTS_DIR
    from benchmarks.lopt_heldout import merge
    from selfref.net.optimizer import default_checkpoint

    whole = json.loads((RESULTS_DIR / "lopt_heldout.json").read_text())
    cfg = whole["config"]
    parts = []
    for i, names in enumerate((list(cfg["tasks"])[:5], list(cfg["tasks"])[5:])):
        part = {**cfg, "checkpoint": str(default_checkpoint()),
                "tasks": {k: cfg["tasks"][k] for k in names},
                "per_task": [r for r in cfg["per_task"] if r["task"] in names],
                "per_task_x10": [r for r in cfg["per_task_x10"] if r["task"] in names],
                "baselines_from": "old.json", "baselines_machine": {"cpu": "x"},
                "baselines_reused": 10}  # fmt: skip
        f = tmp_path / f"part{i}.json"
        f.write_text(json.dumps({"config": part, "metrics": {"wall_s": 1.0}}))
        parts.append(str(f))
    merge(parts, tmp_path / "merged.json")
    out = json.loads((tmp_path / "merged.json").read_text())
    for k in ("main/median_ratio_vs_adam", "x10/learned_le_adam_frac", "main/diverged_tasks"):
        assert out["metrics"][k] == whole["metrics"][k]
    assert out["metrics"]["wall_s"] == 2.0
    assert out["config"]["baselines_from"] == ["old.json"]
    assert out["config"]["baselines_machine"] == {"cpu": "x"}
    assert out["config"]["baselines_reused"] == 20


def test_selection_suite_is_outside_both_the_distribution_and_the_heldout_suite():
    """Checkpoints are chosen on the selection suite (val splits), never on the held-out one:
    the two share no data kind and no unit, and neither lies in the meta-training
    distribution."""
    from benchmarks.lopt_heldout import SUITE
    from benchmarks.lopt_select import SELECTION_SUITE, SUITES, score

    dist = TaskDistribution()
    assert SUITES["six"] == SELECTION_SUITE and SUITES["twelve"][:6] == SELECTION_SUITE
    tasks = SUITES["twelve"]
    assert len(tasks) == 12 and len({t.name for t in tasks}) == 12
    assert not [t for t in tasks if dist.contains(t.spec)]
    assert {t.spec.data for t in tasks} == set(SELECTION_SOURCES)
    assert not {t.spec.data for t in tasks} & {t.spec.data for t in SUITE}
    units = {t.spec.activation for t in tasks if t.spec.hidden}
    assert units and not units & ({t.spec.activation for t in SUITE} | set(dist.config.activations))
    for t in tasks:
        fam = TaskFamily(build_task(t.spec))
        assert torch.isfinite(fam.final_loss(fam.init_params([0]), "val", 0, [0])).all()
    assert score([(0.5, 1.0), (2.0, 1.0)]) == pytest.approx(0.0)
    assert score([(math.nan, 1.0)]) == math.inf


def test_unread_val_task_splits_val_in_two_and_never_holds_test():
    """--digits-unread: the optimizer reads (and Adam is tuned on) one half of digits' val
    split and both are scored on the other; digits' test split is nowhere in the task."""
    from benchmarks.lopt_select import unread_val_task
    from selfref.tasks import make

    task = make("digits-mlp")
    cut = unread_val_task(task)
    xv, yv = task.data["val"]
    (xa, ya), (xb, yb) = cut.data["val"], cut.data["test"]
    assert len(ya) + len(yb) == len(yv) and abs(len(ya) - len(yb)) <= 1
    rows = {tuple(r.tolist()) for r in xv}
    a, b = {tuple(r.tolist()) for r in xa}, {tuple(r.tolist()) for r in xb}
    assert a | b == rows and not a & b
    assert not (a | b) & {tuple(r.tolist()) for r in task.data["test"][0]}
    assert torch.equal(cut.data["train"][0], task.data["train"][0])
    assert set(ya.tolist()) == set(yb.tolist()) == set(yv.tolist())  # stratified
    batch = cut.batch("val", 3, 0)["x"]
    assert {tuple(r.tolist()) for r in batch} <= a
    assert task.data["test"][0] is not cut.data["test"][0]  # the original task is unchanged


def test_paired_lead_separates_a_lead_from_seed_noise():
    """The lead is the incumbent's score minus the challenger's; a challenger 10 % better on
    every seed leads by log10(1/0.9) with no spread, an identical one by 0, and one that only
    reshuffles the incumbent's seed losses gets an interval around 0 as wide as the seeds."""
    from benchmarks.lopt_select import paired_lead

    g = torch.Generator().manual_seed(0)
    inc = [(1 + 0.3 * torch.rand(6, generator=g)).tolist() for _ in range(4)]
    adam = [1.0, 0.5, 2.0, 1.0]
    better = paired_lead([(a, [0.9 * x for x in a]) for a in inc], adam)
    assert better["lead"] == pytest.approx(-math.log10(0.9))
    assert better["lead_p05"] == pytest.approx(better["lead_p95"])
    assert better["frac_positive"] == 1.0
    same = paired_lead([(a, list(a)) for a in inc], adam)
    assert same["lead"] == 0.0 and same["frac_positive"] == 0.0
    shuffled = paired_lead([(a, list(reversed(a))) for a in inc], adam)
    assert shuffled["lead"] == pytest.approx(0.0, abs=1e-12)
    assert shuffled["lead_p05"] < -0.005 and shuffled["lead_p95"] > 0.005
    assert 0.2 < shuffled["frac_positive"] < 0.8


def test_digits_row_keeps_the_scored_loss_of_every_seed():
    """The digits part records each seed's scored loss (the unread half's with ``unread``),
    whose mean is the score's learned loss, so its lead can be bootstrapped over seeds."""
    from benchmarks.lopt_select import digits_row

    row = digits_row(str(default_checkpoint()), budget=48, seeds=(0, 1), unread=True)
    assert row["seeds"] == [0, 1] and len(row["learned_scored_per_seed"]) == 2
    assert sum(row["learned_scored_per_seed"]) / 2 == pytest.approx(row["learned_test"])
    ratio = row["learned_test"] / row["adam_scored"]
    assert row["digits_score"] == pytest.approx(math.log10(ratio))


def test_digits_row_with_two_folds_scores_both_halves_and_averages_them():
    """--digits-folds 2: the first fold is the one-split row as it was; the second reads the
    half the first is scored on (checked by a run on the swapped task made here) with its own
    tuned Adam; the row's per-seed loss and its score are the folds' means."""
    from benchmarks.lopt_select import digits_row, unread_val_task
    from selfref.budget import Budget
    from selfref.methods.learned import SelfRefMethod
    from selfref.tasks import make

    ck = str(default_checkpoint())
    one = digits_row(ck, budget=48, seeds=(0, 1), unread=True)
    two = digits_row(ck, budget=48, seeds=(0, 1), unread=True, folds=2)
    first, second = two["folds"]
    assert first["learned_scored_per_seed"] == one["learned_scored_per_seed"]
    swapped = unread_val_task(make("digits-mlp"), swap=True)
    run = SelfRefMethod(checkpoint=ck).run(swapped, Budget(48, 100), seed=1)
    assert second["learned_scored_per_seed"][1] == pytest.approx(run.test_loss)
    assert second["learned_val"] != pytest.approx(first["learned_val"])
    assert two["learned_scored_per_seed"] == pytest.approx(
        [
            (a + b) / 2
            for a, b in zip(first["learned_scored_per_seed"], second["learned_scored_per_seed"])
        ]
    )
    adam = (first["adam_scored"] + second["adam_scored"]) / 2
    assert two["digits_score"] == pytest.approx(math.log10(two["learned_test"] / adam))
    with pytest.raises(ValueError, match="unread"):
        digits_row(ck, budget=48, seeds=(0,), folds=2)


def test_unread_val_task_swap_exchanges_the_halves():
    """The second fold of ``--digits-folds 2`` reads the half the first is scored on, val
    minibatches included, and is scored on the half the first reads."""
    from benchmarks.lopt_select import unread_val_task
    from selfref.tasks import make

    task = make("digits-mlp")
    ab, ba = unread_val_task(task), unread_val_task(task, swap=True)
    assert torch.equal(ab.data["val"][0], ba.data["test"][0])
    assert torch.equal(ab.data["test"][1], ba.data["val"][1])
    assert ba.data["train"][0] is ab.data["train"][0]
    half_b = {tuple(r.tolist()) for r in ab.data["test"][0]}
    assert {tuple(r.tolist()) for r in ba.batch("val", 3, 0)["x"]} <= half_b
    assert not {tuple(r.tolist()) for r in ab.batch("val", 3, 0)["x"]} & half_b


@pytest.mark.parametrize("shipped", ["lopt_v2.pt", "lopt.pt"])
def test_ablation_turns_off_exactly_one_output_of_the_shipped_core(shipped):
    """lopt_ablation's variants zero one last-layer row of φ: that output reads 0 (no
    direction correction, or A_T never moves) and the others are as meta-trained; the decay
    variants hold λ_T at its meta-learned start, or at the floor. In the shipped ensemble
    (lopt.pt) a variant turns the same output off in every member; v2 is one lopt core."""
    from benchmarks.lopt_ablation import DECAY_VARIANTS, VARIANTS, ablated, variants_of

    ck = checkpoints.load(default_checkpoint().with_name(shipped))
    pre = "core.m1." if ck["net"]["core"] == "ensemble" else "core."
    fam = TaskFamily(build_task(TaskSpec("wine", hidden=(8,), batch_size=16)))
    task = fam.task

    def metrics(c: dict) -> dict:
        net = SelfReferentialNet.from_description(task, c["net"])
        phi = checkpoints.meta_params_of(c, "best")
        params = fam.init_params([0])
        state = vmap(lambda p: net.init_state(phi, p, horizon=10))(params)
        with torch.no_grad():
            for t in range(3):
                b = fam.batch("train", t, [0])
                if net.evaluation.reads_heldout(t):
                    b = {**b, "heldout": fam.batch("val", t, [0])}
                params, state, m = net.step_many(phi, params, state, b)
        return {k: float(v.mean()) for k, v in m.items()}

    full, no_dir, no_adapt = (metrics(ablated(ck, v)) for v in ("full", "no_dir", "no_adapt"))
    assert full["lopt/dir_abs_mean"] > 0 and no_dir["lopt/dir_abs_mean"] == 0
    assert full["lopt/adapt_mean"] != 0 and no_adapt["lopt/adapt_mean"] == 0
    assert no_adapt["lopt/dir_abs_mean"] == pytest.approx(full["lopt/dir_abs_mean"], rel=0.5)
    before = checkpoints.meta_params_of(ck, "best")[f"{pre}mlp.w_out"].clone()
    assert float(checkpoints.meta_params_of(ablated(ck, "no_dir"), "best")[f"{pre}mlp.w_out"][0]
                 .abs().sum()) == 0  # fmt: skip
    ablated(ck, "no_mag")
    assert torch.equal(checkpoints.meta_params_of(ck, "best")[f"{pre}mlp.w_out"], before)
    assert set(VARIANTS) == {"full", "no_dir", "no_mag", "no_offset", "no_adapt"}
    with pytest.raises(ValueError, match="unknown variant"):
        ablated(ck, "no_lr")
    # the shipped core has the held-out decay: its log λ_T moved with the read at step 0
    assert variants_of(ck) == [*VARIANTS, *DECAY_VARIANTS]
    phi = checkpoints.meta_params_of(ck, "best")
    starts = [float(v) for k, v in phi.items() if k.endswith("decay.log_init")]
    start = sum(starts) / len(starts)  # the members' mean in an ensemble
    fixed, off = metrics(ablated(ck, "fixed_decay")), metrics(ablated(ck, "no_decay"))
    assert full["lopt/log_decay_mean"] != pytest.approx(start)
    assert fixed["lopt/log_decay_mean"] == pytest.approx(start)
    assert off["lopt/log_decay_mean"] == pytest.approx(math.log(1e-4))
    v1 = checkpoints.load(default_checkpoint().with_name("lopt_v1.pt"))
    assert variants_of(v1) == list(VARIANTS)  # no decay there


def test_lopt_adapt_rate_zero_keeps_the_accumulated_offset_at_zero():
    """``adapt_rate=0``: the controller never moves A_T (what lopt_ablation's ``no_adapt``
    does to a trained φ), however its rate head reads; a negative rate is refused."""
    core = LoptCore(feature_dim=3, base_index=1, param_index=-1, out_init=1.0, adapt_rate=0.0)
    phi = core.init_meta_params(torch.Generator().manual_seed(0))
    params = {"a": torch.zeros(4), "b": torch.zeros(2, 3)}
    state = core.init_state(phi, params)
    for t in range(3):
        feats = {k: torch.randn(*v.shape, 3, generator=torch.Generator().manual_seed(t))
                 for k, v in params.items()}  # fmt: skip
        _, state, m = core(phi, feats, state)
        assert torch.equal(state["adapt"], torch.zeros_like(state["adapt"]))
        assert float(m["lopt/offset_mean"]) != 0  # the immediate offset still acts
    with pytest.raises(ValueError, match="adapt_rate"):
        LoptCore(adapt_rate=-0.1)


def test_mup_log_scales_follow_mups_adam_rule():
    """μP for Adam: input weights and vector-like tensors unscaled, hidden and output weights
    ∝ 1/fan_in (fan_in = numel / shape[0], so a conv kernel's counts its receptive field)."""
    mlp = [(16, 5), (16,), (16, 16), (16,), (3, 16), (3,)]  # input, hidden, output layers
    assert mup_log_scales(mlp, 16.0) == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    scales = mup_log_scales(mlp, 4.0)
    assert scales[0] == 0.0 and scales[1] == scales[3] == scales[5] == 0.0
    assert scales[2] == pytest.approx(math.log(4 / 16)) and scales[4] == scales[2]
    conv = [(8,), (8, 3, 3, 3), (8, 8, 3, 3)]  # a leading bias is not the input layer
    assert mup_log_scales(conv, 72.0) == [0.0, 0.0, 0.0]
    assert mup_log_scales([(10, 7)], 1.0) == [0.0]  # logistic regression: input layer only


def test_lopt_step_scale_mup_scales_each_tensors_step_and_decay():
    """An untrained core with ``step_scale="mup"`` takes the plain core's step (Adam's, with
    the decoupled decay) times base_fan_in / fan_in on the hidden and output weights and the
    same step elsewhere; φ is the same, so it is a config edit of any meta-trained core."""
    opts = dict(feature_dim=5, base_index=1, param_index=2, decay_index=4, out_init=0.0)
    plain, scaled = LoptCore(**opts), LoptCore(step_scale="mup", base_fan_in=8.0, **opts)
    phi = plain.init_meta_params(torch.Generator().manual_seed(0))
    assert {k: v.shape for k, v in scaled.init_meta_params(torch.Generator()).items()} == {
        k: v.shape for k, v in phi.items()
    }
    gen = torch.Generator().manual_seed(3)
    shapes = {"l0.w": (4, 6), "l0.b": (4,), "l1.w": (32, 4), "l2.w": (2, 32)}
    params = {k: torch.randn(*s, generator=gen) for k, s in shapes.items()}
    feats = {k: torch.randn(*s, 5, generator=gen) for k, s in shapes.items()}
    for k, v in params.items():
        feats[k][..., 2] = v  # θ, which the decay shrinks

    def step(core):
        return core(phi, feats, core.init_state(phi, params))[0]

    ref, got = step(plain), step(scaled)
    expect = {"l0.w": 1.0, "l0.b": 1.0, "l1.w": 8.0 / 4, "l2.w": 8.0 / 32}
    for k, factor in expect.items():
        torch.testing.assert_close(got[k], factor * ref[k])
    up = step(LoptCore(step_scale="mup_up", base_fan_in=8.0, **opts))  # only enlarges
    for k, factor in expect.items():
        torch.testing.assert_close(up[k], max(factor, 1.0) * ref[k])
    with pytest.raises(ValueError, match="step_scale"):
        LoptCore(step_scale="ntk")
    with pytest.raises(ValueError, match="base_fan_in"):
        LoptCore(step_scale="mup", base_fan_in=0.0)


def test_round28_activations_are_drawn_built_and_keep_both_suites_outside():
    """Round 28's recipe samples seven hidden units; each new one builds a finite task, and
    neither the held-out nor the selection suite falls inside the widened distribution."""
    from benchmarks.lopt_heldout import SUITE
    from benchmarks.lopt_select import SUITES
    from selfref.commands.meta_train import load_spec_file

    spec = load_spec_file("experiments/rounds/round28_recipe.toml")
    config = DistributionConfig.from_dict(spec["problem"]["distribution"])
    new = {"softsign", "hardtanh", "relu6", "sin"}
    assert set(config.activations) == {"relu", "tanh", "sigmoid"} | new
    dist = TaskDistribution(config)
    specs = [dist.sample(s) for s in range(120)]
    assert {s.activation for s in specs if s.hidden} == set(config.activations)
    for unit in sorted(new):
        s = next(s for s in specs if s.hidden and s.activation == unit)
        fam = TaskFamily(build_task(s))
        assert torch.isfinite(fam.final_loss(fam.init_params([0]), "val", 0, [0])).all()
    tasks = list(SUITE) + list(SUITES["twelve"])
    assert not [t.name for t in tasks if dist.contains(t.spec)]


def test_suites_are_checked_against_each_checkpoints_own_distribution():
    from benchmarks.lopt_heldout import SUITE, training_distributions

    wide = DistributionConfig(sources=("wine",), source_weights=(1.0,), batch_sizes=(8,))
    ck = {"problem": {"kind": "task_distribution", "distribution": wide.to_dict()}}
    dists = training_distributions([ck, {"problem": {"kind": "quadratic"}}])
    assert len(dists) == 2 and dists[1].config == wide
    assert [t.name for t in SUITE if any(d.contains(t.spec) for d in dists)] == ["wine-logreg"]
    assert not [t.name for t in SUITE if dists[0].contains(t.spec)]


def test_digits_pool_train_keeps_meta_training_clear_of_the_digits_tasks_val_and_test():
    from dataclasses import replace

    from sklearn.datasets import load_digits

    from selfref.tasks.digits import digits_split_indices
    from selfref.tasks.distribution import _raw_data

    idx = digits_split_indices(0)
    assert sorted(map(len, idx.values())) == [359, 360, 1078]
    assert len(set().union(*map(set, idx.values()))) == 1797
    held = load_digits().data[np.concatenate([idx["val"], idx["test"]])]
    held_rows = {r.tobytes() for r in held} - {
        r.tobytes() for r in load_digits().data[idx["train"]]
    }
    config = DistributionConfig(digits_pool="train")
    clean, full = TaskDistribution(config), TaskDistribution()
    specs = [clean.sample(s) for s in range(40)]
    assert [replace(s, digits_pool="all") for s in specs] == [full.sample(s) for s in range(40)]
    digits = [s for s in specs if s.data == "digits"]
    assert digits and all(s.digits_pool == "train" for s in digits)
    assert TaskSpec.from_dict(digits[0].to_dict()) == digits[0]
    assert "digits_pool" not in full.sample(0).to_dict()  # old spec dicts stay as they were
    for s in digits[:3]:
        x, _ = _raw_data("digits", s.data_seed, 0, 0, s.n_classes, 1.0, "train")
        assert not {r.tobytes() for r in x} & held_rows
        x_all, _ = _raw_data("digits", s.data_seed, 0, 0, s.n_classes, 1.0, "all")
        assert {r.tobytes() for r in x_all} & held_rows
    assert (
        build_task(digits[0]).data["train"][0].shape[0]
        < build_task(replace(digits[0], digits_pool="all")).data["train"][0].shape[0]
    )
    with pytest.raises(ValueError, match="digits_pool"):
        DistributionConfig(digits_pool="test")
    with pytest.raises(ValueError, match="digits_pool"):
        TaskSpec("digits", digits_pool="val")
