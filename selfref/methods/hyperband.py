"""Multi-fidelity search on gradient-evaluation rungs: ``hyperband`` and ``asha``.

- **Hyperband** (Li, Jamieson, DeSalvo, Rostamizadeh, Talwalkar 2017, "Hyperband: a novel
  bandit-based approach to hyperparameter optimization", JMLR, Algorithm 1): with maximum
  resource R (in units of the smallest rung) and reduction factor η, s_max = ⌊log_η R⌋;
  bracket s = s_max, …, 0 draws n = ⌈(s_max + 1) η^s / (s + 1)⌉ random configurations and
  runs SuccessiveHalving on them: rung i trains n_i = ⌊n η^{−i}⌋ configurations for
  r_i = R η^{i−s} units and keeps the best ⌊n_i / η⌋ for rung i + 1. Brackets repeat, s_max
  first, while the budget lasts (the paper's "infinite horizon" use).
- **ASHA** (Li, Jamieson, Rostamizadeh, Gonina, Ben-Tzur, Hardt, Recht, Talwalkar 2020,
  "A system for massively parallel hyperparameter tuning", MLSys, Algorithm 2, early-stopping
  rate s = 0): rungs r_k = r_min η^k up to R; whenever a worker is free, promote the best
  configuration of the highest rung k that is in the top ⌊|rung k| / η⌋ and not yet
  promoted, else start a new random configuration at the bottom rung. No waiting at rungs.

Resource unit = gradient evaluations: the rungs are training steps, the largest rung is
``budget.steps_per_trial`` (one full trial of the other search methods), the smallest
``min_steps`` (default: the largest divided by η³, so four rungs). A trial is one
configuration; it reports its validation loss at each rung it reaches. A promoted trial
*continues* its run from the weights and optimizer state it stopped with
(:func:`selfref.train.train` with ``opt_state``/``start_step``: the same numbers as one
uninterrupted run), so a trial stopped after rung k has cost exactly r_k gradient
evaluations and is charged exactly that. Configurations are drawn as random search draws
them (:func:`selfref.methods.random.trial_generator`), as both papers do.

Why not Optuna's ``HyperbandPruner``/``SuccessiveHalvingPruner``: a pruner decides inside
the objective, in the process that owns the study, after ``trial.report``; here trials run in
worker processes (:class:`~selfref.methods.trials.TrialRunner`), so every rung would be a
blocking round trip to a shared storage, and Optuna's HyperbandPruner assigns trials to
brackets by hashing their ids and prunes against whatever trials have reported, which is
neither the paper's bracket loop nor exact about what each trial spends. On the harness each
rung is a unit of work: workers stay busy (ASHA's point), the charge is exact, every rung's
record goes to ``trials.jsonl`` at once, and ``--resume`` replays them.

Records: one line per rung (``index`` counts rungs; ``trial``, ``rung``, ``steps`` — the
trial's gradient evaluations so far — and ``val_loss``). With a run directory, each rung's
weights and optimizer state are kept in ``checkpoints/<study>/trial-<i>.pt`` so a resumed
study continues promotions exactly; without one (or with the file gone) a promotion after a
resume retrains from step 0 and is charged for it. The result is the best configuration
among those trained to the largest rung; the best-so-far curve moves when one finishes.
With ``trial_logger`` each trial gets one row in TensorBoard's HParams view: its
hyperparameters, ``status`` (``completed``, ``pruned`` or ``diverged``/``failed``), the rung
it stopped at and its last validation loss.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from selfref import checkpoints
from selfref.budget import Budget, CostCounter, peak_memory_bytes
from selfref.execution.optuna_storage import OptunaStore, open_store
from selfref.logging import Logger
from selfref.methods.base import CurvePoint, Result
from selfref.methods.random import RandomProposer
from selfref.methods.trials import TrialRunner
from selfref.runs import RunDir
from selfref.search_space import SearchSpace, default_space
from selfref.tasks import Task

__all__ = [
    "SegmentRequest",
    "run_segment",
    "Job",
    "rung_steps",
    "ASHASchedule",
    "HyperbandSchedule",
    "MultiFidelitySearch",
    "Hyperband",
    "ASHA",
]

Record = dict[str, Any]


@dataclass(frozen=True)
class SegmentRequest:
    """One rung of one trial: continue training from ``start`` to ``start + steps``.

    Args:
        optimizer, hparams, seed: as :class:`~selfref.methods.trials.TrialRequest`.
        start: steps the trial has taken (0: a fresh start from ``task.init_params``).
        steps: steps of this rung.
        params, opt_state: the trial's weights and optimizer state after ``start`` steps.
    """

    optimizer: str
    hparams: Mapping[str, Any]
    seed: int
    start: int
    steps: int
    params: dict[str, torch.Tensor] | None = None
    opt_state: Any = None


def run_segment(task: Task, request: SegmentRequest) -> Record:
    """Train one rung and evaluate the val split (test too); never raises.

    Returns:
        A record as :func:`selfref.methods.trials.run_trial`'s (``grad_evals`` = the steps
        of this rung), plus ``state``: the weights and optimizer state to continue from.
    """
    from selfref.train import train

    t0 = time.perf_counter()
    rec: Record = {
        "status": "ok",
        "reason": None,
        "val_loss": None,
        "val_accuracy": None,
        "test_loss": None,
        "test_accuracy": None,
        "grad_evals": 0,
        "pid": os.getpid(),
        "state": None,
    }
    hp = {k: v for k, v in request.hparams.items() if k != "l2"}
    l2 = float(request.hparams.get("l2", 0.0))
    try:
        out = train(
            task,
            request.optimizer,
            hp,
            request.steps,
            request.seed,
            params=request.params,
            l2=l2,
            opt_state=request.opt_state,
            start_step=request.start,
        )
        rec["grad_evals"] = out.grad_evals
        if out.status != "ok":
            rec["status"] = "diverged"
            rec["reason"] = (
                f"non-finite training loss at step {request.start + (out.diverged_step or 0)}"
            )
        else:
            val = task.evaluate(out.params, "val")
            if not math.isfinite(val["loss"]):
                rec["status"], rec["reason"] = "diverged", "non-finite validation loss"
            else:
                test = task.evaluate(out.params, "test")
                rec["val_loss"] = val["loss"]
                rec["val_accuracy"] = val.get("accuracy")
                rec["test_loss"] = test["loss"] if math.isfinite(test["loss"]) else None
                rec["test_accuracy"] = test.get("accuracy")
                rec["state"] = {"params": out.params, "opt_state": out.opt_state}
    except Exception as e:  # recorded with its reason; the search goes on
        rec["status"] = "failed"
        rec["reason"] = f"{type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc(limit=8)
    rec["compute_s"] = time.perf_counter() - t0
    return rec


@dataclass(frozen=True)
class Job:
    """Train ``trial`` from ``start`` to ``stop`` steps (rung ``rung``; bracket for Hyperband)."""

    trial: int
    rung: int
    start: int
    stop: int
    bracket: int = 0


def rung_steps(max_steps: int, min_steps: int, eta: int) -> list[int]:
    """Rung resources in steps: min_steps·η^k while below max_steps, then max_steps."""
    if eta < 2:
        raise ValueError(f"eta must be an integer >= 2, got {eta}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    out = []
    r = float(min_steps)
    while round(r) < max_steps:
        out.append(int(round(r)))
        r *= eta
    out.append(max_steps)
    return out


def _value(rec: Mapping[str, Any]) -> float:
    v = rec.get("val_loss")
    if rec.get("status") != "ok" or v is None or not math.isfinite(float(v)):
        return math.inf
    return float(v)


class ASHASchedule:
    """Asynchronous successive halving (Li et al. 2020, Algorithm 2, s = 0)."""

    def __init__(self, rungs: list[int], eta: int) -> None:
        self.rungs, self.eta = list(rungs), eta
        self.results: list[dict[int, float]] = [{} for _ in rungs]  # rung -> trial -> value
        self.promoted: list[set[int]] = [set() for _ in rungs]
        self.next_trial = 0

    def next_job(self, affordable: float) -> Job | None:
        K = len(self.rungs) - 1
        for k in range(K - 1, -1, -1):
            done = self.results[k]
            top = sorted((v, t) for t, v in done.items() if math.isfinite(v))
            top = top[: len(done) // self.eta]
            for _, t in top:
                if t not in self.promoted[k]:
                    cost = self.rungs[k + 1] - self.rungs[k]
                    if cost <= affordable:
                        self.promoted[k].add(t)
                        return Job(t, k + 1, self.rungs[k], self.rungs[k + 1])
                    break
        if self.rungs[0] <= affordable:
            t = self.next_trial
            self.next_trial += 1
            return Job(t, 0, 0, self.rungs[0])
        return None

    def claim(self, job: Job) -> None:
        """A job found in the store (resume): mark it issued."""
        if job.rung == 0:
            self.next_trial = max(self.next_trial, job.trial + 1)
        else:
            self.promoted[job.rung - 1].add(job.trial)

    def report(self, job: Job, value: float) -> None:
        self.results[job.rung][job.trial] = value


@dataclass
class _Bracket:
    s: int
    trials: list[int]  # the configurations of the current rung
    rung: int = 0
    issued: set[int] = field(default_factory=set)
    results: dict[int, float] = field(default_factory=dict)


class HyperbandSchedule:
    """Hyperband's bracket loop with synchronous SuccessiveHalving (Li et al. 2017, Alg. 1)."""

    def __init__(self, max_steps: int, min_steps: int, eta: int) -> None:
        rung_steps(max_steps, min_steps, eta)  # validates
        self.max_steps, self.eta = max_steps, eta
        self.R = max_steps / min_steps
        self.s_max = int(math.floor(math.log(self.R, eta) + 1e-9))
        self.next_trial = 0
        self.bracket_index = 0
        self.bracket = self._open(0)

    def _open(self, index: int) -> _Bracket:
        s = self.s_max - index % (self.s_max + 1)
        n = math.ceil((self.s_max + 1) * self.eta**s / (s + 1))
        trials = list(range(self.next_trial, self.next_trial + n))
        self.next_trial += n
        return _Bracket(s, trials)

    def steps(self, s: int, i: int) -> int:
        """r_i of bracket s in steps: R η^{i−s} units, the top rung exactly max_steps."""
        return max(1, int(round(self.max_steps * float(self.eta) ** (i - s))))

    def _job(self, trial: int) -> Job:
        b = self.bracket
        start = 0 if b.rung == 0 else self.steps(b.s, b.rung - 1)
        return Job(trial, b.rung, start, self.steps(b.s, b.rung), self.bracket_index)

    def next_job(self, affordable: float) -> Job | None:
        b = self.bracket
        for t in b.trials:
            if t not in b.issued:
                job = self._job(t)
                if job.stop - job.start > affordable:
                    return None
                b.issued.add(t)
                return job
        return None  # wait for the rung to finish

    def claim(self, job: Job) -> None:
        if job.bracket != self.bracket_index or job.rung != self.bracket.rung:
            raise ValueError(
                f"stored rung (bracket {job.bracket}, rung {job.rung}, trial {job.trial}) "
                f"is not the next one of the Hyperband schedule (bracket "
                f"{self.bracket_index}, rung {self.bracket.rung}); the study's settings changed"
            )
        self.bracket.issued.add(job.trial)

    def report(self, job: Job, value: float) -> None:
        b = self.bracket
        b.results[job.trial] = value
        if len(b.results) < len(b.trials):
            return
        keep = len(b.trials) // self.eta
        if b.rung >= b.s or keep == 0:  # bracket done: the next one
            self.bracket_index += 1
            self.bracket = self._open(self.bracket_index)
            return
        ranked = sorted((v, t) for t, v in b.results.items() if math.isfinite(v))
        b.trials = [t for _, t in ranked[:keep]]
        if not b.trials:  # every configuration diverged: the next bracket
            self.bracket_index += 1
            self.bracket = self._open(self.bracket_index)
            return
        b.rung += 1
        b.issued, b.results = set(), {}


