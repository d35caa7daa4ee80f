"""Hyperband and ASHA on gradient-evaluation rungs: schedules, exact charges, resume, HParams."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from selfref.budget import Budget
from selfref.logging import TensorBoardLogger
from selfref.methods import make
from selfref.methods.hyperband import (
    ASHASchedule,
    HyperbandSchedule,
    Segment,
    rung_steps,
)
from selfref.runs import RunDir
from selfref.tasks import make as make_task
from selfref.train import train


def test_rung_steps() -> None:
    assert rung_steps(54, 2, 3) == [2, 6, 18, 54]
    assert rung_steps(100, 3, 3) == [3, 9, 27, 81, 100]
    with pytest.raises(ValueError, match="eta must be an integer >= 2"):
        rung_steps(10, 1, 1)


def _drive(sched, value, budget: float = math.inf, limit: int = 10_000) -> list[Segment]:
    """Issue and report jobs one at a time (one worker); value(trial) is the loss."""
    jobs = []
    spent = 0.0
    for _ in range(limit):
        job = sched.next_job(budget - spent)
        if job is None:
            break
        spent += job.stop - job.start
        jobs.append(job)
        sched.report(job, value(job.trial))
    return jobs


def test_hyperband_brackets_follow_algorithm_1() -> None:
    sched = HyperbandSchedule(max_steps=27, min_steps=1, eta=3)  # R = 27, s_max = 3
    assert sched.s_max == 3
    jobs = _drive(sched, lambda t: float((t * 7919) % 101), budget=None or 1e9, limit=200)
    first = [j for j in jobs if j.bracket == 0]
    per_rung = [[j for j in first if j.rung == i] for i in range(4)]
    assert [len(r) for r in per_rung] == [27, 9, 3, 1]
    assert [r[0].stop for r in per_rung] == [1, 3, 9, 27]
    # each rung keeps the best third of the previous one
    for i in range(1, 4):
        prev = sorted(per_rung[i - 1], key=lambda j: (j.trial * 7919) % 101)
        kept = {j.trial for j in prev[: len(per_rung[i])]}
        assert {j.trial for j in per_rung[i]} == kept
        assert all(j.start == per_rung[i - 1][0].stop for j in per_rung[i])
    # bracket s = 2: n = ⌈4·9/3⌉ = 12 configurations at 3 steps
    second = [j for j in jobs if j.bracket == 1]
    assert sum(1 for j in second if j.rung == 0) == 12 and second[0].stop == 3


def test_asha_promotes_the_top_third_as_soon_as_it_can() -> None:
    sched = ASHASchedule([1, 3, 9], eta=3)
    values = {0: 5.0, 1: 1.0, 2: 3.0, 3: 0.5, 4: 4.0, 5: 6.0}
    jobs = _drive(sched, lambda t: values.get(t, 10.0 + t), limit=8)
    # trials 0, 1, 2 at the bottom; then 1 (the best of 3) is promoted at once
    assert [(j.trial, j.rung) for j in jobs[:4]] == [(0, 0), (1, 0), (2, 0), (1, 1)]
    # next: a new trial (3 still has to be seen), then 3 promoted (top 1 of 4 is trial 3? no:
    # ⌊4/3⌋ = 1 and trial 3 (0.5) is the best; it is not promoted yet)
    assert (jobs[4].trial, jobs[4].rung) == (3, 0)
    assert (jobs[5].trial, jobs[5].rung) == (3, 1)


def test_a_continued_run_equals_one_uninterrupted_run() -> None:
    task = make_task("digits-logreg")
    hp = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}
    full = train(task, "momentum", hp, 12, seed=3)
    a = train(task, "momentum", hp, 5, seed=3)
    b = train(task, "momentum", hp, 7, seed=3, params=a.params, opt_state=a.opt_state, start_step=5)
    for k in full.params:
        assert torch.equal(full.params[k], b.params[k]), k
    assert a.losses + b.losses == full.losses


@pytest.mark.parametrize("name", ["hyperband", "asha"])
def test_stopped_trials_are_charged_exactly_what_they_spent(name: str, tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, "test", name)
    res = make(name, workers=0, run_dir=run).run(make_task("quadratic"), Budget(1500, 54), seed=0)
    rows = run.read_trials()
    assert res.grad_evals == sum(r["grad_evals"] for r in rows) <= 1500
    per_trial: dict[int, int] = {}
    last: dict[int, str] = {}
    for r in rows:
        last[r["trial"]] = r["status"]
        if r["status"] == "ok":
            assert r["grad_evals"] == r["steps"] - r["start"]
        else:  # a diverged rung stops at the step that diverged
            assert 0 < r["grad_evals"] <= r["steps"] - r["start"]
        assert r["start"] == per_trial.get(r["trial"], 0)  # continues where it stopped
        per_trial[r["trial"]] = r["steps"]
    assert res.extra["trials_pruned"] > 0 and res.extra["trials_completed"] >= 1
    pruned = [t for t, s in per_trial.items() if s < 54 and last[t] == "ok"]
    assert len(pruned) == res.extra["trials_pruned"]
    assert res.status == "ok" and math.isfinite(res.val_loss)
    assert res.val_loss == min(r["val_loss"] for r in rows if r["steps"] == 54 and r["val_loss"])


@pytest.mark.parametrize("name", ["hyperband", "asha"])
def test_resume_continues_exactly(name: str, tmp_path: Path) -> None:
    task = make_task("quadratic")
    full = make(name, workers=0).run(task, Budget(1200, 54), seed=2)
    run = RunDir.create(tmp_path, "test", name)
    make(name, workers=0, run_dir=run).run(task, Budget(500, 54), seed=2)
    first = len(run.read_trials())
    resumed = make(name, workers=0, run_dir=run).run(task, Budget(1200, 54), seed=2)
    assert resumed.extra["trials_resumed_rungs"] == first > 0
    assert resumed.grad_evals == full.grad_evals
    assert resumed.best_hparams == full.best_hparams and resumed.val_loss == full.val_loss
    assert [p.best_val_loss for p in resumed.curve] == [p.best_val_loss for p in full.curve]


def _hparams_sessions(root: Path) -> dict[str, dict[str, object]]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = {}
    for ev_file in root.rglob("events.out.tfevents.*"):
        for ev in EventFileLoader(str(ev_file)).Load():
            for v in ev.summary.value:
                if v.tag != "_hparams_/session_start_info":
                    continue
                data = plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                hp = data.session_start_info.hparams
                out[ev_file.parent.name] = {
                    k: (x.string_value or x.number_value) for k, x in hp.items()
                }
    return out


def test_pruned_trials_show_as_pruned_in_the_hparams_view(tmp_path: Path) -> None:
    tb = tmp_path / "tb"
    method = make("asha", workers=0, trial_logger=lambda name: TensorBoardLogger(tb / name))
    res = method.run(make_task("quadratic"), Budget(800, 54), seed=0)
    sessions = _hparams_sessions(tb)
    assert len(sessions) == res.extra["trials"]
    statuses = [s["status"] for s in sessions.values()]
    assert statuses.count("pruned") == res.extra["trials_pruned"] > 0
    assert statuses.count("completed") == res.extra["trials_completed"] > 0
    assert all("lr" in s and s["method"] == "asha" for s in sessions.values())


def test_bad_options_name_the_value() -> None:
    with pytest.raises(ValueError, match="eta must be an integer >= 2, got 1"):
        make("hyperband", eta=1)
    with pytest.raises(ValueError, match="min_steps 60 is above the trial length 54"):
        make("asha", workers=0, min_steps=60).run(make_task("quadratic"), Budget(500, 54))


@pytest.mark.parametrize("name", ["hyperband", "asha"])
def test_method_contract(name: str) -> None:
    smoke = pytest.importorskip("method_smoke")
    smoke.check_method(
        make(name, workers=0), smoke.CountingTask(make_task("digits-logreg")), Budget(600, 27),
        seed=0, count_batches=True,
    )  # fmt: skip
