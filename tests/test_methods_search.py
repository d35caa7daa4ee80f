"""Grid, random and Optuna (TPE, GP) search behind the Method interface, in-process."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from selfref import methods
from selfref.budget import Budget
from selfref.logging import MemoryLogger
from selfref.methods.grid import GridSearch, grid_points
from selfref.methods.random import RandomSearch, trial_generator
from selfref.methods.trial import run_trial
from selfref.runs import RunDir
from selfref.search_space import CategoricalDim, FloatDim, SearchSpace, default_space
from selfref.tasks import make

smoke = pytest.importorskip("method_smoke")  # tests/ is on sys.path under pytest

QUAD_SPACE = SearchSpace(
    (FloatDim("lr", 1e-4, 1e-2, log=True), FloatDim("momentum", 0.0, 0.9)), optimizer="momentum"
)


def _trial_points(run: RunDir, study: str) -> list[dict]:
    return [r["hparams"] for r in run.read_trials() if r["study"] == study]


@pytest.fixture(scope="module")
def quad():
    return make("quadratic")


@pytest.fixture(scope="module")
def digits():
    return make("digits-mlp")


def test_registry_builds_the_search_methods() -> None:
    assert {"grid", "random"} <= set(methods.names())
    assert isinstance(methods.make("grid", workers=0), GridSearch)
    with pytest.raises(ValueError, match="unknown grid order 'diagonal'"):
        methods.make("grid", order="diagonal")
    with pytest.raises(ValueError, match="unknown option 'points' for method 'random'; valid: "):
        methods.make("random", points=3)


def test_grid_points_derived_from_the_budget() -> None:
    s = default_space()
    assert grid_points(s, 1) == {"lr": 1, "momentum": 1, "weight_decay": 1}
    assert grid_points(s, 8) == {"lr": 2, "momentum": 2, "weight_decay": 2}
    assert grid_points(s, 20) == {"lr": 3, "momentum": 3, "weight_decay": 2}  # 18 <= 20
    assert grid_points(s, 27) == {"lr": 3, "momentum": 3, "weight_decay": 3}
    cat = SearchSpace((FloatDim("lr", 0.01, 0.1), CategoricalDim("momentum", (0.0, 0.9))))
    assert grid_points(cat, 7) == {"lr": 3, "momentum": 2}
    with pytest.raises(ValueError, match="categorical dimensions alone"):
        grid_points(cat, 1)


def test_grid_search_enumerates_exactly_the_grid(quad, tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, "t", "grid")
    budget = Budget(12 * 20, steps_per_trial=20)  # 12 trials: the balanced grid is 4 x 3
    res = GridSearch(space=QUAD_SPACE, workers=0, run_dir=run).run(quad, budget, seed=5)
    per = grid_points(QUAD_SPACE, budget.max_trials)
    assert per == {"lr": 4, "momentum": 3}
    expected = QUAD_SPACE.grid(per)
    got = _trial_points(run, "grid-s5")
    key = lambda p: (p["lr"], p["momentum"])  # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, expected))  # each point exactly once
    assert [key(p) for p in got] != [key(p) for p in expected]  # shuffled order by default
    assert res.extra["grid_size"] == 12 and res.grad_evals == 12 * 20
    cart = GridSearch(space=QUAD_SPACE, workers=0, order="cartesian", run_dir=run)
    cart.run(quad, budget, seed=6)
    assert [key(p) for p in _trial_points(run, "grid-s6")] == [key(p) for p in expected]
    # the best trial is the grid point with the lowest validation loss
    recs = [r for r in run.read_trials() if r["study"] == "grid-s5"]
    best = min(recs, key=lambda r: r["val_loss"])
    assert res.best_hparams == best["hparams"] and res.val_loss == best["val_loss"]


def test_given_grid_larger_than_the_budget_is_refused(quad) -> None:
    with pytest.raises(ValueError, match="a grid of 25 points"):
        GridSearch(points=5, space=QUAD_SPACE, workers=0).run(quad, Budget(100, 10), seed=0)


def test_random_search_is_reproducible_per_seed_and_in_bounds(quad, tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, "t", "random")
    budget = Budget(10 * 10, steps_per_trial=10)
    a = RandomSearch(space=QUAD_SPACE, workers=0).run(quad, budget, seed=1)
    b = RandomSearch(space=QUAD_SPACE, workers=0, run_dir=run).run(quad, budget, seed=1)
    c = RandomSearch(space=QUAD_SPACE, workers=0, run_dir=run).run(quad, budget, seed=2)
    assert a.best_hparams == b.best_hparams and a.val_loss == b.val_loss and a.curve == b.curve
    p1, p2 = _trial_points(run, "random-s1"), _trial_points(run, "random-s2")
    assert len(p1) == 10 and p1 != p2
    for p in p1 + p2:
        assert QUAD_SPACE.contains(p)
    # trial i of a seed is a pure function of (seed, i)
    assert p1[3] == QUAD_SPACE.sample(trial_generator(1, 3))
    assert c.best_hparams != a.best_hparams


def test_random_search_samples_log_dimensions_log_uniformly(quad, tmp_path: Path) -> None:
    """The study's own proposals (not just the space) are log-uniform in lr."""
    space = SearchSpace((FloatDim("lr", 1e-6, 1e-2, log=True),), optimizer="sgd")
    from selfref.methods.random import RandomProposer

    prop = RandomProposer(space, seed=0)
    lrs = np.log10([prop.ask(i)["lr"] for i in range(3000)])
    counts, _ = np.histogram(lrs, bins=4, range=(-6, -2))
    np.testing.assert_allclose(counts / len(lrs), 0.25, atol=0.03)


