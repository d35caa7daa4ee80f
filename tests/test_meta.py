"""selfref.meta: meta-gradients, guard rails, determinism, resume, and "does it learn"."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import vmap

from selfref.logging import MemoryLogger
from selfref.meta import (
    Inner,
    LearnedOptimizerProblem,
    MetaTrainConfig,
    MetaTrainer,
    TaskFamily,
    rollout_baseline,
    rollout_learned,
    unroll,
)
from selfref.meta.estimators.tbptt import TruncatedBPTT
from selfref.net import AnalyzerConfig, EvaluationConfig, SelfReferentialNet
from selfref.tasks import make


def _setup(second_order=False, task="quadratic", **task_kw):
    t = make(task, dtype=torch.float64, **task_kw)
    net = SelfReferentialNet.from_task(
        t,
        evaluation=EvaluationConfig(second_order=second_order),
        analyzer=AnalyzerConfig(momentum_decays=(0.7,)),
        output_scale=0.5,  # large enough updates that every step matters
    )
    phi = {
        k: v.double().requires_grad_(True)
        for k, v in net.init_meta_params(torch.Generator().manual_seed(0)).items()
    }
    fam = TaskFamily(t)
    seeds = [11, 12]
    theta = fam.init_params(seeds)
    if task == "quadratic":  # start away from θ0 = 0 so the first step's features vary
        theta = {"theta": theta["theta"] + 0.3}
    state = vmap(net.init_state, in_dims=(None, 0))(phi, theta)
    return net, phi, fam, seeds, theta, state


def _meta_loss(net, phi, fam, seeds, theta, state, steps=3, mode="vmap", meta_loss="sum"):
    return unroll(
        net,
        phi,
        theta,
        state,
        lambda t: fam.batch("train", t, seeds),
        0,
        steps,
        meta_loss=meta_loss,
        mode=mode,
    )


def _fd_check(loss_fn, phi, grads, seed=5):
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        v = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in phi.items()}
        analytic = sum((gr * v[k]).sum() for gr, k in zip(grads, phi))
        eps = 1e-6
        with torch.no_grad():
            plus = {k: p + eps * v[k] for k, p in phi.items()}
            minus = {k: p - eps * v[k] for k, p in phi.items()}
        numeric = (loss_fn(plus) - loss_fn(minus)) / (2 * eps)
        torch.testing.assert_close(analytic.detach(), numeric.detach(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("meta_loss", ["sum", "log_sum"])
def test_exact_meta_gradient_matches_central_differences(meta_loss):
    """second_order=True: the meta-gradient is the exact derivative of the meta-loss."""
    net, phi, fam, seeds, theta, state = _setup(second_order=True)
    out = _meta_loss(net, phi, fam, seeds, theta, state, meta_loss=meta_loss)
    grads = torch.autograd.grad(out.meta_loss, list(phi.values()))

    def loss_fn(p):
        return _meta_loss(net, p, fam, seeds, theta, state, meta_loss=meta_loss).meta_loss

    _fd_check(loss_fn, phi, grads)


@pytest.mark.parametrize("meta_loss", ["sum", "log_sum"])
def test_detached_meta_gradient_matches_differences_of_fixed_gradient_surrogate(meta_loss):
    """Paper default: ∇θQ detached, i.e. the exact derivative of the surrogate in which the
    analyzer's gradient inputs are the constants met along the current trajectory."""
    net, phi, fam, seeds, theta, state = _setup(second_order=False)
    out = _meta_loss(net, phi, fam, seeds, theta, state, meta_loss=meta_loss)
    grads = torch.autograd.grad(out.meta_loss, list(phi.values()))
    # record the gradients met along the trajectory at phi (independent reference loop)
    from selfref.net.network import split_meta_params

    def run(p, recorded=None):
        core_phi, _ = split_meta_params(p)
        th, an, cs = dict(theta), state["analyzer"], state["core"]
        rec, total = [], 0.0
        for t in range(3):
            b = fam.batch("train", t, seeds)
            if recorded is None:
                gr = {k: v.detach() for k, v in vmap(torch.func.grad(fam.task.loss))(th, b).items()}
                rec.append(gr)
            else:
                gr = recorded[t]

            def mod(th_i, g_i, an_i, cs_i):
                f, an_i = net.analyzer(th_i, g_i, an_i)
                new, _, cs_i, _ = net.modifier(core_phi, th_i, f, cs_i)
                return new, an_i, cs_i

            th, an, cs = vmap(mod)(th, gr, an, cs)
            q = fam.loss(th, fam.batch("train", t + 1, seeds))
            total = total + (q if meta_loss == "sum" else torch.log(q))
        return total.mean(), rec

    ref_loss, recorded = run(phi)
    torch.testing.assert_close(ref_loss, out.meta_loss)
    _fd_check(lambda p: run(p, recorded)[0], phi, grads)


