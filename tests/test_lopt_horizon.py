"""The learned optimizer's horizon- and held-out-aware parts: squashed loss features,
label-noise-free meta-training tasks, per-progress offset adaptation and the held-out decay
(with the held-out gradient it reads and what it costs), and the held-out step rule."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace

import pytest
import torch
from torch.func import vmap

from selfref.meta.family import TaskFamily
from selfref.methods.learned import _plan
from selfref.net import AnalyzerConfig, EvaluationConfig, SelfReferentialNet
from selfref.net.analyzing import Analyzer
from selfref.net.cores.lopt import LoptCore, lopt_analyzer
from selfref.net.optimizer import LearnedOptimizer
from selfref.tasks.distribution import (
    EXTRA_META_SOURCES,
    HELDOUT_SOURCES,
    META_TRAIN_SOURCES,
    SELECTION_SOURCES,
    DistributionConfig,
    TaskDistribution,
    TaskSpec,
    build_task,
)

# -- squashed loss features ------------------------------------------------------------------


def test_squashed_loss_features_stay_inside_the_range_meta_training_covers():
    """A run far cleaner and longer than any in meta-training (training loss 2^-40, held-out
    loss 1000× it) reads values strictly inside (-1, 1) with ``squash_loss_features`` —
    the tanh of the same log ratios the clipped features read."""
    squashed = Analyzer(lopt_analyzer(squash_loss_features=True))
    clipped = Analyzer(lopt_analyzer())
    col = {n: i for i, n in enumerate(squashed.config.feature_names)}
    theta = {"w": torch.ones(2, dtype=torch.float64)}
    grad = {"w": torch.ones(2, dtype=torch.float64)}
    st_s, st_c = squashed.init_state(theta, horizon=40), clipped.init_state(theta, horizon=40)
    for t in range(40):
        ctx = {
            "loss": torch.tensor(2.0**-t, dtype=torch.float64),
            "heldout_loss": torch.tensor(1000 * 2.0**-t, dtype=torch.float64),
        }
        fs, st_s = squashed(theta, grad, st_s, None, ctx)
        fc, st_c = clipped(theta, grad, st_c, None, ctx)
    names = ("loss_progress", "loss_trend", "heldout_gap", "heldout_trend")
    s = {n: float(fs["w"][0, col[n]]) for n in names}
    c = {n: float(fc["w"][0, col[n]]) for n in names}
    assert all(-1 < v < 1 for v in s.values())
    assert c["loss_progress"] == pytest.approx(-2.0)  # clipped at log ratio -10, over 5
    log_ratio = float(st_s["loss/fast"] - st_s["loss/first"])  # far below -10
    assert log_ratio < -10 and s["loss_progress"] == pytest.approx(math.tanh(log_ratio / 3))
    gap = float(st_s["loss/h_fast"] - st_s["loss/fast"])
    assert s["heldout_gap"] == pytest.approx(math.tanh(gap / 2)) and s["heldout_gap"] > 0.99
    for n in names:  # the same sign as the clipped feature
        assert math.copysign(1, s[n]) == math.copysign(1, c[n]) or c[n] == 0
    with pytest.raises(ValueError, match="squash_loss_features needs loss_features"):
        AnalyzerConfig(squash_loss_features=True)


# -- label-noise-free tasks ------------------------------------------------------------------


def test_label_noise_prob_keeps_the_default_specs_and_otherwise_only_clears_noise():
    default = TaskDistribution()
    same = TaskDistribution(DistributionConfig(label_noise_prob=1.0))
    clean = TaskDistribution(DistributionConfig(label_noise_prob=0.0))
    mixed = TaskDistribution(DistributionConfig(label_noise_prob=0.5))
    specs = [default.sample(s) for s in range(40)]
    assert specs == [same.sample(s) for s in range(40)]
    assert [clean.sample(s) for s in range(40)] == [replace(s, label_noise=0.0) for s in specs]
    noise = [mixed.sample(s).label_noise for s in range(40) if specs[s].kind == "classification"]
    assert 0 < sum(n == 0.0 for n in noise) < len(noise)
    assert all(m.label_noise in (0.0, s.label_noise) for m, s in
               zip((mixed.sample(i) for i in range(40)), specs))  # fmt: skip
    with pytest.raises(ValueError, match="label_noise_prob"):
        DistributionConfig(label_noise_prob=1.5)


def test_the_default_distribution_draws_the_specs_it_always_drew():
    """Options added to the distribution draw their random numbers only when used, so the
    default distribution — what the shipped lopt was meta-trained on, and where its
    meta-validation tasks come from — draws exactly the specs it did before them (a digest
    of the first 500, recorded before label_noise_prob and teacher were added)."""
    specs = [TaskDistribution().sample(s).to_dict() for s in range(500)]
    digest = hashlib.sha256(json.dumps(specs, sort_keys=True).encode()).hexdigest()
    assert digest[:16] == "6d89b6a507c64e78"


def test_gp_regression_is_an_mlp_regression_source_outside_every_suite():
    """``gp_regression``: y a Gaussian-process sample (RBF kernel) at Gaussian x plus noise,
    standardized — an MLP regression kind the default distribution lacks, never held out or
    selected on, and nonlinear: least squares on x leaves most of the variance unexplained."""
    assert "gp_regression" in EXTRA_META_SOURCES and "gp_regression" not in HELDOUT_SOURCES
    assert "gp_regression" not in SELECTION_SOURCES + DistributionConfig().sources
    dist = TaskDistribution(
        DistributionConfig(
            sources=META_TRAIN_SOURCES + ("gp_regression",), source_weights=(3, 2, 3, 2, 1, 2)
        )
    )
    specs = [dist.sample(s) for s in range(60)]
    gps = [s for s in specs if s.data == "gp_regression"]
    assert gps and any(s.hidden for s in gps) and any(not s.hidden for s in gps)
    assert all(0.1 <= s.difficulty <= 0.5 and s.label_noise == 0.0 for s in gps)
    plain = TaskSpec("gp_regression", hidden=(16,), n_samples=1000, n_features=8, data_seed=3)
    task = build_task(plain)
    (x, y), (xt, yt) = task.data["train"], task.data["test"]
    assert task.regression and y.shape[1] == 1
    assert float(y.std()) == pytest.approx(1.0, abs=1e-3)  # standardized on train
    ones = torch.ones(len(x), 1)
    w = torch.linalg.lstsq(torch.cat([x, ones], 1), y).solution
    resid = yt - torch.cat([xt, torch.ones(len(xt), 1)], 1) @ w
    assert float(resid.pow(2).mean() / yt.var()) > 0.4  # far from a linear function


# -- per-progress offset adaptation ----------------------------------------------------------


def _adapt_after(horizon: int, adapt_horizon: int) -> float:
    """A_T after a whole run of ``horizon`` steps with the controller asking for the largest
    move every step (features: gradient, base direction, progress t / T)."""
    core = LoptCore(
        feature_dim=3, base_index=1, param_index=-1, progress_index=2, out_init=0.0,
        adapt_rate=0.01, adapt_horizon=adapt_horizon,
    )  # fmt: skip
    phi = core.init_meta_params(torch.Generator().manual_seed(0))
    phi["ctrl.b_out"] = torch.tensor([0.0, 50.0])  # tanh(ρ) = 1: the largest move
    params = {"w": torch.zeros(4, dtype=torch.float64)}
    state = core.init_state(phi, params)
    for t in range(horizon):
        f = torch.stack([torch.ones(4), torch.ones(4), torch.full((4,), t / horizon)], -1)
        _, state, _ = core(phi, {"w": f.double()}, state)
    return float(state["adapt"][0])


def test_adapt_horizon_sweeps_the_same_offsets_over_runs_of_any_length():
    """Per step, A_T moves adapt_rate each step: 4× as far in a 4× longer run. With
    ``adapt_horizon`` T_ref it moves adapt_rate · T_ref / T: the same over the whole run."""
    assert _adapt_after(20, 0) == pytest.approx(0.2)
    assert _adapt_after(80, 0) == pytest.approx(0.8)
    # Δ(t/T) = 1/T from the second step on: 0.01 · 20 · (T − 1) / T
    assert _adapt_after(20, 20) == pytest.approx(0.01 * 20 * 19 / 20)
    assert _adapt_after(80, 20) == pytest.approx(0.01 * 20 * 79 / 80)
    with pytest.raises(ValueError, match="progress_index"):
        LoptCore(feature_dim=3, base_index=1, param_index=-1, progress_index=5, adapt_horizon=20)


# -- the held-out decay ----------------------------------------------------------------------


class _Perturbed(LoptCore):
    """Output layers perturbed from their zero start, so every learned output is live."""

    def init_meta_params(self, generator):
        phi = super().init_meta_params(generator)
        for k in ("ctrl.w_out", "mlp.w_out", "ctrl.b_out", "mlp.b_out"):
            phi[k] = 0.1 * torch.randn(phi[k].shape, generator=generator)
        return phi


DECAY = dict(feature_dim=4, base_index=1, param_index=2, decay_index=3)


def test_heldout_decay_contract():
    from core_smoke import check_core

    check_core(_Perturbed(hidden=6, ctrl_hidden=4, **DECAY))
    phi = LoptCore(**DECAY).init_meta_params(torch.Generator())
    assert {"decay.log_init", "decay.log_rate"} <= set(phi)
    for bad, match in (
        (dict(decay_index=1), "decay_index"),  # the base direction's column
        (dict(decay_index=4), "decay_index"),  # no such column
        (dict(decay_init=20.0), "decay_min"),
        (dict(decay_rate=0.0), "decay_rate"),
    ):
        with pytest.raises(ValueError, match=match):
            LoptCore(**{**DECAY, **bad})


def test_heldout_decay_follows_the_heldout_hypergradient():
    """Untrained (out_init = 0), the step is Adam's plus AdamW's decay with the tensor's
    step size, −α(b + λ_T θ); each held-out read moves log λ_T by κ·cos(∇θ L_val, θ_T):
    up while shrinking θ would lower the held-out loss (cos > 0), down when it would raise
    it, not at all on steps without a read (the column is 0)."""
    core = LoptCore(out_init=0.0, decay_rate=0.3, decay_init=1e-2, **DECAY)
    phi = core.init_meta_params(torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    params = {"a": torch.randn(5, generator=gen, dtype=torch.float64),
              "b": torch.randn(2, 3, generator=gen, dtype=torch.float64)}  # fmt: skip
    state = core.init_state(phi, params)
    base = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}
    log_lam = []
    for held in ("aligned", "none", "opposed", "opposed"):
        feats = {}
        for k, v in params.items():
            hg = {"aligned": v, "none": torch.zeros_like(v), "opposed": -2 * v}[held]
            feats[k] = torch.stack([base[k], base[k], v, hg], dim=-1)
        upd, state, m = core(phi, feats, state)
        lam = math.exp(math.log(1e-2) + float(state["decay"][0]))
        for k, v in params.items():  # α = 3e-3, no offsets: −α(b + λ θ)
            torch.testing.assert_close(upd[k], -3e-3 * (base[k] + lam * v))
        log_lam.append(float(m["lopt/log_decay_mean"]))
    start = math.log(1e-2)
    assert log_lam == pytest.approx([start + 0.3, start + 0.3, start, start - 0.3])


GATED = dict(
    feature_dim=6, base_index=1, param_index=2, decay_index=3, trend_index=4, heldout_trend_index=5
)


@pytest.mark.parametrize(
    ("gate", "trends", "grows"),
    [
        ("none", (0.2, -0.3), True),  # the plain rule grows whatever the losses do
        ("gap", (-0.1, 0.2), True),  # train falls, held-out rises: the gap widens
        ("gap", (-0.3, -0.1), True),  # both fall, train faster: the gap widens
        ("gap", (-0.1, -0.3), False),  # both fall, held-out faster: still fitting
        ("gap", (0.4, 0.2), False),  # both rise, train faster: a collapse, not overfitting
        ("overfit", (-0.1, 0.2), True),  # held-out rises while train falls
        ("overfit", (0.0, 0.1), True),  # ... or while train stays
        ("overfit", (-0.3, -0.1), False),  # the gap widens but the held-out loss still falls
        ("overfit", (0.4, 0.2), False),  # both rise: a collapse
    ],
)
def test_decay_gate_lets_the_decay_grow_only_while_overfitting_shows(gate, trends, grows):
    """With ``decay_gate`` a read that would raise log λ_T (cos > 0) moves it only while
    the smoothed trends (training, held-out) say the net overfits; a read that would lower
    it always does. ``none`` is the plain rule."""
    core = LoptCore(out_init=0.0, decay_rate=0.3, decay_gate=gate, **GATED)
    phi = core.init_meta_params(torch.Generator().manual_seed(0))
    theta = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    state = core.init_state(phi, {"w": theta})
    train, held = (torch.full_like(theta, v) for v in trends)

    def read(hg: torch.Tensor) -> float:
        nonlocal state
        f = torch.stack([theta, torch.ones_like(theta), theta, hg, train, held], dim=-1)
        _, state, _ = core(phi, {"w": f}, state)
        return float(state["decay"][0])

    assert read(theta) == pytest.approx(0.3 if grows else 0.0)  # cos = +1
    assert read(-theta) == pytest.approx(0.0 if grows else -0.3)  # cos = -1: always falls


def test_decay_gate_contract():
    """The gate reads two loss-feature columns and adds no meta-parameter, so it applies
    to a φ meta-trained without it; bad names and missing columns are errors."""
    plain = LoptCore(**GATED).init_meta_params(torch.Generator().manual_seed(0))
    gated = LoptCore(decay_gate="overfit", **GATED).init_meta_params(
        torch.Generator().manual_seed(0)
    )
    assert plain.keys() == gated.keys()
    with pytest.raises(ValueError, match="decay_gate must be one of"):
        LoptCore(**GATED, decay_gate="early")
    with pytest.raises(ValueError, match="decay_gate 'gap' needs"):
        LoptCore(**{**GATED, "decay_index": -1}, decay_gate="gap")
    with pytest.raises(ValueError, match="decay_gate 'gap' needs"):
        LoptCore(**{**GATED, "heldout_trend_index": 6}, decay_gate="gap")


def _decay_after(horizon: int, decay_horizon: int, reads_every: int = 5) -> tuple[float, list]:
    """Ω of one tensor after ``horizon`` steps whose held-out gradient is θ itself (cos = 1)
    on every ``reads_every``-th step, and the updates of every step."""
    cfg = dict(feature_dim=5, base_index=1, param_index=2, decay_index=3, progress_index=4)
    core = LoptCore(out_init=0.0, decay_rate=0.1, decay_horizon=decay_horizon, **cfg)
    phi = core.init_meta_params(torch.Generator().manual_seed(0))
    theta = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64)
    state = core.init_state(phi, {"w": theta})
    updates = []
    for t in range(horizon):
        hg = theta if t % reads_every == 0 else torch.zeros_like(theta)
        prog = torch.full((4,), min(t / horizon, 1.0), dtype=torch.float64)
        f = torch.stack([theta, torch.ones_like(theta), theta, hg, prog], dim=-1)
        upd, state, _ = core(phi, {"w": f}, state)
        updates.append(upd["w"])
    return float(state["decay"][0]), updates


def _assert_short_runs_unchanged(run, t_ref: int) -> None:
    """Runs of T <= T_ref steps (``run(T, option)`` → (state value, updates)) are bit for bit
    the runs without the per-run option."""
    for horizon in (t_ref // 2, t_ref):
        plain, with_option = run(horizon, 0), run(horizon, t_ref)
        assert plain[0] == with_option[0]
        for a, b in zip(plain[1], with_option[1]):
            assert torch.equal(a, b)


def test_decay_horizon_moves_the_decay_as_far_over_runs_of_any_length():
    """Per read, Ω moves κ·cos: a 5× longer run makes 5× the reads and drives it 5× as far.
    With ``decay_horizon`` T_ref it moves κ·min(1, T_ref/T) a read (the first read at κ):
    runs up to T_ref steps exactly as without it, longer ones as far as a T_ref-step run."""
    assert _decay_after(40, 0)[0] == pytest.approx(0.1 * 8)
    assert _decay_after(200, 0)[0] == pytest.approx(0.1 * 40)
    # T = 200 = 5 T_ref: the first read at κ, the 39 after it at κ/5
    assert _decay_after(200, 40)[0] == pytest.approx(0.1 + 0.1 * 39 / 5)
    _assert_short_runs_unchanged(_decay_after, t_ref=40)
    with pytest.raises(ValueError, match="decay_horizon"):
        LoptCore(**DECAY, decay_horizon=-1)
    with pytest.raises(ValueError, match="decay_horizon needs"):
        LoptCore(feature_dim=4, base_index=1, param_index=2, decay_horizon=40)


def test_heldout_gradient_sets_one_number_per_tensor_never_a_direction():
    """Two held-out gradients with the same cosine with θ in every tensor give the same
    update, whatever else they hold: the split the optimizer reads at run time cannot
    steer the per-coordinate rule (which would be training on it)."""
    core = _Perturbed(hidden=6, ctrl_hidden=4, **DECAY)
    phi = core.init_meta_params(torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(2)
    params = {"a": torch.randn(6, generator=gen, dtype=torch.float64),
              "b": torch.randn(3, 4, generator=gen, dtype=torch.float64)}  # fmt: skip
    outs = []
    for sign in (1.0, -1.0):
        feats = {}
        for k, v in params.items():
            u = torch.randn(v.shape, generator=torch.Generator().manual_seed(3), dtype=v.dtype)
            u = u - (u * v).sum() / (v * v).sum() * v  # orthogonal to θ: |θ + u| = |θ − u|
            rest = torch.randn(*v.shape, 3, generator=torch.Generator().manual_seed(4))
            feats[k] = torch.cat(
                [rest[..., :2].double(), v[..., None], (v + sign * u)[..., None]], -1
            )
        outs.append(core(phi, feats, core.init_state(phi, params)))
    for k in params:
        torch.testing.assert_close(outs[0][0][k], outs[1][0][k])
    torch.testing.assert_close(outs[0][1]["decay"], outs[1][1]["decay"])


def _decay_net(task) -> SelfReferentialNet:
    return SelfReferentialNet.from_task(
        task,
        core="lopt",
        analyzer=lopt_analyzer(squash_loss_features=True, heldout_grad_feature=True),
        evaluation=EvaluationConfig(heldout_every=2, heldout_grad=True),
        hidden=6,
        ctrl_hidden=4,
    )


def test_the_heldout_gradient_is_each_instances_own_on_every_path():
    """``step_many`` (one reverse pass for all instances) and ``step`` under ``vmap`` read
    the same held-out gradient and make the same step; the decay column is the analyzer's
    last, found by name."""
    task = build_task(TaskSpec("blobs", hidden=(5,), batch_size=16, n_samples=300),
                      dtype=torch.float64)  # fmt: skip
    net = _decay_net(task)
    assert net.core.config.decay_index == net.analyzer.config.feature_names.index("heldout_grad")
    phi = {k: v.double() for k, v in net.init_meta_params(torch.Generator()).items()}
    fam = TaskFamily(task)
    seeds = [0, 1, 2]
    params = fam.init_params(seeds)
    state = vmap(lambda p: net.init_state(phi, p, horizon=10))(params)
    batch = {**fam.batch("train", 0, seeds), "heldout": fam.batch("val", 0, seeds)}
    p1, s1, m1 = net.step_many(phi, params, state, batch)
    p2, s2, _ = vmap(net.step, in_dims=(None, 0, 0, 0))(phi, params, state, batch)
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k])
    torch.testing.assert_close(s1["core"]["decay"], s2["core"]["decay"])
    assert float(s1["core"]["decay"].detach().abs().sum()) > 0  # the read moved the decay
    assert "heldout_grad" not in m1 and m1["heldout_loss"].shape == (3,)
    with pytest.raises(ValueError, match="heldout_grad needs heldout_every"):
        EvaluationConfig(heldout_grad=True)


def test_a_read_with_the_heldout_gradient_costs_one_evaluation():
    """The selfref method's plan: the most steps whose cost — 1 each plus ½ per held-out
    read, or 1 with the held-out gradient, rounded up — fits in the budget."""

    def every_5(t):
        return t % 5 == 0

    def cost(steps, read_cost):
        return steps + math.ceil(sum(map(every_5, range(steps))) * read_cost)

    for budget, read_cost in ((100, 0.5), (120, 1.0), (121, 1.0)):
        steps, reads = _plan(budget, every_5, read_cost)
        assert reads == {t for t in range(steps) if every_5(t)}
        assert cost(steps, read_cost) <= budget < cost(steps + 1, read_cost)
    assert _plan(120, every_5, 1.0)[0] == 100  # 1 + 1/5 per step
    assert EvaluationConfig(heldout_every=5).heldout_cost == 0.5
    assert EvaluationConfig(heldout_every=5, heldout_grad=True).heldout_cost == 1.0


def test_learned_optimizer_reads_the_heldout_gradient_from_a_closure():
    """``step(heldout_closure=fn)`` takes the held-out loss and its gradient without touching
    ``.grad``; the decay moves on those steps only, and a resumed optimizer continues bit
    for bit."""
    task = build_task(TaskSpec("blobs", hidden=(5,), batch_size=16, n_samples=300))
    net = _decay_net(task)
    phi = net.init_meta_params(torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    xv, yv = torch.randn(32, 4), torch.randint(0, 3, (32,))

    def make(m):
        return LearnedOptimizer(m.parameters(), meta_params=phi, net=net.describe(), total_steps=20)

    def run(m, opt, steps):
        decays = []
        for t in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            grads = [p.grad.clone() for p in m.parameters()]
            if t % 2 == 0:
                opt.step(
                    loss=loss, heldout_closure=lambda: torch.nn.functional.cross_entropy(m(xv), yv)
                )
            else:
                opt.step(loss=loss)
            assert all(torch.equal(g, p.grad) for g, p in zip(grads, m.parameters()))
            decays.append(opt.state_dict()["learned_net_state"]["core"]["decay"].clone())
        return decays

    opt = make(model)
    assert opt.heldout_grad
    decays = run(model, opt, 6)
    assert not torch.equal(decays[0], torch.zeros_like(decays[0]))
    assert torch.equal(decays[1], decays[0]) and not torch.equal(decays[2], decays[1])
    with pytest.raises(ValueError, match="not both"):
        opt.step(heldout_loss=1.0, heldout_closure=lambda: torch.tensor(1.0))
    # resume: a copy of the model and optimizer state continues exactly as the original
    twin = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    twin.load_state_dict(model.state_dict())
    opt2 = make(twin)
    opt2.load_state_dict(opt.state_dict())
    run(model, opt, 4)
    run(twin, opt2, 4)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_heldout_step_rule_follows_the_held_out_hypergradient_of_the_last_step():
    """With ``heldout_step_rate`` H_T moves only on a read, by −κ_s · cos(∇θ L_val, Δθ_{t−1}):
    up while the held-out gradient opposes the last step (a longer one would have lowered
    the held-out loss), down when it agrees; H_T scales the whole step, decay included,
    and stops at ±heldout_step_max."""
    core = LoptCore(
        out_init=0.0, decay_rate=0.3, heldout_step_rate=0.5, heldout_step_max=0.8, **GATED
    )
    plain = LoptCore(out_init=0.0, decay_rate=0.3, **GATED)
    phi = core.init_meta_params(torch.Generator().manual_seed(0))
    theta = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    state = core.init_state(phi, {"w": theta})
    plain_state = plain.init_state(phi, {"w": theta})
    base = torch.full_like(theta, 0.5)
    zero = torch.zeros_like(theta)

    def step(hg: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        nonlocal state, plain_state
        f = torch.stack([theta, base, theta, hg, zero, zero], dim=-1)
        upd, state, m = core(phi, {"w": f}, state)
        ref, plain_state, _ = plain(phi, {"w": f}, plain_state)
        assert float(m["lopt/heldout_step_mean"]) == float(state["heldout_step"][0])
        return float(state["heldout_step"][0]), upd["w"], ref["w"]

    h, upd, ref = step(zero)  # no read, and no last step yet: H stays 0, the plain step
    assert h == 0.0
    torch.testing.assert_close(upd, ref)
    last = upd.clone()
    h, upd, ref = step(-last)  # the held-out gradient opposes the last step: cos = −1
    assert h == pytest.approx(0.5)
    torch.testing.assert_close(upd, math.exp(0.5) * ref)  # step and decay both scaled
    h, _, _ = step(zero)  # no read: H stays
    assert h == pytest.approx(0.5)
    h, _, _ = step(-upd)  # again: capped at heldout_step_max
    assert h == pytest.approx(0.8)
    h, _, _ = step(upd)
    assert h == pytest.approx(0.3)  # agrees with the last step (cos = +1): falls by κ_s


def test_heldout_step_rule_contract():
    """The rule adds no meta-parameter (a config edit of a meta-trained φ), keeps the last
    step in the state, needs the held-out gradient column, and refuses bad values."""
    plain = LoptCore(**GATED).init_meta_params(torch.Generator().manual_seed(0))
    core = LoptCore(heldout_step_rate=0.3, **GATED)
    assert core.init_meta_params(torch.Generator().manual_seed(0)).keys() == plain.keys()
    state = core.init_state(plain, {"w": torch.zeros(3, 2), "b": torch.zeros(3)})
    assert state["heldout_step"].shape == (2,) and state["prev"].shape == (9,)
    with pytest.raises(ValueError, match="heldout_step_rate needs"):
        LoptCore(**{**GATED, "decay_index": -1}, heldout_step_rate=0.3)
    with pytest.raises(ValueError, match="heldout_step_rate >= 0"):
        LoptCore(**GATED, heldout_step_rate=-0.1)
    with pytest.raises(ValueError, match="heldout_step_max > 0"):
        LoptCore(**GATED, heldout_step_rate=0.1, heldout_step_max=0.0)


def _step_rule_after(horizon: int, step_horizon: int, reads_every: int = 5) -> tuple[float, list]:
    """H of one tensor after ``horizon`` steps whose held-out gradient opposes the last step
    (cos = −1) on every ``reads_every``-th step, and the updates of every step."""
    cfg = dict(feature_dim=5, base_index=1, param_index=2, decay_index=3, progress_index=4)
    core = LoptCore(out_init=0.0, heldout_step_rate=0.01, heldout_step_horizon=step_horizon, **cfg)
    phi = core.init_meta_params(torch.Generator().manual_seed(0))
    theta = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64)
    state = core.init_state(phi, {"w": theta})
    updates, last = [], torch.zeros_like(theta)
    for t in range(horizon):
        hg = -last if t % reads_every == 0 else torch.zeros_like(theta)
        prog = torch.full((4,), min(t / horizon, 1.0), dtype=torch.float64)
        f = torch.stack([theta, torch.ones_like(theta), theta, hg, prog], dim=-1)
        upd, state, _ = core(phi, {"w": f}, state)
        last = upd["w"]
        updates.append(last)
    return float(state["heldout_step"][0]), updates


def test_heldout_step_horizon_moves_the_step_rule_as_far_over_runs_of_any_length():
    """As ``decay_horizon`` for the decay: per read H moves κ_s·min(1, T_ref/T); runs of up
    to T_ref steps move exactly as without the option. (The first read, before any step,
    has no last step to read: cos = 0.)"""
    assert _step_rule_after(200, 0)[0] == pytest.approx(0.01 * 39)
    assert _step_rule_after(200, 40)[0] == pytest.approx(0.01 * 39 / 5)
    _assert_short_runs_unchanged(_step_rule_after, t_ref=40)
    with pytest.raises(ValueError, match="heldout_step_horizon must be"):
        LoptCore(**GATED, heldout_step_rate=0.1, heldout_step_horizon=-1)


def test_heldout_step_consistency_signal_moves_by_the_reads_sign_agreement():
    """``heldout_step_signal="consistency"``: a read moves H_T by −κ_s · r_T / m_T, the
    averaged hypergradient over its averaged magnitude: exactly κ_s per read while every
    read says "longer", whatever the tensor's size (cos would give 1/√n for a gradient
    carrying 1/√n of signal), less once the reads disagree; steps without a read leave the
    averages as they are."""
    core = LoptCore(out_init=0.0, heldout_step_rate=0.1, heldout_step_signal="consistency", **GATED)
    phi = core.init_meta_params(torch.Generator().manual_seed(0))
    n = 400
    theta = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
    noise = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    state = core.init_state(phi, {"w": theta})
    zero = torch.zeros_like(theta)
    last = zero

    def step(hg: torch.Tensor) -> float:
        nonlocal state, last
        f = torch.stack([theta, torch.ones_like(theta), theta, hg, zero, zero], dim=-1)
        upd, state, _ = core(phi, {"w": f}, state)
        last = upd["w"]
        return float(state["heldout_step"][0])

    assert step(zero) == 0.0  # no last step yet
    h = [step(-last / last.norm() + 5 * noise / noise.norm()) for _ in range(3)]  # weak signal
    assert h == pytest.approx([0.1, 0.2, 0.3])  # one sign: the full κ_s each read
    before = state["step_signal"].clone()
    assert step(zero) == pytest.approx(0.3)  # no read: nothing moves
    assert torch.equal(state["step_signal"], before)
    # a read the other way, 3× as strong as the averaged ones (m = 0.27 |Δθ|): the average
    # turns, and H falls by a tenth of κ_s
    assert step(3 * last / last.norm()) == pytest.approx(0.29, abs=0.005)
    with pytest.raises(ValueError, match="heldout_step_signal must be one of"):
        LoptCore(**GATED, heldout_step_rate=0.1, heldout_step_signal="sign")
    with pytest.raises(ValueError, match="heldout_step_beta"):
        LoptCore(**GATED, heldout_step_rate=0.1, heldout_step_beta=1.0)


@pytest.mark.parametrize(
    ("gate", "trends", "grows"),
    [
        ("none", (-0.1, 0.2), True),  # the plain rule grows whatever the losses do
        ("gap", (-0.3, -0.1), False),  # both fall, train faster: the gap widens
        ("gap", (-0.1, -0.3), True),  # both fall, held-out faster
        ("overfit", (0.0, 0.1), False),  # held-out rises while train stays
        ("overfit", (-0.3, -0.1), True),  # the gap widens but the held-out loss still falls
        ("overfit", (0.4, 0.2), True),  # both rise: no overfitting shows
    ],
)
def test_heldout_step_gate_lets_the_step_grow_only_while_no_overfitting_shows(gate, trends, grows):
    """With ``heldout_step_gate`` a read that would raise H_T (cos < 0) moves it only while
    the smoothed trends (training, held-out) do not show the gate's overfitting (the
    decay gate's conditions, the other way round); a read that would lower it always
    does. The gate adds no meta-parameter."""
    core = LoptCore(out_init=0.0, heldout_step_rate=0.5, heldout_step_gate=gate, **GATED)
    phi = core.init_meta_params(torch.Generator().manual_seed(0))
    assert phi.keys() == LoptCore(**GATED).init_meta_params(torch.Generator()).keys()
    theta = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    state = core.init_state(phi, {"w": theta})
    train, held = (torch.full_like(theta, v) for v in trends)
    last = torch.zeros_like(theta)

    def read(hg: torch.Tensor) -> float:
        nonlocal state, last
        f = torch.stack([theta, torch.full_like(theta, 0.5), theta, hg, train, held], dim=-1)
        upd, state, _ = core(phi, {"w": f}, state)
        last = upd["w"]
        return float(state["heldout_step"][0])

    assert read(torch.zeros_like(theta)) == 0.0  # no last step yet
    # cos = −1 (a longer step would have helped), then +1 (up to the cosine's 1e-12 guard)
    assert read(-last) == pytest.approx(0.5 if grows else 0.0, abs=1e-6)
    assert read(last) == pytest.approx(0.0 if grows else -0.5, abs=1e-6)  # always falls
    with pytest.raises(ValueError, match="heldout_step_gate must be one of"):
        LoptCore(**GATED, heldout_step_rate=0.1, heldout_step_gate="early")
    with pytest.raises(ValueError, match="heldout_step_gate 'gap' needs"):
        LoptCore(**{**GATED, "heldout_trend_index": 6}, heldout_step_gate="gap")


def test_heldout_step_shrink_scales_only_the_moves_that_shorten_the_step():
    """``heldout_step_shrink = ρ``: a read whose cosine says "shorter" (cos > 0) moves H_T by
    ρ·κ_s·cos, one that says "longer" by the full κ_s·cos; ρ = 1 is the plain rule."""
    theta = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    zero, base = torch.zeros_like(theta), torch.full_like(theta, 0.5)

    def walk(shrink: float) -> list[float]:
        core = LoptCore(out_init=0.0, heldout_step_rate=0.5, heldout_step_shrink=shrink, **GATED)
        phi = core.init_meta_params(torch.Generator().manual_seed(0))
        state, last, hs = core.init_state(phi, {"w": theta}), zero, []
        for sign in (0, 1, 1, -1):  # no read; then cos = +1, +1, −1
            f = torch.stack([theta, base, theta, sign * last, zero, zero], dim=-1)
            upd, state, _ = core(phi, {"w": f}, state)
            last = upd["w"]
            hs.append(float(state["heldout_step"][0]))
        return hs

    assert walk(1.0) == pytest.approx([0.0, -0.5, -1.0, -0.5], abs=1e-6)
    assert walk(0.4) == pytest.approx([0.0, -0.2, -0.4, 0.1], abs=1e-6)
    assert walk(0.0) == pytest.approx([0.0, 0.0, 0.0, 0.5], abs=1e-6)
    with pytest.raises(ValueError, match="heldout_step_shrink must be in"):
        LoptCore(**GATED, heldout_step_rate=0.1, heldout_step_shrink=1.5)


def test_train_step_rate_moves_h_by_the_training_gradients_hypergradient_every_step():
    """``train_step_rate = κ_t``: every step moves H_T by −κ_t·cos(g_t, Δθ_{t−1}) on top of
    the held-out reads; gradients that keep agreeing with the last step (cos = −1: the step
    went downhill and the slope goes on) lengthen it; 0 is the plain rule, bit for bit."""
    theta = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    zero, base = torch.zeros_like(theta), torch.full_like(theta, 0.5)

    def walk(rate: float) -> list[float]:
        core = LoptCore(out_init=0.0, heldout_step_rate=0.5, train_step_rate=rate, **GATED)
        phi = core.init_meta_params(torch.Generator().manual_seed(0))
        state, last, hs = core.init_state(phi, {"w": theta}), zero, []
        for g_sign, read in ((1, 0), (-1, 0), (-1, 0), (1, 1)):  # g = ±Δθ_{t-1}; one read
            f = torch.stack([g_sign * last, base, theta, read * last, zero, zero], dim=-1)
            upd, state, _ = core(phi, {"w": f}, state)
            last = upd["w"]
            hs.append(float(state["heldout_step"][0]))
        return hs

    assert walk(0.0) == pytest.approx([0.0, 0.0, 0.0, -0.5], abs=1e-6)  # only the read moves it
    hs = walk(0.2)
    # step 1: no last step (cos 0); 2, 3: cos −1 (+0.2 each); 4: the read's −0.5 and cos +1's −0.2
    assert hs == pytest.approx([0.0, 0.2, 0.4, -0.3], abs=1e-6)
    with pytest.raises(ValueError, match="train_step_rate must be >= 0 and needs"):
        LoptCore(**GATED, train_step_rate=0.1)
    with pytest.raises(ValueError, match="train_step_rate must be >= 0 and needs"):
        LoptCore(**GATED, heldout_step_rate=0.3, train_step_rate=-0.1)


def test_heldout_dir_rate_scales_the_correction_by_the_held_out_hypergradient():
    """``heldout_dir_rate = κ_d``: each read moves D_T by −κ_d·cos(∇θ L_val, Δθ^d), the
    correction's part of the last step, within [−heldout_dir_max, 0]; the step's correction
    is e^{D_T} times the plain core's; no read moves nothing, and no meta-parameter is added."""
    g = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    zero = torch.zeros_like(g)  # base direction and θ 0: the step is the correction alone
    plain = LoptCore(out_init=1.0, lr_init=0.1, **GATED)
    core = LoptCore(out_init=1.0, lr_init=0.1, heldout_dir_rate=0.5, heldout_dir_max=0.8, **GATED)
    phi = core.init_meta_params(torch.Generator().manual_seed(0))
    assert phi.keys() == plain.init_meta_params(torch.Generator()).keys()
    state = core.init_state(phi, {"w": g})
    plain_state = plain.init_state(phi, {"w": g})
    ds = []
    for read in (0, 1, 1, -1, -1, 0):  # none; cos = +1, +1 (to the floor), −1, −1 (to 0); none
        f = torch.stack([g, zero, zero, read * state["prev_dir"], zero, zero], dim=-1)
        upd, state, m = core(phi, {"w": f}, state)
        ref, plain_state, _ = plain(phi, {"w": f}, plain_state)
        d = float(state["heldout_dir"][0])
        ds.append(d)
        assert torch.allclose(upd["w"], math.exp(d) * ref["w"])  # e^{D_T} times the correction
        assert torch.allclose(state["prev_dir"], upd["w"])  # the correction part is the step
        assert float(m["lopt/heldout_dir_mean"]) == pytest.approx(d)
    assert float(upd["w"].abs().sum()) > 0  # the correction is not zero: the test can fail
    assert ds == pytest.approx([0.0, -0.5, -0.8, -0.3, 0.0, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="heldout_dir_rate needs the held-out gradient"):
        LoptCore(feature_dim=6, base_index=1, param_index=2, heldout_dir_rate=0.1)
    with pytest.raises(ValueError, match="heldout_dir_rate >= 0 and heldout_dir_max > 0"):
        LoptCore(**GATED, heldout_dir_rate=0.1, heldout_dir_max=0.0)


def test_heldout_step_init_starts_h_at_its_value_and_scales_the_first_step():
    """``heldout_step_init = h₀``: H_T starts at h₀, so the first step (no read yet) is e^{h₀}
    times the plain rule's, decay included; |h₀| beyond heldout_step_max is refused."""
    theta = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    zero, base = torch.zeros_like(theta), torch.full_like(theta, 0.5)
    f = torch.stack([theta, base, theta, zero, zero, zero], dim=-1)
    steps = {}
    for h0 in (0.0, -1.5):
        core = LoptCore(out_init=0.0, heldout_step_rate=0.3, heldout_step_init=h0, **GATED)
        phi = core.init_meta_params(torch.Generator().manual_seed(0))
        state = core.init_state(phi, {"w": theta})
        assert torch.equal(state["heldout_step"], torch.full((1,), h0, dtype=torch.float64))
        upd, state, _ = core(phi, {"w": f}, state)
        assert float(state["heldout_step"][0]) == h0  # no read: H_T stays
        steps[h0] = upd["w"]
    assert float(steps[0.0].abs().sum()) > 0
    assert torch.allclose(steps[-1.5], math.exp(-1.5) * steps[0.0])
    with pytest.raises(ValueError, match="heldout_step_init must be within"):
        LoptCore(**GATED, heldout_step_rate=0.1, heldout_step_init=-5.0)