@pytest.mark.parametrize("name", ["grid", "random"])
def test_smoke_and_budget_counts_match_training_steps(name: str, digits) -> None:
    """No overspend; the reported grad evals equal the minibatches the trials trained on."""
    budget = Budget(250, steps_per_trial=40)  # 6 trials, 10 grad evals left over
    method = methods.make(name, workers=0)
    res = smoke.check_method(method, digits, budget, seed=0, count_batches=True)
    assert res.grad_evals <= 240 and res.extra["trials"] <= 6
    assert res.test_accuracy is not None and res.test_accuracy > 0.5


def test_diverging_and_failing_trials_are_recorded_and_the_search_goes_on(
    quad, tmp_path: Path
) -> None:
    run = RunDir.create(tmp_path, "t", "grid")
    space = SearchSpace((FloatDim("lr", 1e-3, 1e3, log=True),), optimizer="sgd")
    res = GridSearch(points=6, space=space, workers=0, run_dir=run).run(
        quad, Budget(6 * 30, 30), seed=0
    )
    recs = run.read_trials()
    assert len(recs) == 6
    diverged = [r for r in recs if r["status"] == "diverged"]
    assert diverged and all("non-finite" in r["reason"] for r in diverged)
    assert all(r["grad_evals"] < 30 for r in diverged)  # a diverged run stops early
    assert res.status == "ok" and res.best_hparams["lr"] < 1.0
    assert res.grad_evals == sum(r["grad_evals"] for r in recs)
    assert res.extra["trials_diverged"] == len(diverged)
    # a trial that raises: recorded as failed with its reason, the others still run
    res2 = GridSearch(points=4, space=QUAD_SPACE, workers=0, trial_fn=_raise_for_big_lr).run(
        quad, Budget(16 * 10, 10), seed=0
    )
    assert res2.extra["trials_failed"] == 8 and res2.extra["trials_ok"] == 8
    assert res2.status == "ok"


def _raise_for_big_lr(task, request):
    if request.hparams["lr"] > 1e-3:
        raise FloatingPointError("boom")
    return run_trial(task, request)


def test_all_trials_failing_gives_a_failed_result(quad) -> None:
    space = SearchSpace((FloatDim("lr", 1e4, 1e6, log=True),), optimizer="sgd")
    res = RandomSearch(space=space, workers=0).run(quad, Budget(60, 20), seed=0)
    assert res.status == "diverged" and "no trial finished ok" in res.reason
    assert math.isnan(res.val_loss)


def test_budget_smaller_than_one_trial(quad) -> None:
    with pytest.raises(ValueError, match="smaller than one trial of 100 steps"):
        RandomSearch(workers=0).run(quad, Budget(99, 100), seed=0)


def test_logger_gets_the_curve_at_grad_eval_steps(quad) -> None:
    lg = MemoryLogger()
    res = RandomSearch(space=QUAD_SPACE, workers=0).run(quad, Budget(50, 10), lg, seed=0)
    pts = lg.scalars["best/val_loss_vs_grad_evals"]
    assert [s for s, _ in pts] == [10, 20, 30, 40, 50]
    assert [(p.grad_evals, p.best_val_loss) for p in res.curve] == pts
    assert len(lg.scalars["hparams/lr"]) == 5


# -- Optuna adapters -------------------------------------------------------------------


def test_optuna_missing_is_reported_with_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    gone = methods.missing()
    assert "pip install 'selfref[optuna]'" in gone["tpe"]
    assert "pip install 'selfref[optuna]'" in gone["gp"]
    assert "tpe" not in methods.names()
    with pytest.raises(ValueError, match=r"method 'tpe' is not available.*selfref\[optuna\]"):
        methods.make("tpe")


