"""Trials and studies: worker processes, dead-worker retries, trials.jsonl, crash safety, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfref.budget import Budget
from selfref.execution import InProcessExecutor, LocalExecutor, TrialStore
from selfref.methods.grid import GridSearch
from selfref.methods.random import RandomSearch
from selfref.methods.trial import TrialRequest, run_trial
from selfref.runs import RunDir
from selfref.search_space import FloatDim, SearchSpace
from selfref.tasks import make

REPO = Path(__file__).resolve().parents[1]
LR_SPACE = SearchSpace((FloatDim("lr", 1e-4, 1e-2, log=True),), optimizer="sgd")
DEADLY_LR = LR_SPACE.grid(3)[1]["lr"]  # the middle of a 3-point grid


def _die_on_deadly_lr(task, request):
    """A trial function whose worker process dies (no exception, no cleanup) on one point."""
    if request.hparams["lr"] == DEADLY_LR:
        os._exit(7)
    return run_trial(task, request)


@pytest.fixture(scope="module")
def quad():
    return make("quadratic")


@pytest.mark.slow
def test_dead_worker_is_retried_once_then_marked_failed(quad, tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, "t", "grid")
    with LocalExecutor(workers=1) as executor:
        grid = GridSearch(
            points=3, order="cartesian", space=LR_SPACE, executor=executor, run_dir=run,
            trial_fn=_die_on_deadly_lr,
        )  # fmt: skip
        res = grid.run(quad, Budget(3 * 10, 10), seed=0)  # the study ends
        started = executor.started_workers
    recs = run.read_trials()
    assert [r["index"] for r in recs] == [0, 1, 2]
    ok, dead, ok2 = recs
    assert ok["status"] == ok2["status"] == "ok" and ok["attempts"] == 1
    assert dead["status"] == "failed" and dead["attempts"] == 2
    assert len(dead["lost"]) == 2 and all("died" in why for why in dead["lost"])
    assert "died" in dead["reason"] and "retried 1 time, then marked failed" in dead["reason"]
    assert started == 3  # the first worker, its replacement for the retry, one more after
    assert res.status == "ok" and res.extra["trials_failed"] == 1
    assert res.grad_evals == 20  # a dead attempt is charged nothing


@pytest.mark.slow
def test_parallel_and_sequential_studies_agree(quad) -> None:
    space = SearchSpace(
        (FloatDim("lr", 1e-4, 1e-2, log=True), FloatDim("momentum", 0.0, 0.9)),
        optimizer="momentum",
    )
    budget = Budget(8 * 25, 25)
    seq = RandomSearch(space=space, workers=0).run(quad, budget, seed=3)
    with LocalExecutor(workers=2) as executor:
        par = RandomSearch(space=space, executor=executor).run(quad, budget, seed=3)
        assert executor.started_workers == 2
    assert par.best_hparams == seq.best_hparams
    assert par.val_loss == seq.val_loss  # bitwise: one thread per trial on both paths
    assert par.grad_evals == seq.grad_evals == 200
    assert par.extra["workers"] == 2 and seq.extra["workers"] == 0


def _jittery_trial(task, request):
    """run_trial after a sleep the seed does not decide: finishing order varies run to run."""
    import random

    time.sleep(random.SystemRandom().uniform(0.0, 0.08))
    return run_trial(task, request)


class _RecordingProposer:
    """A proposer that is not deterministic and records what it had been told at each ask."""

    deterministic = False

    def __init__(self) -> None:
        self.told: list[int] = []
        self.asks: list[tuple[int, tuple[int, ...]]] = []

    def ask(self, index):
        self.asks.append((index, tuple(self.told)))
        return {"lr": 1e-3 * (1 + len(self.told))}  # the point depends on what was told

    def tell(self, index, hparams, record):
        self.told.append(index)

    def replay(self, index, hparams, record):
        self.told.append(index)


@pytest.mark.parametrize("order_seed", [0, 1, 2])
def test_sync_lag_asks_trial_i_with_exactly_the_trials_up_to_i_minus_lag_told(
    quad, order_seed: int
) -> None:
    import random

    from selfref.execution.base import Completion
    from selfref.methods.study import Study

    lag = 3
    prop = _RecordingProposer()
    study = Study("s", quad, quad, LR_SPACE, Budget(10 * 5, 5), 0, prop, sync_lag=lag)
    rng = random.Random(order_seed)  # the finishing order and the free slots vary by seed
    running: list[str] = []
    while not study.done:
        running += [key for key, _, _ in study.units(rng.randint(1, 5))]
        assert len(running) <= lag
        key = running.pop(rng.randrange(len(running)))
        study.finish(Completion(key, value={"status": "ok", "val_loss": 1.0, "grad_evals": 5}))
    assert [i for i, _ in prop.asks] == list(range(10))
    assert all(told == tuple(range(i - lag + 1)) for i, told in prop.asks)
    assert prop.told == list(range(10))  # every result told at the end, in order
    with pytest.raises(ValueError, match="sync_lag must be >= 1"):
        Study("s", quad, quad, LR_SPACE, Budget(10, 5), 0, prop, sync_lag=0)


@pytest.mark.slow
def test_tpe_proposes_the_same_points_on_one_worker_and_on_two(quad, tmp_path: Path) -> None:
    """With the synchronous lag, TPE's points depend on its seed and results, not on timing."""
    pytest.importorskip("optuna", reason="the optuna extra is not installed")
    from selfref import methods

    space = SearchSpace(
        (FloatDim("lr", 1e-4, 1e-2, log=True), FloatDim("momentum", 0.0, 0.9)),
        optimizer="momentum",
    )
    opts = dict(space=space, n_startup_trials=2, sync_lag=2)
    budget = Budget(8 * 20, 20)
    runs = [RunDir.create(tmp_path, f"r{i}", "tpe") for i in range(2)]
    seq = methods.make("tpe", workers=0, run_dir=runs[0], **opts).run(quad, budget, seed=1)
    with LocalExecutor(workers=2) as executor:
        m = methods.make("tpe", executor=executor, run_dir=runs[1], trial_fn=_jittery_trial, **opts)
        par = m.run(quad, budget, seed=1)
    points = [
        {r["index"]: (r["hparams"], r["val_loss"]) for r in run.read_trials()} for run in runs
    ]
    assert len(points[0]) == 8 and points[1] == points[0]
    assert par.best_hparams == seq.best_hparams and par.val_loss == seq.val_loss


