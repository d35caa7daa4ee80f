"""rnn-bo, hyperband and asha in ``selfref compare``: on every executor, resumed, on Dask.

Their studies run as jobs on one executor beside each other (the rungs of hyperband and asha
are units of their own, rnn-bo keeps one trial in flight). Hyperband's synchronous rungs and
rnn-bo's sequential trials do not depend on how many units run at once, so their Results on
two local worker processes must equal the in-process ones number for number; ASHA's
promotions depend on the order rungs finish, so it is held to its invariants there.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from selfref.budget import Budget
from selfref.compare import CompareConfig, run_comparison
from selfref.execution import InProcessExecutor, LocalExecutor
from selfref.methods import make
from selfref.runs import RunDir
from selfref.tasks import make as make_task

METHODS = ("rnn-bo", "hyperband", "asha")


def _config(**kw) -> CompareConfig:
    base = dict(
        task="quadratic",
        task_options={"functions": "fixed"},
        methods=METHODS,
        seeds=(0,),
        grad_evals=400,
        steps_per_trial=27,
        workers=0,
    )
    return CompareConfig(**{**base, **kw})  # type: ignore[arg-type]


def _rows_by_study(run: RunDir) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in run.read_trials():
        out.setdefault(r["study"], []).append(r)
    return out


def _check_charges(res, rows: list[dict], budget: int) -> None:
    """Every unit's record is charged what it spent, and the Result is their sum."""
    assert res.status == "ok", res.reason
    assert res.grad_evals == sum(r["grad_evals"] for r in rows) <= budget
    if "rung" in rows[0]:
        last: dict[int, int] = {}
        for r in rows:
            assert r["start"] == last.get(r["trial"], 0)  # continues where it stopped
            if r["status"] == "ok":
                assert r["grad_evals"] == r["steps"] - r["start"]
            last[r["trial"]] = r["steps"]


def test_the_three_methods_share_one_executor_in_process_and_on_two_workers(
    tmp_path: Path,
) -> None:
    config = _config()
    task = make_task(config.task, **config.task_options)
    out, rungs = {}, {}
    for kind, executor in (("in", InProcessExecutor()), ("local", LocalExecutor(2))):
        run = RunDir.create(tmp_path, "cmp", kind)
        try:
            results = run_comparison(config, task, run_dir=run, executor=executor)
        finally:
            executor.close()
        rows = _rows_by_study(run)
        assert [r.method for r in results] == list(METHODS)
        for res in results:
            _check_charges(res, rows[f"{res.method}-s0"], config.grad_evals)
        out[kind] = {r.method: r for r in results}
        rungs[kind] = rows
        # rungs continue in whichever worker runs them: the state travels with the unit
        assert any(r["start"] > 0 for r in rows["hyperband-s0"])
        assert any(r["start"] > 0 for r in rows["asha-s0"])
    for name in ("rnn-bo", "hyperband"):  # independent of the number of units in flight
        a, b = out["in"][name], out["local"][name]
        assert a.grad_evals == b.grad_evals and a.val_loss == b.val_loss
        assert a.best_hparams == b.best_hparams and a.extra["trials"] == b.extra["trials"]
    # rnn-bo: the same trials in the same order, so the same curve
    fields = ("hparams", "status", "grad_evals", "val_loss")
    seq = {k: [tuple(str(r[f]) for f in fields) for r in v["rnn-bo-s0"]] for k, v in rungs.items()}
    assert seq["in"] == seq["local"]
    assert out["in"]["rnn-bo"].curve == out["local"]["rnn-bo"].curve
    # hyperband: the same rungs with the same numbers; within a rung only the order in which
    # they finished (and so the curve between rung ends) depends on the workers
    fields = ("trial", "rung", "start", "steps", "status", "grad_evals", "val_loss")
    hb = {
        k: sorted(tuple(str(r[f]) for f in fields) for r in v["hyperband-s0"])
        for k, v in rungs.items()
    }
    assert hb["in"] == hb["local"]
    assert out["in"]["hyperband"].curve[-1] == out["local"]["hyperband"].curve[-1]
    assert out["in"]["rnn-bo"].meta_train_grad_evals > 0  # beside the budget, not inside
    asha = out["local"]["asha"]
    assert asha.extra["trials_pruned"] > 0 and asha.extra["trials_completed"] > 0


