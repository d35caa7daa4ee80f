"""Comparisons on a Dask cluster: overhead against local processes, dispatch rate, faults.

Measured in one run, side by side:

1. **Overhead.** The same comparison (digits-mlp; grid, random, TPE and hypernet; the quick
   budget; seeds 0-2) on the local executor with 2 worker processes and on a local Dask
   cluster of 2 single-thread workers, alternating, ``--reps`` times each. Both executors
   are started (and each worker warmed by one unit) before the clock starts: a cluster is
   started once and then serves many comparisons; the start-up seconds are reported beside.
   Target: Dask wall <= 1.15 x local (median over the repetitions). The two runs must give
   the same numbers (checked: ``results_identical``).
2. **Dispatch.** A random-search study of trials that do nothing (a record back at once),
   journaled to a real trials.jsonl (fsync'd per trial), on a Dask cluster of processes
   (``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1, as a real cluster
   runs them): the trials per second the driver sustains. Target: >= 200 per second. The
   projection: with trials of T seconds the driver keeps ``rate x T`` slots busy. Tuned:
   ``prefetch`` = k units queued per slot (``selfref compare --prefetch``) for k = 1, 2, 4
   (each reported; the target is read on the best k) and the trial store's group commit
   (fsync at most every 50 ms) instead of an fsync per trial. Beside
   the wall-clock rate, the driver's and the scheduler's CPU milliseconds per trial:
   ``1000 / max(cpu_ms)`` is the rate a dedicated core for each would sustain, a figure a
   machine shared with other jobs distorts less than the wall clock.
3. **Faults.** A random-search study of real trials on the Dask cluster; one worker process
   is SIGKILLed once a few trials have finished (its nanny restarts it). Target: 0 trials
   lost, 0 repeated, and the same best trial as the same study in one process.

``--quick`` shrinks every part (a smoke run, < 1 minute; its targets are not meaningful).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from benchmarks.common import base_parser, target, write_result
from selfref import methods
from selfref.budget import Budget
from selfref.compare import CompareConfig, run_comparison
from selfref.execution import Executor, LocalExecutor, drive
from selfref.execution.cluster import DaskExecutor
from selfref.methods.random import RandomSearch
from selfref.methods.trial import TrialRequest, warmup
from selfref.runs import RunDir
from selfref.search_space import FloatDim, SearchSpace
from selfref.tasks import Task, make

DETERMINISTIC = ("grid", "random", "hypernet")  # same numbers whatever the order of completion


REPO = Path(__file__).resolve().parents[1]


def noop_trial(task: Task, request: TrialRequest) -> dict[str, Any]:
    """A trial that does nothing: the record of a run of ``request.steps`` steps, at once."""
    return {
        "status": "ok",
        "reason": None,
        "val_loss": float(request.hparams["lr"]),
        "val_accuracy": None,
        "test_loss": float(request.hparams["lr"]),
        "test_accuracy": None,
        "grad_evals": request.steps,
        "compute_s": 0.0,
        "pid": os.getpid(),
    }


def _noop() -> int:
    return os.getpid()


def _warm(ex: Executor) -> None:
    """One no-op unit per slot, so every worker has started before timing."""
    n = ex.capacity()
    for i in range(n):
        ex.submit(f"warm-{i}", _noop)
    while ex.in_flight:
        ex.wait()


def overhead(local: Executor, dask: Executor, config: CompareConfig, reps: int) -> dict[str, Any]:
    """The same comparison on both executors, alternating; wall seconds of each run."""
    task = make(config.task)
    walls: dict[str, list[float]] = {"local": [], "dask": []}
    numbers: dict[str, list[Any]] = {}
    for _ in range(reps):
        for name, ex in (("local", local), ("dask", dask)):
            t0 = time.perf_counter()
            results = run_comparison(config, task, executor=ex, threads=1)
            walls[name].append(time.perf_counter() - t0)
            numbers[name] = [(r.method, r.seed, r.status, r.val_loss, r.test_loss) for r in results]
    # TPE's proposals depend on the order trials finish in, so only the other methods
    # must agree number for number
    fixed = {k: [r for r in v if r[0] in DETERMINISTIC] for k, v in numbers.items()}
    return {
        "local_wall_s": walls["local"],
        "dask_wall_s": walls["dask"],
        "ratio": statistics.median(walls["dask"]) / statistics.median(walls["local"]),
        "identical": fixed["local"] == fixed["dask"],
        "results": numbers,
    }


def dispatch(ex: Executor, trials: int, sync_s: float = 0.0) -> dict[str, float]:
    """No-op trials per second through a journaled random-search study on ``ex``."""
    space = SearchSpace((FloatDim("lr", 1e-4, 1.0, log=True),), optimizer="sgd")
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir.create(tmp, "bench", "dispatch")
        search = RandomSearch(space=space, executor=ex, run_dir=run, trial_fn=noop_trial)
        task = make("quadratic")
        t0, c0 = time.perf_counter(), time.process_time()
        study = search.study(task, Budget(trials, 1), None, 0, ex.share(task), sync_s=sync_s)
        drive(ex, [study])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert len(study.outcome.records) == trials and len(run.read_trials()) == trials
    return {
        "trials": trials,
        "wall_s": wall,
        "per_s": trials / wall,
        "driver_cpu_ms_per_trial": 1e3 * cpu / trials,
    }


class ProcessCluster:
    """``dask scheduler`` and ``dask worker`` processes on 127.0.0.1 (stopped by pid)."""

    def __init__(self, workers: int, tmp: str) -> None:
        env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        sched_file = Path(tmp) / "scheduler.json"
        py = [sys.executable, "-m", "dask"]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
        self.procs = [
            subprocess.Popen(
                [*py, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                 "--scheduler-file", str(sched_file)], **quiet,
            )
        ]  # fmt: skip
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.2)
        self.address = json.loads(sched_file.read_text())["address"]
        for _ in range(workers):
            self.procs.append(
                subprocess.Popen(
                    [*py, "worker", "--scheduler-file", str(sched_file), "--host", "127.0.0.1",
                     "--nthreads", "1", "--no-nanny", "--resources", "CPU=1",
                     "--no-dashboard"], **quiet,
                )
            )  # fmt: skip
        self.scheduler = psutil.Process(self.procs[0].pid)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


PREFETCH_PER_SLOT = (1, 2, 4)  # the tuned settings tried: units queued per cluster slot


def dispatch_processes(trials: int, tuned: bool, per_slot: int = 1) -> dict[str, float]:
    """Dispatch through a scheduler process of its own (as on a real cluster), with the
    driver's and the scheduler's CPU per trial measured apart; ``tuned``: ``per_slot``
    units prefetched per slot and group commit."""
    with tempfile.TemporaryDirectory() as tmp:
        cluster = ProcessCluster(2, tmp)
        try:
            ex = DaskExecutor(cluster.address)
            try:
                while ex.capacity() < 2:
                    time.sleep(0.1)
                _warm(ex)
                ex.prefetch = per_slot * ex.capacity() if tuned else 0
                c0 = sum(cluster.scheduler.cpu_times()[:2])
                out = dispatch(ex, trials, sync_s=0.05 if tuned else 0.0)
                sched_cpu = sum(cluster.scheduler.cpu_times()[:2]) - c0
            finally:
                ex.close()
        finally:
            cluster.stop()
    out["scheduler_cpu_ms_per_trial"] = 1e3 * sched_cpu / trials
    return out


def faults(dask: DaskExecutor, trials: int, steps: int, kill_after: int) -> dict[str, Any]:
    """A real study on the cluster with one worker SIGKILLed part way."""
    task = make("digits-mlp")
    pids = dask.client.run(os.getpid)  # worker address -> pid
    victim = sorted(pids.values())[0]
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir.create(tmp, "bench", "faults")
        trials_file = run.path / "trials.jsonl"
        killed_at: list[int] = []

        def killer() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                n = trials_file.read_text().count("\n") if trials_file.exists() else 0
                if n >= kill_after:
                    os.kill(victim, signal.SIGKILL)
                    killed_at.append(n)
                    return
                time.sleep(0.005)

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        res = RandomSearch(executor=dask, run_dir=run).run(
            task, Budget(trials * steps, steps), seed=0
        )
        t.join(timeout=5)
        recs = run.read_trials()
    ref = RandomSearch(workers=0).run(task, Budget(trials * steps, steps), seed=0)
    indices = [r["index"] for r in recs]
    return {
        "trials": trials,
        "killed_after_trials": killed_at[0] if killed_at else None,
        "lost": len(set(range(trials)) - set(indices)),
        "repeated": len(indices) - len(set(indices)),
        "retried": sum(1 for r in recs if r.get("attempts", 1) > 1),
        "failed": sum(1 for r in recs if r["status"] != "ok"),
        "reasons": sorted({str(r["reason"]) for r in recs if r["status"] != "ok"}),
        "same_best_as_in_process": res.best_hparams == ref.best_hparams
        and res.val_loss == ref.val_loss,
    }


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=None, help="repetitions of the overhead part")
    args = p.parse_args()
    torch.set_num_threads(1)
    quick = args.quick
    names = [m for m in ("grid", "random", "tpe", "hypernet") if m in methods.names()]
    config = CompareConfig(
        task="digits-mlp",
        methods=tuple(names[:2] if quick else names),
        seeds=(0,) if quick else (0, 1, 2),
        grad_evals=600 if quick else 2000,
        steps_per_trial=100,
        workers=2,
    )
    reps = args.reps or (1 if quick else 3)
    n_dispatch = 200 if quick else 3000

    t0 = time.perf_counter()
    local = LocalExecutor(2, setup=warmup)
    _warm(local)
    local_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    dask = DaskExecutor("local:2", setup=warmup)
    _warm(dask)
    dask_start = time.perf_counter() - t0
    try:
        over = overhead(local, dask, config, reps)
        disp_local = dispatch(local, n_dispatch)
        fault = faults(dask, trials=12 if quick else 40, steps=100, kill_after=3 if quick else 8)
    finally:
        local.close()
        dask.close()
    disp_dask = dispatch_processes(n_dispatch, tuned=False)
    sweep = {k: dispatch_processes(n_dispatch, tuned=True, per_slot=k) for k in PREFETCH_PER_SLOT}
    best_k = max(sweep, key=lambda k: sweep[k]["per_s"])
    disp_tuned = {**sweep[best_k], "prefetch_per_slot": best_k}

    rate = disp_dask["per_s"]
    best = max(rate, disp_tuned["per_s"])
    projection = {f"slots_busy_at_{t}s_trials": best * t for t in (1, 10, 60)}
    metrics = {
        "dask_over_local_wall": over["ratio"],
        "local_wall_s_median": statistics.median(over["local_wall_s"]),
        "dask_wall_s_median": statistics.median(over["dask_wall_s"]),
        "results_identical": float(over["identical"]),
        "local_start_s": local_start,
        "dask_start_s": dask_start,
        "dispatch_dask_trials_per_s": rate,
        "dispatch_dask_tuned_trials_per_s": disp_tuned["per_s"],
        "dispatch_dask_tuned_prefetch_per_slot": best_k,
        **{f"dispatch_dask_prefetch{k}x_trials_per_s": sweep[k]["per_s"] for k in sweep},
        "dispatch_local_trials_per_s": disp_local["per_s"],
        "dispatch_dask_driver_cpu_ms_per_trial": disp_dask["driver_cpu_ms_per_trial"],
        "dispatch_dask_scheduler_cpu_ms_per_trial": disp_dask["scheduler_cpu_ms_per_trial"],
        "dispatch_dask_cpu_bound_trials_per_s": 1e3
        / max(disp_dask["driver_cpu_ms_per_trial"], disp_dask["scheduler_cpu_ms_per_trial"]),
        **projection,
        "faults_lost": fault["lost"],
        "faults_repeated": fault["repeated"],
        "faults_retried": fault["retried"],
        "faults_failed": fault["failed"],
        "faults_same_best": float(fault["same_best_as_in_process"]),
    }
    targets = {
        "dask_over_local_wall": target(over["ratio"], "<= 1.15"),
        "dispatch_dask_trials_per_s": target(rate, ">= 200"),
        "dispatch_dask_tuned_trials_per_s": target(disp_tuned["per_s"], ">= 200"),
        "faults_lost": target(fault["lost"], "<= 0"),
        "faults_repeated": target(fault["repeated"], "<= 0"),
        "results_identical": target(float(over["identical"]), ">= 1"),
    }
    out = args.out or (Path(__file__).parent / "results" / "cluster.quick.json" if quick else None)
    write_result(
        "cluster",
        {
            "quick": quick,
            "comparison": {
                "task": config.task,
                "methods": list(config.methods),
                "seeds": list(config.seeds),
                "grad_evals": config.grad_evals,
                "steps_per_trial": config.steps_per_trial,
            },
            "reps": reps,
            "local_wall_s": over["local_wall_s"],
            "dask_wall_s": over["dask_wall_s"],
            "dispatch": {
                "dask": disp_dask,
                "dask_tuned": disp_tuned,
                "dask_tuned_sweep": {str(k): v for k, v in sweep.items()},
                "local": disp_local,
            },
            "faults": fault,
            "workers": 2,
            "notes": (
                "executors started and warmed before timing; dispatch journals every no-op "
                "trial to trials.jsonl: fsync per trial and no prefetch (the defaults), and "
                "'tuned': DaskExecutor(prefetch=k x slots, `selfref compare --prefetch`), k "
                "in PREFETCH_PER_SLOT, the best k reported, with TrialStore group commit "
                "(sync_s=0.05); projection: slots kept busy = best rate x trial seconds"
            ),
        },
        metrics,
        targets,
        out=out,
    )


if __name__ == "__main__":
    main()