def test_in_process_executor_submit_wait_and_records(quad) -> None:
    ex = InProcessExecutor()
    assert ex.capacity() == 1
    ex.submit("k", run_trial, quad, TrialRequest("sgd", {"lr": 1e-3}, 5, 0))
    assert ex.in_flight == 1
    with pytest.raises(RuntimeError, match="no idle worker"):
        ex.submit("k2", run_trial, quad, TrialRequest("sgd", {"lr": 1e-3}, 5, 0))
    [c] = ex.wait()
    rec = c.value
    assert c.key == "k" and c.status == "ok" and c.attempts == 1
    assert rec["status"] == "ok" and rec["grad_evals"] == 5 and rec["compute_s"] > 0
    assert ex.wait() == []
    ex.close()
    with pytest.raises(RuntimeError, match="closed"):
        ex.submit("k3", run_trial, quad, TrialRequest("sgd", {"lr": 1e-3}, 5, 0))


def test_run_trial_records_errors_instead_of_raising(quad) -> None:
    rec = run_trial(quad, TrialRequest("sgd", {"lr": -1.0}, 5, 0))
    assert rec["status"] == "failed" and "lr" in rec["reason"] and rec["grad_evals"] == 0
    assert "Traceback" in rec["traceback"]
    rec = run_trial(quad, TrialRequest("sgd", {"lr": 1e3}, 50, 0))
    assert rec["status"] == "diverged" and rec["grad_evals"] < 50


def test_bad_executor_arguments() -> None:
    with pytest.raises(ValueError, match="workers must be >= 1"):
        LocalExecutor(workers=0)
    with pytest.raises(ValueError, match="unknown multiprocessing context 'fork'"):
        LocalExecutor(workers=1, context="fork")
    with pytest.raises(ValueError, match="timeout must be > 0"):
        LocalExecutor(workers=1, timeout=0)
    with pytest.raises(ValueError, match="workers must be >= 0"):
        RandomSearch(workers=-1)