def test_detached_and_second_order_gradients_differ():
    a = _setup(False)
    b = _setup(True)
    ga = torch.autograd.grad(_meta_loss(*a).meta_loss, list(a[1].values()))
    gb = torch.autograd.grad(_meta_loss(*b).meta_loss, list(b[1].values()))
    assert any(not torch.allclose(x, y) for x, y in zip(ga, gb))


def test_gradients_reach_every_meta_parameter():
    net, phi, fam, seeds, theta, state = _setup(task="digits-mlp", hidden=4, batch_size=8)
    out = _meta_loss(net, phi, fam, seeds, theta, state)
    grads = torch.autograd.grad(out.meta_loss, list(phi.values()), allow_unused=True)
    dead = [k for k, g in zip(phi, grads) if g is None or not bool(g.abs().sum() > 0)]
    assert not dead


def test_vmap_and_loop_modes_agree():
    net, phi, fam, seeds, theta, state = _setup()
    a = _meta_loss(net, phi, fam, seeds, theta, state, mode="vmap")
    b = _meta_loss(net, phi, fam, seeds, theta, state, mode="loop")
    torch.testing.assert_close(a.meta_loss, b.meta_loss)
    torch.testing.assert_close(a.params["theta"], b.params["theta"])
    ga = torch.autograd.grad(a.meta_loss, list(phi.values()))
    gb = torch.autograd.grad(b.meta_loss, list(phi.values()))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


def test_meta_loss_is_sum_of_post_update_losses():
    net, phi, fam, seeds, theta, state = _setup()
    out = _meta_loss(net, phi, fam, seeds, theta, state, steps=4)
    assert out.losses.shape == (2, 5)
    torch.testing.assert_close(out.meta_loss.detach(), out.losses[:, 1:].sum(1).mean())


def test_truncation_carries_state_and_resets_at_horizon():
    net, phi, *_ = _setup()
    problem = LearnedOptimizerProblem(net)
    est = TruncatedBPTT(unroll=3, meta_batch=2)
    g = torch.Generator().manual_seed(0)
    e1 = est.estimate(problem, phi, est.init(problem, phi, g, 0), g, horizon=5, step=0)
    i1 = Inner.from_dict(e1.state["inner"])
    assert i1.t == 3 and e1.grad_evals == 2 * 6  # 6 forward steps and their backward
    e2 = est.estimate(problem, phi, e1.state, g, horizon=5, step=1)
    i2 = Inner.from_dict(e2.state["inner"])
    assert i2.t == 5 and i2.seeds == i1.seeds  # last, shorter truncation
    e3 = est.estimate(problem, phi, e2.state, g, horizon=5, step=2)
    i3 = Inner.from_dict(e3.state["inner"])
    assert i3.t == 3 and i3.seeds != i1.seeds  # fresh instances
    assert not any(v.requires_grad for v in i2.data["params"].values())