@pytest.mark.parametrize("name", ["tpe", "gp"])
def test_optuna_adapter_runs(name: str, quad, tmp_path: Path) -> None:
    pytest.importorskip("optuna", reason="the optuna extra is not installed")
    run = RunDir.create(tmp_path, "t", name)
    m = methods.make(name, space=QUAD_SPACE, workers=0, run_dir=run, n_startup_trials=3)
    res = smoke.check_method(m, quad, Budget(6 * 10, 10), seed=0, count_batches=True)
    assert res.extra["trials"] == 6
    recs = run.read_trials()
    assert len({r["index"] for r in recs}) == 6
    assert all(QUAD_SPACE.contains(r["hparams"]) for r in recs)
    again = methods.make(name, space=QUAD_SPACE, workers=0, n_startup_trials=3)
    assert again.run(quad, Budget(6 * 10, 10), seed=0).best_hparams == res.best_hparams


def test_optuna_sync_lag_option_reaches_the_study(quad) -> None:
    """``sync_lag`` (default 2) is the study's lag; 0 tells results as they arrive."""
    pytest.importorskip("optuna", reason="the optuna extra is not installed")
    for opts, lag in (({}, 2), ({"sync_lag": 8}, 8), ({"sync_lag": 0}, None)):
        m = methods.make("tpe", space=QUAD_SPACE, workers=0, **opts)
        assert m.study(quad, Budget(20, 10), None, 0, quad).sync_lag == lag
    with pytest.raises(ValueError, match="sync_lag must be >= 0"):
        methods.check_options("tpe", {"sync_lag": -1})


def test_optuna_resume_replays_finished_trials(quad, tmp_path: Path) -> None:
    pytest.importorskip("optuna", reason="the optuna extra is not installed")
    run = RunDir.create(tmp_path, "t", "tpe")
    opts = dict(space=QUAD_SPACE, workers=0, run_dir=run, n_startup_trials=2)
    methods.make("tpe", **opts).run(quad, Budget(3 * 10, 10), seed=0)
    first = run.read_trials()
    res = methods.make("tpe", **opts).run(quad, Budget(5 * 10, 10), seed=0)
    recs = run.read_trials()
    assert recs[:3] == first  # kept, not re-run
    assert [r["index"] for r in recs] == [0, 1, 2, 3, 4]
    assert res.extra["trials_resumed"] == 3 and res.grad_evals == 50


def test_optuna_tells_diverged_trials_as_failed(quad) -> None:
    optuna = pytest.importorskip("optuna", reason="the optuna extra is not installed")
    from selfref.methods.bayes import OptunaProposer

    space = SearchSpace((FloatDim("lr", 1e-3, 1e3, log=True),), optimizer="sgd")
    prop = OptunaProposer(optuna.samplers.RandomSampler(seed=0), space)
    hp = prop.ask(0)
    prop.tell(0, hp, {"status": "diverged", "val_loss": None})
    hp1 = prop.ask(1)
    prop.tell(1, hp1, {"status": "ok", "val_loss": 0.5})
    states = [t.state.name for t in prop.study.trials]
    assert states == ["FAIL", "COMPLETE"]
    assert prop.study.best_value == 0.5


# -- the tracker every method shares ---------------------------------------------------


def test_tracker_curve_final_metrics_and_result(quad) -> None:
    from selfref.budget import CostCounter
    from selfref.methods.base import FinalMetrics, Tracker

    lg = MemoryLogger()
    tr = Tracker("demo", quad, seed=3, logger=lg)
    assert not tr.observe(5, math.nan)  # nothing finite yet: no point
    assert tr.curve == []
    assert tr.observe(10, 2.0) and not tr.observe(20, 2.5) and not tr.observe(25)
    assert tr.observe(30, 1.0) and not tr.observe(40, math.inf)
    pts = [(p.grad_evals, p.best_val_loss) for p in tr.curve]
    assert pts == [(10, 2.0), (20, 2.0), (25, 2.0), (30, 1.0), (40, 1.0)]
    assert lg.scalars["best/val_loss_vs_grad_evals"] == pts
    params = quad.init_params(torch.Generator().manual_seed(0))
    final = tr.evaluate(params)
    assert final.val_loss == quad.evaluate(params, "val")["loss"]
    assert final.test_loss == quad.evaluate(params, "test")["loss"]
    counter = CostCounter(Budget(100, 10))
    counter.spend(40)
    res = tr.result(final, counter, best_hparams={"lr": 0.1})
    assert (res.method, res.task, res.seed, res.status) == ("demo", quad.name, 3, "ok")
    assert res.grad_evals == 40 and res.best_hparams == {"lr": 0.1} and res.curve == tr.curve
    assert res.val_loss == final.val_loss and res.wall_s > 0
    bad = tr.result(FinalMetrics(math.nan, 1.0), counter)
    assert bad.status == "diverged" and bad.reason == "non-finite validation loss"
    none = tr.result(None, counter, status="failed", reason="boom")
    assert none.status == "failed" and math.isnan(none.val_loss)
