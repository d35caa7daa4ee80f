"""selfref.meta.estimators: unbiasedness of ES and PES, one smoke test for every estimator,
cost accounting, and each estimator meta-training a toy problem through the one trainer.

All in float64 on the toy problems of :mod:`selfref.meta.problems.toy`, whose exact
full-horizon gradient is one autograd pass. Statistical checks compare the mean of R
independent estimates with the exact gradient within 4 standard errors of that mean, and
require the standard error to be small against the gradient, so that a biased estimator
fails them (the truncated estimators do, on influence balancing).
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from selfref.meta.estimators import (
    ESTIMATORS,
    estimator_names,
    estimator_options,
    make_estimator,
)
from selfref.meta.estimators.antithetic import (
    pair_estimate,
    particle_params,
    repeat_inner,
    sample_pairs,
)
from selfref.meta.problem import Inner, Truncation
from selfref.meta.problems import LearnedOptimizerProblem
from selfref.meta.problems.toy import InfluenceBalancing, QuadraticLearningRate
from selfref.meta.trainer import MetaTrainConfig, MetaTrainer
from selfref.net import SelfReferentialNet
from selfref.tasks import make

ES_FAMILY = ("es", "truncated_es", "pes")


def _exact_grad(problem, phi, horizon):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items()}
    loss = problem.full_loss(leaves, horizon)
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def _trajectory_estimate(est, problem, phi, seed, horizon):
    """One trajectory's worth of estimates at a fixed φ: the sum over its truncations
    (one estimate for the full-horizon estimators)."""
    gen = torch.Generator().manual_seed(seed)
    state = est.init(problem, phi, gen, 0)
    total = {k: torch.zeros_like(v) for k, v in phi.items()}
    steps = 1 if est.name in ("es", "full_bptt") else math.ceil(horizon / est.unroll)
    for s in range(steps):
        e = est.estimate(
            problem, phi, state, torch.Generator().manual_seed(seed * 1000 + s), horizon, s
        )
        state = e.state
        total = {k: total[k] + e.grads[k] for k in total}
    return total


def _mean_and_se(samples):
    """Per key: mean and standard error of the mean over the R samples."""
    out = {}
    for k in samples[0]:
        x = torch.stack([s[k] for s in samples])  # (R, *shape)
        out[k] = (x.mean(0), x.std(0) / math.sqrt(len(samples)))
    return out


PROBLEMS = {
    # exactly quadratic in θ: smoothing does not move the gradient, any σ is exact
    "influence": (lambda: InfluenceBalancing(eval_steps=40), 40, 4, 0.1),
    # smooth in log lr: σ small enough that the O(σ²) smoothing bias is far below the SE
    "quadratic_lr": (
        lambda: QuadraticLearningRate(dim=4, h_min=0.05, segments=3, lr0=0.5, eval_steps=12),
        12,
        3,
        1e-3,
    ),
}


@pytest.mark.parametrize("estimator", ["es", "pes"])
@pytest.mark.parametrize("problem_name", list(PROBLEMS))
def test_es_and_pes_are_unbiased(estimator, problem_name):
    """The mean of R estimates (PES: each summed over the K-step truncations of one
    trajectory) equals the exact full-horizon gradient within 4 standard errors."""
    build, horizon, k, sigma = PROBLEMS[problem_name]
    problem = build()
    phi = problem.init_meta_params(torch.Generator().manual_seed(0))
    exact = _exact_grad(problem, phi, horizon)
    opts = {"sigma": sigma, "particles": 1000, "meta_batch": 1}
    if estimator == "pes":
        opts["unroll"] = k
    est = make_estimator(estimator, **opts)
    samples = [_trajectory_estimate(est, problem, phi, r, horizon) for r in range(30)]
    for key, (mean, se) in _mean_and_se(samples).items():
        g = exact[key]
        assert float(se.max()) < 0.05 * float(g.norm()), "too few particles to test anything"
        assert torch.all((mean - g).abs() <= 4 * se + 1e-12 * g.norm()), (key, mean, g, se)


def test_pes_sum_over_truncations_matches_full_bptt_of_the_same_trajectory():
    """Σ_τ PES ĝ_τ over one trajectory's K-step truncations against the engine's full BPTT
    of the same trajectory (the smoothed objective's gradient is the exact one here)."""
    problem = InfluenceBalancing(eval_steps=60)
    phi = problem.init_meta_params(torch.Generator().manual_seed(0))
    full = make_estimator("full_bptt", meta_batch=1)
    ref = full.estimate(problem, phi, {}, torch.Generator().manual_seed(0), 60, 0).grads
    torch.testing.assert_close(ref["theta"], _exact_grad(problem, phi, 60)["theta"])
    pes = make_estimator("pes", sigma=0.1, particles=200, unroll=6, meta_batch=5)
    samples = [_trajectory_estimate(pes, problem, phi, r, 60) for r in range(20)]
    mean, se = _mean_and_se(samples)["theta"]
    assert float(se) < 0.05 * float(ref["theta"].abs())
    assert float((mean - ref["theta"]).abs()) <= 4 * float(se)


@pytest.mark.parametrize("estimator", ["tbptt", "truncated_es"])
def test_truncated_estimators_point_the_wrong_way_on_influence_balancing(estimator):
    """The statistical check above has power: with short truncations, truncated BPTT and
    truncated ES estimate the short-horizon gradient, of the opposite sign (Vicol et al.
    2021, §5.1)."""
    problem = InfluenceBalancing(eval_steps=100)
    phi = problem.init_meta_params(torch.Generator().manual_seed(0))
    exact = float(_exact_grad(problem, phi, 100)["theta"])
    opts = {"unroll": 5, "meta_batch": 1}
    if estimator == "truncated_es":
        opts.update(sigma=0.1, particles=200)
    est = make_estimator(estimator, **opts)
    samples = [_trajectory_estimate(est, problem, phi, r, 100) for r in range(5)]
    mean, se = _mean_and_se(samples)["theta"]
    assert exact > 0 and float(mean) < 0
    assert float((mean - exact).abs()) > 10 * float(se)


# -- one smoke test for every registered estimator -----------------------------------------


def _smoke_options(name):
    """Small settings for whichever of the shared options the estimator takes."""
    wanted = {"unroll": 3, "meta_batch": 2, "particles": 4, "sigma": 0.05}
    return {k: v for k, v in wanted.items() if k in estimator_options(name)}


def _learned_optimizer_problem():
    task = make("quadratic", dtype=torch.float64)
    net = SelfReferentialNet.from_task(task, output_scale=0.5)
    return LearnedOptimizerProblem(net, eval_tasks=2, eval_steps=4)


SMOKE_PROBLEMS = {
    "quadratic_lr": lambda: QuadraticLearningRate(dim=3, segments=2, eval_steps=8),
    "learned_optimizer": _learned_optimizer_problem,
}


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("problem_name", list(SMOKE_PROBLEMS))
@pytest.mark.parametrize("name", estimator_names())
def test_every_estimator_smoke(name, problem_name):
    """Finite grads shaped like φ, positive cost, and a state that survives
    torch.save/torch.load(weights_only=True) and continues identically."""
    problem = SMOKE_PROBLEMS[problem_name]()
    phi = problem.init_meta_params(torch.Generator().manual_seed(0))
    est = make_estimator(name, **_smoke_options(name))
    state = est.init(problem, phi, torch.Generator().manual_seed(1), 0)
    horizon = 8
    for step in range(3):  # the third estimate passes the horizon of the truncated ones
        e = est.estimate(
            problem, phi, state, torch.Generator().manual_seed(10 + step), horizon, step
        )
        assert e.grads.keys() == phi.keys()
        for k, g in e.grads.items():
            assert g.shape == phi[k].shape and g.dtype == phi[k].dtype, k
            assert bool(torch.isfinite(g).all()), k
        assert sum(float(g.abs().sum()) for g in e.grads.values()) > 0
        assert math.isfinite(e.meta_loss) and e.grad_evals > 0
        loaded = _roundtrip(e.state)
        a = est.estimate(
            problem, phi, e.state, torch.Generator().manual_seed(99), horizon, step + 1
        )
        b = est.estimate(problem, phi, loaded, torch.Generator().manual_seed(99), horizon, step + 1)
        _assert_same(a.grads, b.grads)
        state = e.state


@pytest.mark.parametrize("name", ES_FAMILY)
def test_es_options_are_checked(name):
    base = _smoke_options(name)
    bads = (
        {"particles": 3},
        {"particles": 0},
        {"particles": 4.0},
        {"sigma": 0.0},
        {"sigma": "0.1"},
        {"meta_batch": 0},
    )
    for bad in bads:
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_estimator(name, **{**base, **bad})
    with pytest.raises(ValueError, match="valid"):
        make_estimator(name, sigmaa=0.1)


def test_registry_lists_the_evolution_strategies():
    assert {"tbptt", "full_bptt", "es", "truncated_es", "pes"} <= set(ESTIMATORS)


class _RowlessProblem:
    """A carry without one row per trajectory (as a sequence problem keeps it)."""

    name = "rowless"
    device = torch.device("cpu")
    dtype = torch.float64

    def init_meta_params(self, generator):
        return {"w": torch.zeros(2, dtype=torch.float64)}

    def describe(self):
        return {"kind": self.name}

    def init_inner(self, meta_params, generator, n, horizon, step):
        return Inner({"step": torch.tensor(step)}, [0], 0, 1)

    def unroll(self, meta_params, inner, length, per_instance=False):  # pragma: no cover
        return Truncation(torch.zeros(1), inner, 0.0)

    def evaluate(self, meta_params):  # pragma: no cover
        return {"score": 0.0}


@pytest.mark.parametrize("name", ES_FAMILY)
def test_es_family_refuses_a_carry_without_rows(name):
    p = _RowlessProblem()
    est = make_estimator(name, **_smoke_options(name))
    phi = p.init_meta_params(torch.Generator())
    state = est.init(p, phi, torch.Generator(), 0)
    with pytest.raises(ValueError, match="one row per trajectory.*tbptt"):
        est.estimate(p, phi, state, torch.Generator(), 1, 0)


# -- the antithetic layout and the PES accumulator ------------------------------------------


def test_antithetic_layout_and_estimate_match_a_loop():
    phi = {
        "a": torch.tensor([1.0, 2.0], dtype=torch.float64),
        "b": torch.zeros(2, 3, dtype=torch.float64),
    }
    b, q, sigma = 3, 2, 0.1
    eps = sample_pairs(phi, torch.Generator().manual_seed(0), b, q, sigma)
    parts = particle_params(phi, eps)
    losses = torch.randn(2 * b * q, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads, delta = pair_estimate(losses, eps, b, q, sigma)
    for k in phi:
        want = torch.zeros_like(phi[k])
        for i in range(b):
            for j in range(q):
                row = (i * q + j) * 2
                torch.testing.assert_close(parts[k][row], phi[k] + eps[k][i, j])
                torch.testing.assert_close(parts[k][row + 1], phi[k] - eps[k][i, j])
                want += eps[k][i, j] * (losses[row] - losses[row + 1]) / (2 * sigma**2)
        torch.testing.assert_close(grads[k], want / (b * q))
    inner = Inner({"x": torch.arange(3.0).reshape(3, 1)}, [7, 8, 9], 2, 5)
    rep = repeat_inner(inner, 4, QuadraticLearningRate())
    assert rep.seeds == [7] * 4 + [8] * 4 + [9] * 4 and (rep.t, rep.horizon) == (2, 5)
    assert rep.data["x"].flatten().tolist() == [0.0] * 4 + [1.0] * 4 + [2.0] * 4


def test_pes_accumulates_xi_and_resets_it_with_the_trajectory():
    problem = QuadraticLearningRate(dim=3, segments=2, eval_steps=6)
    phi = problem.init_meta_params(torch.Generator().manual_seed(0))
    pes = make_estimator("pes", sigma=0.1, particles=4, unroll=3, meta_batch=2)
    s0 = pes.init(problem, phi, torch.Generator(), 0)
    e1 = pes.estimate(problem, phi, s0, torch.Generator().manual_seed(1), 6, 0)
    e2 = pes.estimate(problem, phi, e1.state, torch.Generator().manual_seed(2), 6, 1)
    eps2 = sample_pairs(phi, torch.Generator().manual_seed(2), 2, 2, 0.1)  # no reset: ε only
    torch.testing.assert_close(e2.state["xi"]["log_lr"], e1.state["xi"]["log_lr"] + eps2["log_lr"])
    assert e2.state["inner"]["t"] == 6  # the horizon is reached: the next estimate resets
    e3 = pes.estimate(problem, phi, e2.state, torch.Generator().manual_seed(3), 6, 2)
    fresh = pes.estimate(problem, phi, s0, torch.Generator().manual_seed(3), 6, 2)
    _assert_same(e3.grads, fresh.grads)
    _assert_same(e3.state["xi"], fresh.state["xi"])
    assert e3.state["inner"]["t"] == 3


def test_cost_is_forward_only_for_the_evolution_strategies():
    """One gradient evaluation per inner step and trajectory; BPTT adds the backward."""
    problem = QuadraticLearningRate(dim=3, eval_steps=12)
    phi = problem.init_meta_params(torch.Generator().manual_seed(0))
    b, p, k, t = 2, 6, 3, 12
    want = {
        "tbptt": 2 * b * k,
        "full_bptt": 2 * b * t,
        "es": b * p * t,
        "truncated_es": b * (p + 1) * k,  # the particles and the unperturbed carry
        "pes": b * p * k,
    }
    for name, cost in want.items():
        opts = {"unroll": k, "meta_batch": b, "particles": p, "sigma": 0.1}
        est = make_estimator(
            name, **{o: v for o, v in opts.items() if o in estimator_options(name)}
        )
        e = est.estimate(
            problem, phi, est.init(problem, phi, torch.Generator(), 0), torch.Generator(), t, 0
        )
        assert e.grad_evals == cost, name


# -- through the one trainer ----------------------------------------------------------------


def _config(name, **kw):
    opts = {"particles": 8, "sigma": 0.05}
    return MetaTrainConfig(
        meta_steps=kw.pop("meta_steps", 24),
        estimator=name,
        estimator_options={k: v for k, v in opts.items() if k in estimator_options(name)},
        unroll=5,
        inner_steps=40,
        meta_batch=2,
        meta_lr=0.1,
        eval_every=0,
        checkpoint_every=0,
        **kw,
    )


@pytest.mark.parametrize("name", estimator_names())
def test_meta_trainer_with_each_estimator_lowers_the_toy_objective(name):
    problem = QuadraticLearningRate(dim=4, segments=1, lr0=0.01, eval_steps=40)
    phi0 = problem.init_meta_params(torch.Generator().manual_seed(0))
    before = problem.evaluate(phi0)["score"]
    res = MetaTrainer(problem, _config(name)).train()
    after = problem.evaluate(res.meta_params)["score"]
    assert after < 0.8 * before, (before, after)
    assert res.meta_train_grad_evals > 0 and res.skipped == 0


@pytest.mark.parametrize("name", ES_FAMILY)
def test_meta_trainer_resume_continues_bit_for_bit(name, tmp_path):
    problem = QuadraticLearningRate(dim=4, segments=2, lr0=0.01, eval_steps=40)
    full = MetaTrainer(problem, _config(name, meta_steps=12)).train()
    first = MetaTrainer(problem, _config(name, meta_steps=7))
    first.train()
    path = first.save(path=tmp_path / "last.pt")
    second = MetaTrainer(problem, _config(name, meta_steps=12))
    second.resume(path)
    _assert_same(second.train().meta_params, full.meta_params)