def _tiny_cfg(**kw):
    base = dict(
        meta_steps=6,
        unroll=3,
        inner_steps=6,
        meta_batch=4,
        eval_tasks=4,
        eval_every=2,
        checkpoint_every=0,
        meta_lr=1e-2,
    )
    base.update(kw)
    return MetaTrainConfig(**base)


def _tiny_net():
    return SelfReferentialNet.from_task(make("quadratic", dtype=torch.float64), hidden=6)


def test_meta_training_is_bitwise_deterministic():
    a = MetaTrainer(_tiny_net(), _tiny_cfg(), MemoryLogger()).train()
    b = MetaTrainer(_tiny_net(), _tiny_cfg(), MemoryLogger()).train()
    for k in a.meta_params:
        assert torch.equal(a.meta_params[k], b.meta_params[k])
    assert a.history == b.history
    c = MetaTrainer(_tiny_net(), _tiny_cfg(seed=1), MemoryLogger()).train()
    assert not torch.equal(a.meta_params["core.out.w"], c.meta_params["core.out.w"])
    # a time limit that does not bind keeps the clock out of the cosine schedule
    timed = _tiny_cfg(lr_schedule="cosine", warmup_steps=3, max_seconds=1e4)
    d = MetaTrainer(_tiny_net(), timed, MemoryLogger()).train()
    e = MetaTrainer(_tiny_net(), timed, MemoryLogger()).train()
    for k in d.meta_params:
        assert torch.equal(d.meta_params[k], e.meta_params[k]), k


def test_resume_equals_uninterrupted(tmp_path):
    full = MetaTrainer(_tiny_net(), _tiny_cfg(meta_steps=7), MemoryLogger()).train()
    first = MetaTrainer(_tiny_net(), _tiny_cfg(meta_steps=7), MemoryLogger())
    first.train(until=3)  # stop mid-trajectory (t = 3 of 6), as an interrupted run
    first.save(path=tmp_path / "ck.pt")
    second = MetaTrainer(_tiny_net(), _tiny_cfg(meta_steps=7), MemoryLogger())
    second.resume(tmp_path / "ck.pt")
    inner = Inner.from_dict(second.state["estimator"]["inner"])
    assert second.step == 3 and inner.t == 3
    res = second.train()
    for k in full.meta_params:
        assert torch.equal(full.meta_params[k], res.meta_params[k]), k
    assert res.meta_train_grad_evals == full.meta_train_grad_evals


def test_checkpoints_and_best_by_heldout(tmp_path):
    from selfref.meta import load_checkpoint
    from selfref.runs import RunDir

    run = RunDir.create(tmp_path, "meta", "t", 0, argv=["x"])
    lg = MemoryLogger()
    res = MetaTrainer(_tiny_net(), _tiny_cfg(checkpoint_every=2), lg, run_dir=run).train()
    last = load_checkpoint(run.checkpoints / "last.pt")
    best = load_checkpoint(run.checkpoints / "best.pt")
    assert last["step"] == 6
    scores = {h["step"]: h["final_log10_loss"] for h in res.history}
    assert best["step"] == res.best_step and scores[res.best_step] == min(scores.values())
    assert res.best_score == min(scores.values())
    for tag in ("meta/loss", "meta/grad_norm", "heldout/final_log10_loss", "modify/update_norm"):
        assert lg.values(tag), tag
    assert "config" in lg.texts