class MultiFidelitySearch:
    """Base of ``hyperband`` and ``asha``: random configurations trained rung by rung.

    Args:
        eta: reduction factor η (both papers: 3).
        min_steps: the smallest rung in steps (default ``steps_per_trial // η³``, at least 1).
        space: the search space (default :func:`selfref.search_space.default_space`).
        workers: worker processes (default: CPU cores; 0 = in-process).
        run_dir: where ``trials.jsonl`` and the rung checkpoints live (resume).
        trial_logger: ``name -> Logger`` for one HParams row per trial (names
            ``<method>-s<seed>/trial-<i>``); ``selfref compare`` passes its own.
        runner: accepted for the harness's shared pool and not used: rungs carry weights,
            so they run on a pool of their own (:func:`run_segment`).
        storage: an Optuna RDB URL the trials also go to, one Optuna trial per
            configuration with its rungs as intermediate values, stopped ones ``PRUNED``.
    """

    name: ClassVar[str] = "multifidelity"

    def __init__(
        self,
        eta: int = 3,
        min_steps: int | None = None,
        space: SearchSpace | None = None,
        workers: int | None = None,
        run_dir: RunDir | str | None = None,
        trial_logger: Callable[[str], Logger] | None = None,
        runner: TrialRunner | None = None,
        storage: str | None = None,
    ) -> None:
        if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
            raise ValueError(f"eta must be an integer >= 2, got {eta!r}")
        if min_steps is not None and min_steps < 1:
            raise ValueError(f"min_steps must be >= 1, got {min_steps}")
        if workers is not None and workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = in-process), got {workers}")
        if space is not None and not isinstance(space, SearchSpace):
            raise ValueError(f"space must be a SearchSpace, got {type(space).__name__}")
        self.eta, self.min_steps = eta, min_steps
        self.space, self.workers = space, workers
        self.run_dir = RunDir.open(run_dir) if isinstance(run_dir, str) else run_dir
        self.trial_logger = trial_logger
        self.storage = storage

    def schedule(self, max_steps: int, min_steps: int) -> Any:
        raise NotImplementedError

    def _min_steps(self, max_steps: int) -> int:
        if self.min_steps is not None:
            if self.min_steps > max_steps:
                raise ValueError(
                    f"min_steps {self.min_steps} is above the trial length {max_steps}"
                )
            return self.min_steps
        return max(1, max_steps // self.eta**3)

    def run(
        self, task: Task, budget: Budget, logger: Logger | None = None, seed: int = 0
    ) -> Result:
        """Search within ``budget``; the best configuration trained to the top rung comes back."""
        space = self.space if self.space is not None else default_space(task)
        max_steps = budget.steps_per_trial
        if budget.max_trials < 1:
            raise ValueError(
                f"budget of {budget.grad_evals} gradient evaluations is smaller than one trial "
                f"of {max_steps} steps"
            )
        min_steps = self._min_steps(max_steps)
        sched = self.schedule(max_steps, min_steps)
        study = f"{self.name}-s{seed}"
        store = open_store(self.run_dir, self.storage, study, space, self.name, seed)
        ckdir = self.run_dir.checkpoints / study if self.run_dir else None
        points = RandomProposer(space, seed)
        counter = CostCounter(budget)
        t0 = time.perf_counter()
        states: dict[int, dict[str, Any]] = {}
        trials: dict[int, dict[str, Any]] = {}  # trial -> last rung's summary
        best: Record | None = None
        curve: list[CurvePoint] = []
        segments = 0
        resumed = 0

        def finish(job: Job, rec: Record, replayed: bool) -> None:
            nonlocal best, segments
            counter.spend(int(rec.get("grad_evals") or 0))
            state = rec.pop("state", None)
            top = job.stop == max_steps
            row = {
                "index": segments,
                "trial": job.trial,
                "rung": job.rung,
                "bracket": job.bracket,
                "start": job.start,
                "steps": job.stop,
                "top": top,
                "hparams": points.ask(job.trial),
                **{k: v for k, v in rec.items() if k not in ("index", "hparams", "study")},
                "grad_evals_total": counter.grad_evals,
            }
            segments += 1
            if not replayed:
                if store is not None:
                    store.append(row)
                if state is not None and ckdir is not None and not top:
                    checkpoints.save(state, ckdir / f"trial-{job.trial}.pt")
            if state is not None and not top:
                states[job.trial] = state
            else:
                states.pop(job.trial, None)
            trials[job.trial] = row
            sched.report(job, _value(rec))
            v = _value(rec)
            g = counter.grad_evals
            if logger is not None and math.isfinite(v):
                logger.scalar(f"rung{job.rung}/val_loss", v, g)
            if top and math.isfinite(v) and (best is None or v < best["val_loss"]):
                best = row
            if best is not None and top:
                curve.append(CurvePoint(g, float(best["val_loss"])))
                if logger is not None:
                    logger.scalar("best/val_loss_vs_grad_evals", best["val_loss"], g)

        finished = store.load() if store is not None else []
        for rec in finished:
            job = Job(
                int(rec["trial"]),
                int(rec["rung"]),
                int(rec["start"]),
                int(rec["steps"]),
                int(rec.get("bracket", 0)),
            )
            sched.claim(job)
            if ckdir is not None and (ckdir / f"trial-{job.trial}.pt").is_file():
                rec = {**rec, "state": checkpoints.load(ckdir / f"trial-{job.trial}.pt")}
            finish(job, dict(rec), replayed=True)
            resumed += 1

        own = TrialRunner(task, self.workers, trial_fn=run_segment)  # type: ignore[arg-type]
        in_flight: dict[int, tuple[Job, int]] = {}  # key -> (job, steps reserved)
        key = 0
        try:
            while True:
                while own.idle() > 0:
                    reserved = sum(c for _, c in in_flight.values())
                    job = sched.next_job(counter.remaining - reserved)
                    if job is None:
                        break
                    st = states.pop(job.trial, None) if job.start > 0 else None
                    start = job.start if st is not None else 0
                    cost = job.stop - start
                    if cost > counter.remaining - reserved:  # a lost state: retrain from 0
                        break
                    point = points.ask(job.trial)
                    assert point is not None  # random search never runs out of points
                    req = SegmentRequest(
                        space.optimizer,
                        point,
                        seed,
                        start,
                        job.stop - start,
                        None if st is None else st["params"],
                        None if st is None else st["opt_state"],
                    )
                    own.submit(key, req)  # type: ignore[arg-type]
                    in_flight[key] = (job, cost)
                    key += 1
                if not in_flight:
                    break
                for k, rec in own.wait():
                    job, _ = in_flight.pop(k)
                    finish(job, rec, replayed=False)
        finally:
            while own.in_flight:
                own.wait()
            own.close()
        if best is not None and curve and curve[-1].grad_evals < counter.grad_evals:
            curve.append(
                CurvePoint(counter.grad_evals, float(best["val_loss"]))
            )  # spent to the end
        if isinstance(store, OptunaStore):
            stopped = [t for t, r in trials.items() if r["status"] == "ok" and not r["top"]]
            store.mark_pruned(stopped)
        return self._result(
            task,
            seed,
            space,
            budget,
            counter,
            trials,
            best,
            curve,
            resumed,
            segments,
            max_steps,
            min_steps,
            t0,
        )

    def _result(
        self,
        task: Task,
        seed: int,
        space: SearchSpace,
        budget: Budget,
        counter: CostCounter,
        trials: dict[int, dict[str, Any]],
        best: Record | None,
        curve: list[CurvePoint],
        resumed: int,
        segments: int,
        max_steps: int,
        min_steps: int,
        t0: float,
    ) -> Result:
        status: dict[int, str] = {}
        for t, row in trials.items():
            if row["status"] != "ok":
                status[t] = row["status"]
            else:
                status[t] = "completed" if row["steps"] == max_steps else "pruned"
        counts = {
            s: sum(1 for v in status.values() if v == s)
            for s in ("completed", "pruned", "diverged", "failed")
        }
        if self.trial_logger is not None:
            for t, row in sorted(trials.items()):
                lg = self.trial_logger(f"{self.name}-s{seed}/trial-{t:04d}")
                hp = {
                    **row["hparams"],
                    "status": status[t],
                    "trial": t,
                    "method": self.name,
                    "seed": seed,
                }
                v = row.get("val_loss")
                lg.hparams(
                    hp,
                    {
                        "trial/val_loss": float(v) if v is not None else math.nan,
                        "trial/steps": float(row["steps"]),
                        "trial/rung": float(row["rung"]),
                    },
                )
                lg.close()
        res = Result(
            method=self.name,
            task=task.name,
            seed=seed,
            curve=curve,
            grad_evals=counter.grad_evals,
            wall_s=time.perf_counter() - t0,
            peak_mem_bytes=peak_memory_bytes(getattr(task, "device", None)),
            extra={
                "trials": len(trials),
                "rungs_run": segments,
                "trials_resumed_rungs": resumed,
                "trials_completed": counts["completed"],
                "trials_pruned": counts["pruned"],
                "trials_diverged": counts["diverged"],
                "trials_failed": counts["failed"],
                "eta": self.eta,
                "min_steps": min_steps,
                "max_steps": max_steps,
                "optimizer": space.optimizer,
                "space": space.to_dict(),
            },
        )
        if best is not None:
            res.best_hparams = dict(best["hparams"])
            res.val_loss = float(best["val_loss"])
            res.val_accuracy = best.get("val_accuracy")
            res.test_loss = (
                float(best["test_loss"]) if best.get("test_loss") is not None else math.nan
            )
            res.test_accuracy = best.get("test_accuracy")
            res.extra["best_trial"] = best["trial"]
        else:
            res.status = "failed" if not counts["diverged"] else "diverged"
            res.reason = (
                f"no configuration reached the top rung of {max_steps} steps within "
                f"{budget.grad_evals} gradient evaluations ({counts})"
            )
        return res


class Hyperband(MultiFidelitySearch):
    """Hyperband (Li et al. 2017, Algorithm 1) on gradient-evaluation rungs.

    Example:
        >>> from selfref.budget import Budget
        >>> from selfref.tasks import make
        >>> res = Hyperband(workers=0).run(make("quadratic"), Budget(600, 54), seed=0)
        >>> res.grad_evals <= 600, res.extra["trials_pruned"] > 0
        (True, True)
    """

    name: ClassVar[str] = "hyperband"

    def schedule(self, max_steps: int, min_steps: int) -> HyperbandSchedule:
        return HyperbandSchedule(max_steps, min_steps, self.eta)


class ASHA(MultiFidelitySearch):
    """Asynchronous successive halving (Li et al. 2020, Algorithm 2) on gradient-evaluation rungs.

    Example:
        >>> from selfref.budget import Budget
        >>> from selfref.tasks import make
        >>> res = ASHA(workers=0).run(make("quadratic"), Budget(600, 54), seed=0)
        >>> res.grad_evals <= 600, res.extra["trials_pruned"] > 0
        (True, True)
    """

    name: ClassVar[str] = "asha"

    def schedule(self, max_steps: int, min_steps: int) -> ASHASchedule:
        return ASHASchedule(rung_steps(max_steps, min_steps, self.eta), self.eta)