def test_a_promotion_whose_state_is_gone_retrains_from_step_0_and_is_charged_for_it(
    tmp_path: Path,
) -> None:
    task = make_task("quadratic")
    run = RunDir.create(tmp_path, "test", "asha")
    make("asha", workers=0, run_dir=run).run(task, Budget(500, 54), seed=1)
    first = len(run.read_trials())
    shutil.rmtree(run.checkpoints)  # the rung states are lost
    res = make("asha", workers=0, run_dir=run).run(task, Budget(1500, 54), seed=1)
    rows = run.read_trials()
    later = rows[first:]
    seen = {r["trial"] for r in rows[:first]}
    retrained = [r for r in later if r["trial"] in seen and r["rung"] > 0]
    assert retrained, "no configuration of the first run was promoted after the resume"
    assert all(r["start"] == 0 and r["grad_evals"] == r["steps"] for r in retrained)
    assert res.grad_evals == sum(r["grad_evals"] for r in rows) <= 1500


@pytest.mark.slow
def test_compare_cli_on_a_local_dask_cluster_and_resume(tmp_path: Path, run_cli) -> None:
    pytest.importorskip("distributed", reason="the cluster extra is not installed")
    logdir = tmp_path / "logs"
    args = ["compare", "--task", "quadratic", "--methods", ",".join(METHODS), "--seeds", "0",
            "--budget", "300", "--steps-per-trial", "27", "--logdir", logdir]  # fmt: skip
    r = run_cli(*args, "--cluster", "local:2")
    assert r.code == 0, r.err
    (run,) = (logdir / "compare").iterdir()
    results = json.loads((run / "results.json").read_text())
    assert [(d["method"], d["status"]) for d in results] == [(m, "ok") for m in METHODS]
    rows = _rows_by_study(RunDir.open(run))
    for d in results:
        assert d["grad_evals"] == sum(x["grad_evals"] for x in rows[f"{d['method']}-s0"]) <= 300
        assert math.isfinite(d["val_loss"])
    # one HParams run per trial of the multi-fidelity methods, beside the pair's own run
    trials = sorted(p.name for p in (run / "tb" / "asha-s0").iterdir() if p.is_dir())
    assert len(trials) == next(d for d in results if d["method"] == "asha")["extra"]["trials"]
    # a resume of the finished comparison keeps every result and runs nothing again
    again = run_cli("compare", "--resume", str(run), "--workers", "0")
    assert again.code == 0, again.err
    assert json.loads((run / "results.json").read_text()) == results
    assert len(RunDir.open(run).read_trials()) == sum(len(v) for v in rows.values())


@pytest.mark.slow
def test_a_killed_comparison_resumes_its_rungs_exactly(tmp_path: Path, run_cli) -> None:
    """SIGKILL the driver mid-study, resume: nothing finished runs again, the rungs in flight
    run again (from their kept states), and the Result equals the uninterrupted one."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["compare", "--task", "quadratic", "--methods", "hyperband", "--seeds", "0",
            "--budget", "3000", "--steps-per-trial", "54", "--workers", "0"]  # fmt: skip
    ref = run_cli(*args, "--logdir", tmp_path / "ref")
    assert ref.code == 0, ref.err
    (ref_run,) = (tmp_path / "ref" / "compare").iterdir()
    want = json.loads((ref_run / "results.json").read_text())[0]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    logdir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "selfref.cli", *args, "--logdir", str(logdir)],
        cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        trials = None
        while time.monotonic() < deadline and proc.poll() is None:
            runs = list((logdir / "compare").glob("*")) if (logdir / "compare").is_dir() else []
            trials = runs[0] / "trials.jsonl" if runs else None
            if trials is not None and trials.is_file() and trials.read_text().count("\n") >= 20:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the comparison ended before it was killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert trials is not None
    before = len(RunDir.open(trials.parent).read_trials())
    again = run_cli("compare", "--resume", str(trials.parent), "--workers", "0")
    assert again.code == 0, again.err
    got = json.loads((trials.parent / "results.json").read_text())[0]
    rows = RunDir.open(trials.parent).read_trials()
    assert got["extra"]["trials_resumed_rungs"] == before
    assert len({(r["trial"], r["rung"]) for r in rows}) == len(rows)  # none ran twice
    for key in ("val_loss", "test_loss", "grad_evals", "best_hparams", "curve"):
        assert got[key] == want[key], key