def test_ema_of_phi_is_what_keep_best_scores_and_leaves_the_trajectory_alone(tmp_path):
    """With ema_decay the raw φ trajectory is the run without it, bit for bit; the EMA
    follows φ̄ ← β φ̄ + (1 − β) φ from the initial φ; evaluation scores φ̄ and the best
    (and so the export) is a φ̄; a resume continues the EMA exactly."""
    beta = 0.5
    plain = MetaTrainer(_tiny_net(), _tiny_cfg(eval_every=0), MemoryLogger())
    phis = [{k: v.clone() for k, v in plain.meta_params.items()}]
    for _ in range(6):
        plain.train(until=plain.step + 1)
        phis.append({k: v.clone() for k, v in plain.meta_params.items()})
    ema_tr = MetaTrainer(_tiny_net(), _tiny_cfg(ema_decay=beta), MemoryLogger())
    res = ema_tr.train()
    wants = [dict(phis[0])]
    for phi in phis[1:]:
        wants.append({k: beta * wants[-1][k] + (1 - beta) * phi[k] for k in phi})
    want = wants[-1]
    for k in want:
        assert torch.equal(res.meta_params[k], phis[-1][k]), k  # φ itself untouched
        assert torch.allclose(ema_tr.state["ema"][k], want[k], rtol=0, atol=1e-12), k
        assert not torch.equal(want[k], phis[-1][k]), k
    # every evaluation scored the EMA of its step, and the best kept is that step's EMA
    for h in res.history:
        assert h["score"] == ema_tr.evaluate(wants[h["step"]])["score"], h["step"]
    assert res.best_score == min(h["score"] for h in res.history)
    for k in want:
        assert torch.allclose(res.best_meta_params[k], wants[res.best_step][k], atol=1e-12), k
    # resume mid-run continues the EMA bit for bit
    first = MetaTrainer(_tiny_net(), _tiny_cfg(ema_decay=beta), MemoryLogger())
    first.train(until=3)
    first.save(path=tmp_path / "ck.pt")
    second = MetaTrainer(_tiny_net(), _tiny_cfg(ema_decay=beta), MemoryLogger())
    second.resume(tmp_path / "ck.pt")
    second.train()
    for k in want:
        assert torch.equal(second.state["ema"][k], ema_tr.state["ema"][k]), k
    # a state written without the EMA cannot silently grow one on resume
    plain.save(path=tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="no EMA"):
        MetaTrainer(_tiny_net(), _tiny_cfg(ema_decay=beta)).resume(tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="ema_decay"):
        _tiny_cfg(ema_decay=1.0)


class _NaNQuadratic:
    """A quadratic whose loss turns NaN: every meta-step must be skipped, loudly."""

    def __init__(self):
        self.inner = make("quadratic", dtype=torch.float64)
        self.name = "quadratic-nan"
        self.device, self.dtype, self.batch_size = self.inner.device, torch.float64, 1
        self.step_invariant = True

    def full_batch(self, split):
        return None

    def init_params(self, g):
        return self.inner.init_params(g)

    def batch(self, split, step, seed):
        return self.inner.batch(split, step, seed)

    def loss(self, params, batch):
        return self.inner.loss(params, batch) * float("nan")


def test_nonfinite_meta_loss_skips_and_is_logged():
    net = SelfReferentialNet.from_task(_NaNQuadratic(), hidden=4)
    lg = MemoryLogger()
    tr = MetaTrainer(net, _tiny_cfg(meta_steps=2, eval_every=0), lg)
    before = {k: v.detach().clone() for k, v in tr.meta_params.items()}
    with pytest.warns(RuntimeWarning, match="non-finite"):
        res = tr.train()
    assert res.skipped == 2 and lg.values("meta/skipped") == [1.0, 1.0]
    for k, v in before.items():
        assert torch.equal(v, res.meta_params[k])
    tr2 = MetaTrainer(net, _tiny_cfg(meta_steps=5, eval_every=0, max_consecutive_skips=2), lg)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="consecutive"):
        tr2.train()