def test_store_keeps_studies_apart_skips_torn_lines_and_duplicates(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, "t", "s")
    a, b = TrialStore(run, "random-s0"), TrialStore(run, "random-s1")
    a.append({"index": 0, "hparams": {"lr": 0.1}, "grad_evals": 5})
    b.append({"index": 0, "hparams": {"lr": 0.2}, "grad_evals": 5})
    a.append({"index": 1, "hparams": {"lr": 0.3}, "grad_evals": 5})
    with open(run.path / "trials.jsonl", "a") as f:
        f.write('{"index": 2, "study": "random-s0", "hpar')  # torn by a crash
    assert [r["index"] for r in a.load()] == [0, 1]
    assert [r["hparams"]["lr"] for r in b.load()] == [0.2]
    with open(run.path / "trials.jsonl", "a") as f:
        f.write("\n" + json.dumps({"index": 1, "study": "random-s0", "hparams": {}}) + "\n")
    with pytest.warns(UserWarning, match="trial 1 of study 'random-s0' twice"):
        assert [r["hparams"]["lr"] for r in a.load()] == [0.1, 0.3]


def test_resume_in_process_keeps_finished_trials(quad, tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, "t", "random")
    budget = Budget(6 * 10, 10)
    full = RandomSearch(space=LR_SPACE, workers=0).run(quad, budget, seed=0)
    RandomSearch(space=LR_SPACE, workers=0, run_dir=run).run(quad, Budget(3 * 10, 10), seed=0)
    first = run.read_trials()
    res = RandomSearch(space=LR_SPACE, workers=0, run_dir=run).run(quad, budget, seed=0)
    recs = run.read_trials()
    assert recs[:3] == first and [r["index"] for r in recs] == list(range(6))
    assert res.extra["trials_resumed"] == 3
    assert res.best_hparams == full.best_hparams and res.val_loss == full.val_loss
    assert res.curve == full.curve
    # a resume whose proposals no longer match the stored trials is refused
    other = SearchSpace((FloatDim("lr", 1e-5, 1e-2, log=True),), optimizer="sgd")
    with pytest.raises(ValueError, match="seeded proposal"):
        RandomSearch(space=other, workers=0, run_dir=run).run(quad, budget, seed=0)
    with pytest.raises(ValueError, match="spend more than the budget"):
        RandomSearch(space=LR_SPACE, workers=0, run_dir=run).run(quad, Budget(20, 10), seed=0)


@pytest.mark.slow
def test_sigkill_mid_study_then_resume_loses_nothing_and_repeats_nothing(
    tmp_path: Path, run_cli
) -> None:
    """A real `selfref compare` process is SIGKILLed part way; --resume finishes the study."""
    logdir = tmp_path / "logs"
    cmd = [
        sys.executable, "-m", "selfref.cli", "compare", "--methods", "random",
        "--seeds", "0", "--budget", "3000", "--steps-per-trial", "50", "--workers", "1",
        "--logdir", str(logdir),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        run_path = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("run directory: "):
                run_path = Path(line.split(": ", 1)[1].strip())
                break
        assert run_path is not None, "compare did not print its run directory"
        trials = run_path / "trials.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if trials.exists() and trials.read_text().count("\n") >= 3:
                break
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker, mid-study
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    before = [ln for ln in trials.read_text().splitlines(keepends=True) if ln.endswith("\n")]
    assert 3 <= len(before) < 60, f"{len(before)} trials finished before the kill"
    assert not (run_path / "results.md").exists()

    r = run_cli("compare", "--resume", run_path, "--workers", "0")
    assert r.code == 0, r.err
    after = trials.read_text().splitlines(keepends=True)
    assert after[: len(before)] == before  # every finished trial kept, byte for byte
    indices = [json.loads(ln)["index"] for ln in after]
    assert len(indices) == len(set(indices))  # none run twice
    results = json.loads((run_path / "results.json").read_text())
    [res] = results
    assert res["status"] == "ok" and res["extra"]["trials_resumed"] == len(before)
    assert res["grad_evals"] == sum(json.loads(ln)["grad_evals"] for ln in after) <= 3000
    assert res["grad_evals"] > 3000 - 50
    assert (run_path / "results.md").exists() and (run_path / "curves.png").exists()
    assert len((run_path / "argv.txt").read_text().splitlines()) == 2
