"""RMAD hypergradients (exact reversal) against autograd through the unrolled loop and finite
differences, in float64; the ``rmad`` method's budget accounting, guard and learning."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from selfref.budget import Budget, BudgetExceeded, CostCounter
from selfref.hypergrad import (
    META_KINDS,
    FixedPointOverflow,
    hypergradient,
    hypergradient_cost,
    init_meta,
    param_groups,
    sgd_momentum,
)
from selfref.hypergrad.rmad import meta_objective_batch
from selfref.logging import MemoryLogger
from selfref.methods import make as make_method
from selfref.methods.rmad import RMAD
from selfref.tasks import make


@pytest.fixture(scope="module")
def mlp64():
    """A tiny sigmoid MLP on digits in float64 (64→8→10, batch 20)."""
    return make("digits-mlp", hidden=(8,), batch_size=20, dtype=torch.float64)


def _jittered_meta(steps: int, groups: int, seed: int, l2: float = 1e-2) -> dict:
    """Non-constant schedules: every step and group has its own α and γ."""
    g = torch.Generator().manual_seed(seed)
    meta = init_meta(steps, groups, alpha=0.4, gamma=0.8, l2=l2, init_scale=1.2)
    return {
        k: v + 0.2 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in meta.items()
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("by", ["layer", "tensor"])
def test_rmad_matches_unrolled_autograd_for_every_kind(mlp64, by: str) -> None:
    groups = param_groups(mlp64.init_params(torch.Generator().manual_seed(0)), by)
    meta = _jittered_meta(12, groups.num_groups, seed=1)
    exact = hypergradient(mlp64, meta, seed=0, method="rmad", by=by)
    unrolled = hypergradient(mlp64, meta, seed=0, method="unrolled", by=by)
    assert exact.meta_loss == pytest.approx(unrolled.meta_loss, rel=1e-9)
    for k in META_KINDS:
        assert exact.grads[k].shape == meta[k].shape
        assert float(unrolled.grads[k].norm()) > 1e-8, k  # every kind really matters here
        assert _rel(exact.grads[k], unrolled.grads[k]) < 1e-6, k
    for k in exact.params:
        torch.testing.assert_close(exact.params[k], unrolled.params[k], rtol=1e-6, atol=1e-8)


def test_rmad_matches_unrolled_on_val_and_train_objectives_logreg() -> None:
    task = make("digits-logreg", batch_size=16, init_scale=0.5, dtype=torch.float64)
    meta = _jittered_meta(15, 1, seed=2)
    for split in ("train", "val"):
        a = hypergradient(task, meta, seed=3, meta_split=split)
        b = hypergradient(task, meta, seed=3, meta_split=split, method="unrolled")
        for k in META_KINDS:
            assert _rel(a.grads[k], b.grads[k]) < 1e-6, (split, k)


@pytest.mark.parametrize("kind", META_KINDS)
def test_unrolled_matches_central_finite_differences(mlp64, kind: str) -> None:
    """Directional derivative along a seeded random direction, float64, eps = 1e-5."""
    meta = _jittered_meta(6, 2, seed=4)
    hg = hypergradient(mlp64, meta, seed=0, method="unrolled", round_gamma=False)
    d = torch.randn(
        meta[kind].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    eps = 1e-5

    def f(sign: float) -> float:
        m = {k: v.clone() for k, v in meta.items()}
        m[kind] = m[kind] + sign * eps * d
        return hypergradient(mlp64, m, seed=0, method="unrolled", round_gamma=False).meta_loss

    fd = (f(1.0) - f(-1.0)) / (2 * eps)
    analytic = float((hg.grads[kind] * d).sum())
    assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-9)


@pytest.mark.slow  # ~2 s each on an idle 2-core machine, ~11 s when it is shared
@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_1000_step_real_trajectory_reverses_bit_for_bit(gamma: float) -> None:
    """1,000 SGD-momentum steps on a real task: the reversal check inside passes (it raises
    otherwise), the buffer holds ≈ log2(1/γ) bits per parameter per step."""
    task = make("digits-logreg", batch_size=32, init_scale=0.5, dtype=torch.float32)
    meta = init_meta(1000, 1, alpha=0.2, gamma=gamma)
    hg = hypergradient(task, meta, seed=0)
    assert hg.stats["exact_w0_recovered"] == 1.0
    ideal = -math.log2(round(gamma * 2**16) / 2**16)
    assert ideal - 0.04 <= hg.stats["buffer_bits_per_param_step"] <= ideal + 1.0
    plain, _ = sgd_momentum(task, meta, seed=0)
    for k in plain:  # the exact trajectory is the float one up to fixed-point rounding
        torch.testing.assert_close(hg.params[k], plain[k], rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rmad_on_cuda_reverses_bit_for_bit_and_matches_unrolled() -> None:
    """The whole method on the GPU: 1,000 real steps reverse exactly (the check inside raises
    otherwise), and in float64 the hypergradients equal autograd through the unrolled loop."""
    task = make("digits-logreg", batch_size=32, init_scale=0.5, device="cuda")
    hg = hypergradient(task, init_meta(1000, 1, alpha=0.2, gamma=0.9, device="cuda"), seed=0)
    assert hg.stats["exact_w0_recovered"] == 1.0
    assert all(v.device.type == "cuda" for v in hg.grads.values())
    mlp = make("digits-mlp", hidden=(8,), batch_size=20, dtype=torch.float64, device="cuda")
    groups = param_groups(mlp.init_params(torch.Generator().manual_seed(0)), "layer")
    meta = {k: v.cuda() for k, v in _jittered_meta(12, groups.num_groups, seed=1).items()}
    exact = hypergradient(mlp, meta, seed=0, method="rmad")
    unrolled = hypergradient(mlp, meta, seed=0, method="unrolled")
    for k in META_KINDS:
        assert _rel(exact.grads[k], unrolled.grads[k]) < 1e-6, k


def test_overflow_raises(mlp64) -> None:
    meta = init_meta(20, 2, alpha=1e4, gamma=0.5)
    with pytest.raises(FixedPointOverflow):
        hypergradient(mlp64, meta, seed=0)


def test_deterministic_mode_is_restored(mlp64) -> None:
    before = torch.are_deterministic_algorithms_enabled()
    hypergradient(mlp64, init_meta(2, 2), seed=0)
    assert torch.are_deterministic_algorithms_enabled() == before


def test_cost_is_charged_up_front_and_refused_when_it_does_not_fit(mlp64) -> None:
    _, m = meta_objective_batch(mlp64, "val", 0)
    assert m == math.ceil(mlp64.num_examples("val") / 20)
    cost = hypergradient_cost(5, m)
    counter = CostCounter(Budget(cost))
    hypergradient(mlp64, init_meta(5, 2), seed=0, counter=counter)
    assert counter.grad_evals == cost == 4 * 5 + m
    with pytest.raises(BudgetExceeded):
        hypergradient(mlp64, init_meta(5, 2), seed=0, counter=counter)


def test_bad_arguments(mlp64) -> None:
    with pytest.raises(ValueError, match="unknown hypergradient method"):
        hypergradient(mlp64, init_meta(2, 2), method="forward")
    with pytest.raises(ValueError, match="schedules must be"):
        hypergradient(mlp64, init_meta(2, 3))
    with pytest.raises(ValueError, match="round_gamma"):
        hypergradient(mlp64, init_meta(2, 2), round_gamma=False)
    with pytest.raises(ValueError, match="unknown option .stepz. for method .rmad.; valid: alpha"):
        make_method("rmad", stepz=3)
    with pytest.raises(ValueError, match="unknown metaparameter kinds"):
        RMAD(learn=("log_beta",))


def test_method_improves_val_loss_and_never_overspends() -> None:
    task = make("digits-logreg", batch_size=50)
    budget = Budget(1500, steps_per_trial=20)
    logger = MemoryLogger()
    res = make_method("rmad", alpha=0.05, meta_lr=0.3).run(task, budget, logger, seed=0)
    assert res.status == "ok", res.reason
    cost = res.extra["hypergrad_cost"]
    assert res.grad_evals <= budget.grad_evals
    assert res.grad_evals + cost > budget.grad_evals  # it stopped because the next won't fit
    assert res.extra["meta_iters"] == budget.grad_evals // cost
    losses = logger.values("meta/loss")
    assert losses[-1] < losses[0] - 0.05  # learning rates learned: val loss falls
    best = [p.best_val_loss for p in res.curve]
    assert best == sorted(best, reverse=True)
    assert [p.grad_evals for p in res.curve] == [cost * (i + 1) for i in range(len(res.curve))]
    assert math.isfinite(res.test_loss) and res.val_accuracy is not None
    assert res.best_hparams["alpha_mean"] > 0.05


def test_method_guard_shrinks_the_meta_step() -> None:
    task = make("digits-logreg", batch_size=50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = RMAD(steps=10, meta_iters=3, max_hypergrad_norm=1e-12).run(
            task, Budget(10_000, 10), seed=0
        )
    assert res.extra["guard_triggers"] == 3
    assert res.extra["final_meta_lr"] == pytest.approx(0.1 / 8)
    assert any("hypergradient norm" in str(w.message) for w in caught)
    assert res.status == "ok"


def test_method_sizes_itself_from_a_small_budget() -> None:
    task = make("digits-logreg", batch_size=50)
    with pytest.warns(RuntimeWarning, match="using T="):
        res = RMAD().run(task, Budget(100, steps_per_trial=100), seed=0)
    assert res.grad_evals <= 100 and res.extra["meta_iters"] == 1
    tiny = RMAD().run(task, Budget(5, steps_per_trial=100), seed=0)
    assert tiny.status == "failed" and "below one hypergradient" in tiny.reason
    assert tiny.grad_evals == 0


def test_method_diverging_from_the_start_says_which_option_to_change() -> None:
    task = make("quadratic", functions="fixed")  # alpha = 1 diverges on 10-d Gaussian quadratics
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = RMAD(steps=10, meta_iters=2).run(task, Budget(10_000, 10), seed=0)
    assert res.status == "diverged" and "rmad.alpha" in res.reason
    ok = RMAD(steps=10, meta_iters=2, alpha=1e-3).run(task, Budget(10_000, 10), seed=0)
    assert ok.status == "ok", ok.reason


def test_method_smoke_harness() -> None:
    smoke = pytest.importorskip("method_smoke")  # tests/ is on sys.path under pytest
    smoke.check_method(RMAD(), make("digits-logreg", batch_size=50), Budget(400, 20), 0)