def test_schedules():
    c = MetaTrainConfig(
        meta_steps=100,
        lr_schedule="cosine",
        warmup_steps=10,
        meta_lr=1.0,
        curriculum=((0, 20), (50, 100)),
    )
    assert c.lr_at(0) == pytest.approx(0.1) and c.lr_at(10) == pytest.approx(1.0)
    assert c.lr_at(99) < 0.01
    assert c.horizon_at(0) == 20 and c.horizon_at(49) == 20 and c.horizon_at(50) == 100
    # with a time limit, the clock enters the schedule only once it is projected to bind
    t = MetaTrainConfig(meta_steps=100, lr_schedule="cosine", meta_lr=1.0, max_seconds=100.0)
    on_pace = [t.lr_at(40, e) for e in (0.0, 1.0, 39.9)]  # 40 steps in < 40 s: 100 in < 100 s
    assert on_pace == [t.lr_at(40)] * 3
    late = t.lr_at(40, 80.0)  # 100 steps would take 200 s: anneal by time (80 % of it spent)
    assert late < t.lr_at(40) and late == pytest.approx(t.lr_at(80))
    assert t.lr_at(40, 150.0) == pytest.approx(0.0, abs=1e-12)  # past the limit: the floor
    with pytest.raises(ValueError, match="lr_schedule"):
        MetaTrainConfig(lr_schedule="step")


@pytest.mark.slow
def test_short_meta_training_beats_untrained_and_sgd_on_heldout():
    """Under a minute on CPU: 50 meta-steps, 32 quadratics per meta-batch, meta-lr 1e-2."""
    task = make("quadratic")
    net = SelfReferentialNet.from_task(task)
    cfg = MetaTrainConfig(meta_steps=50, meta_batch=32, meta_lr=1e-2, eval_every=0, eval_tasks=32)
    tr = MetaTrainer(net, cfg, MemoryLogger())
    fam, seeds = tr.problem.family, tr.problem.eval_seeds
    untrained = rollout_learned(net, tr.meta_params, fam, seeds, 100, "val")
    res = tr.train()
    learned = rollout_learned(net, res.best_meta_params, fam, seeds, 100, "val")
    sgd = rollout_baseline(TaskFamily(task), "sgd", {"lr": 0.01}, seeds, 100, "val")
    assert math.isfinite(learned.final_log10)
    assert learned.final_log10 < untrained.final_log10 - 1.0
    assert learned.final_log10 < sgd.final_log10 - 0.3


def test_learned_value_model_is_trained_and_reported():
    """The optional value model regresses log10 val loss; its loss falls as it learns."""
    task = make("digits-mlp", hidden=4, batch_size=16, dtype=torch.float64)
    net = SelfReferentialNet.from_task(
        task, evaluation=EvaluationConfig(learned_value=True, value_hidden=4), hidden=4
    )
    lg = MemoryLogger()
    cfg = _tiny_cfg(meta_steps=12, eval_every=0, eval_split="train", meta_lr=3e-2)
    res = MetaTrainer(net, cfg, lg).train()
    mse = lg.values("value/mse")
    assert len(mse) == 12 and all(math.isfinite(v) for v in mse)
    assert sum(mse[-3:]) < sum(mse[:3])
    assert "value/r2" in lg.scalars
    assert any(
        not torch.equal(res.meta_params[k], MetaTrainer(net, cfg, lg).meta_params[k])
        for k in ("eval.w1", "eval.w2")
    )


@pytest.mark.parametrize("core", ["hypernet", "srwm"])
def test_meta_training_logs_the_cores_internals(core):
    """The core's own metrics (hypernet direction/magnitude, SRWM |ΔW|, β, q/k entropy) reach
    the logger during learned-optimizer meta-training, as finite scalars under core/."""
    net = SelfReferentialNet.from_task(make("quadratic", dtype=torch.float64), core=core)
    logger = MemoryLogger()
    MetaTrainer(net, _tiny_cfg(meta_steps=2, eval_every=0), logger).train()
    tags = [t for t in logger.scalars if t.startswith("core/")]
    assert tags, f"no core/* scalars logged; got {sorted(logger.scalars)}"
    for t in tags:
        assert len(logger.scalars[t]) == 2
        assert all(math.isfinite(v) for v in logger.values(t)), t
