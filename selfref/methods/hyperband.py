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
configuration; it reports its validation loss at each rung it reaches. Configurations are
drawn as random search draws them (:class:`selfref.methods.random.RandomProposer`), as both
papers do.

Each rung of a trial is its own unit of work (:func:`run_segment`) in the study loop of the
other search methods (:class:`MultiFidelityStudy`, a :class:`~selfref.methods.study.Study`),
so it runs on whatever executor the study is given — in-process, local processes or a Dask
cluster, and in ``selfref compare`` beside every other study. A promoted trial *continues*
its run from the weights and optimizer state its previous rung returned
(:func:`selfref.train.train` with ``opt_state``/``start_step``: the same numbers as one
uninterrupted run), so a trial stopped after rung k has cost exactly r_k gradient
evaluations and is charged exactly that; each unit reserves its own length of the budget
while in flight, so the budget is never overspent.

Why not Optuna's ``HyperbandPruner``/``SuccessiveHalvingPruner``: a pruner decides inside
the objective, in the process that owns the study, after ``trial.report``; here trials run on
an executor's workers, so every rung would be a blocking round trip to a shared storage, and
Optuna's HyperbandPruner assigns trials to brackets by hashing their ids and prunes against
whatever trials have reported, which is neither the paper's bracket loop nor exact about
what each trial spends. On the harness each rung is a unit of work: workers stay busy
(ASHA's point), the charge is exact, every rung's record goes to the store at once, and
``--resume`` replays them.

Records: one per rung (``index`` counts rungs in the order they finished; ``trial``,
``rung``, ``bracket``, ``start`` — the step it continued from — ``steps`` — the trial's
steps after it — ``top`` and ``val_loss``). With a run directory, each rung's weights and
optimizer state are kept in ``checkpoints/<study>/trial-<i>-s<steps>.pt`` (written before
the record; the rung's starting state is deleted only after it, so a driver killed between the
two still finds the state its last record names) so a resumed study continues promotions
exactly; without one
(or with the file gone) a promotion after a resume retrains from step 0 and is charged for
it. The result is the best configuration among those trained to the largest rung; the
best-so-far curve moves when one finishes and runs to where spending ends. With
``trial_logger`` each trial gets one row in TensorBoard's HParams view: its hyperparameters,
``status`` (``completed``, ``pruned`` or ``diverged``/``failed``), the rung it stopped at and
its last validation loss; with an Optuna storage the stopped configurations are ``PRUNED``
there (:mod:`selfref.execution.optuna_storage`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from selfref import checkpoints
from selfref.budget import Budget
from selfref.execution import Completion, Executor
from selfref.execution.driver import Unit
from selfref.execution.store import StudyStore, open_store
from selfref.logging import Logger
from selfref.methods.base import FinalMetrics, Result
from selfref.methods.random import RandomProposer
from selfref.methods.search import TrialSearch
from selfref.methods.study import Study, unit_key
from selfref.methods.trial import Record, failed_record, train_and_evaluate
from selfref.runs import RunDir
from selfref.search_space import SearchSpace, default_space
from selfref.tasks import Task

__all__ = [
    "SegmentRequest",
    "run_segment",
    "Segment",
    "Schedule",
    "rung_steps",
    "ASHASchedule",
    "HyperbandSchedule",
    "MultiFidelityStudy",
    "MultiFidelitySearch",
    "Hyperband",
    "ASHA",
]


@dataclass(frozen=True)
class SegmentRequest:
    """One rung of one trial: continue training from ``start`` to ``start + steps``.

    Args:
        optimizer, hparams, seed: as :class:`~selfref.methods.trial.TrialRequest`.
        start: steps the trial has taken (0: a fresh start from ``task.init_params``).
        steps: steps of this rung.
        params, opt_state: the trial's weights and optimizer state after ``start`` steps.
    """

    optimizer: str  # inner optimizer
    hparams: Mapping[str, Any]  # the trial's point
    seed: int  # training seed (the study's)
    start: int  # steps already taken
    steps: int  # steps of this rung
    params: dict[str, torch.Tensor] | None = None  # weights after `start` steps
    opt_state: Any = None  # optimizer state after `start` steps


def run_segment(task: Task, request: SegmentRequest) -> Record:
    """Train one rung and evaluate the val split (test too); never raises.

    Returns:
        A record as :func:`selfref.methods.trial.run_trial`'s (``grad_evals`` = the steps
        of this rung actually taken), plus ``state``: the weights and optimizer state to
        continue from (None unless the rung finished ok).
    """
    return train_and_evaluate(
        task,
        request.optimizer,
        request.hparams,
        request.steps,
        request.seed,
        start=request.start,
        params=request.params,
        opt_state=request.opt_state,
        keep_state=True,
    )


@dataclass(frozen=True)
class Segment:
    """Train ``trial`` from ``start`` to ``stop`` steps (rung ``rung``; bracket for Hyperband)."""

    trial: int  # the configuration
    rung: int  # 0 = the bottom rung
    start: int  # steps it continues from
    stop: int  # steps after it
    bracket: int = 0  # Hyperband's bracket (0 for ASHA)


class Schedule(Protocol):
    """Which rung runs next: :class:`HyperbandSchedule` or :class:`ASHASchedule`."""

    def next_job(self, affordable: float) -> Segment | None:
        """The next rung to run that costs at most ``affordable`` steps (None: none now)."""
        ...

    def claim(self, seg: Segment) -> None:
        """A rung found in the store (resume): mark it issued."""
        ...

    def report(self, seg: Segment, value: float) -> None:
        """A rung finished with validation loss ``value`` (inf: diverged or failed)."""
        ...


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

    def next_job(self, affordable: float) -> Segment | None:
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
                        return Segment(t, k + 1, self.rungs[k], self.rungs[k + 1])
                    break
        if self.rungs[0] <= affordable:
            t = self.next_trial
            self.next_trial += 1
            return Segment(t, 0, 0, self.rungs[0])
        return None

    def claim(self, seg: Segment) -> None:
        """A rung found in the store (resume): mark it issued."""
        if seg.rung == 0:
            self.next_trial = max(self.next_trial, seg.trial + 1)
        else:
            self.promoted[seg.rung - 1].add(seg.trial)

    def report(self, seg: Segment, value: float) -> None:
        self.results[seg.rung][seg.trial] = value


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

    def _segment(self, trial: int) -> Segment:
        b = self.bracket
        start = 0 if b.rung == 0 else self.steps(b.s, b.rung - 1)
        return Segment(trial, b.rung, start, self.steps(b.s, b.rung), self.bracket_index)

    def next_job(self, affordable: float) -> Segment | None:
        b = self.bracket
        for t in b.trials:
            if t not in b.issued:
                seg = self._segment(t)
                if seg.stop - seg.start > affordable:
                    return None
                b.issued.add(t)
                return seg
        return None  # wait for the rung to finish

    def claim(self, seg: Segment) -> None:
        if seg.bracket != self.bracket_index or seg.rung != self.bracket.rung:
            raise ValueError(
                f"stored rung (bracket {seg.bracket}, rung {seg.rung}, trial {seg.trial}) "
                f"is not the next one of the Hyperband schedule (bracket "
                f"{self.bracket_index}, rung {self.bracket.rung}); the study's settings changed"
            )
        self.bracket.issued.add(seg.trial)

    def report(self, seg: Segment, value: float) -> None:
        b = self.bracket
        b.results[seg.trial] = value
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


def _point(hp: Mapping[str, Any]) -> dict[str, Any]:
    """A point as it reads back from JSON (what the store gives back on resume)."""
    return json.loads(json.dumps(dict(hp), default=float))


class MultiFidelityStudy(Study):
    """A multi-fidelity search (method, seed) as a job of rung units (see the module docstring).

    Args:
        name, task, task_ref, space, budget, seed, store, logger, key_prefix: as
            :class:`~selfref.methods.study.Study`.
        schedule: which rung runs next (:class:`HyperbandSchedule`, :class:`ASHASchedule`).
        method: the method's name (on the HParams rows).
        min_steps: the smallest rung (bounds the number of units: at most twice the budget
            over it, a guard against rungs that fail before spending anything).
        checkpoint_dir: where each trial's latest rung state is kept for resume (None: not
            kept; a promotion after a resume then retrains from step 0).
        trial_logger: ``name -> Logger`` for one HParams row per trial at the end.

    Raises:
        ValueError: a budget smaller than one trial; stored rungs that do not follow the
            schedule (its settings changed) or spend more than the budget.
    """

    def __init__(
        self,
        name: str,
        task: Task,
        task_ref: Any,
        space: SearchSpace,
        budget: Budget,
        seed: int,
        schedule: Schedule,
        *,
        method: str,
        min_steps: int,
        store: StudyStore | None = None,
        logger: Logger | None = None,
        key_prefix: str = "",
        checkpoint_dir: Path | None = None,
        trial_logger: Callable[[str], Logger] | None = None,
    ) -> None:
        self.schedule = schedule
        self.method = method
        self.max_steps = budget.steps_per_trial
        self.min_steps = min_steps
        self.checkpoint_dir = checkpoint_dir
        self.trial_logger = trial_logger
        self.points = RandomProposer(space, seed)
        self.states: dict[int, dict[str, Any]] = {}  # trial -> state after its last rung
        self.trials: dict[int, Record] = {}  # trial -> its last rung's record
        self.running: dict[str, tuple[Segment, int]] = {}  # key -> (rung, steps reserved)
        self._closed = False
        super().__init__(
            name,
            task,
            task_ref,
            space,
            budget,
            seed,
            self.points,
            store=store,
            logger=logger,
            max_proposals=2 * max(1, budget.grad_evals // min_steps),
            key_prefix=key_prefix,
        )

    # -- state -----------------------------------------------------------------------------

    def _config(self, trial: int) -> dict[str, Any]:
        point = self.points.ask(trial)
        assert point is not None  # random search never runs out of points
        return _point(point)

    def _ckpt(self, trial: int, steps: int) -> Path | None:
        """Where trial ``trial``'s state after ``steps`` steps is kept (None: not kept)."""
        if self.checkpoint_dir is None:
            return None
        return self.checkpoint_dir / f"trial-{trial}-s{steps}.pt"

    def _resume(self) -> None:
        finished = self.store.load() if self.store is not None else []
        for rec in finished:
            seg = Segment(
                int(rec["trial"]),
                int(rec["rung"]),
                int(rec["start"]),
                int(rec["steps"]),
                int(rec.get("bracket", 0)),
            )
            if not self.counter.can_spend(int(rec.get("grad_evals") or 0)):
                raise ValueError(
                    f"the stored rungs spend more than the budget of {self.budget.grad_evals} "
                    "gradient evaluations; resume with the budget the study started with"
                )
            self.schedule.claim(seg)
            self._finish_rung(seg, dict(rec), replayed=True)
        self.outcome.resumed = len(finished)
        self.proposals = len(finished)
        for trial, row in self.trials.items():  # continue promotions from the kept states
            path = self._ckpt(trial, int(row["steps"]))
            if row["status"] != "ok" or row["top"] or path is None or not path.is_file():
                continue
            ck = checkpoints.load(path)
            if int(ck.get("steps", -1)) == int(row["steps"]):  # the state of that very rung
                self.states[trial] = {"params": ck["params"], "opt_state": ck["opt_state"]}

    def _finish_rung(self, seg: Segment, rec: Record, replayed: bool) -> None:
        self.counter.spend(int(rec.get("grad_evals") or 0))
        state = rec.pop("state", None)
        top = seg.stop == self.max_steps
        row: Record = {
            "index": int(rec["index"]) if replayed else len(self.outcome.records),
            "trial": seg.trial,
            "rung": seg.rung,
            "bracket": seg.bracket,
            "start": seg.start,
            "steps": seg.stop,
            "top": top,
            "hparams": self._config(seg.trial),
            **{
                k: v
                for k, v in rec.items()
                if k not in ("index", "hparams", "study", "trial", "rung", "bracket", "start")
                and k not in ("steps", "top", "grad_evals_total")
            },
            "grad_evals_total": self.counter.grad_evals,
        }
        if not replayed:
            path = self._ckpt(seg.trial, seg.stop)
            if state is not None and not top and path is not None:  # before the record
                checkpoints.save({"steps": seg.stop, **state}, path)
            if self.store is not None:
                self.store.append(row)
            start = self._ckpt(seg.trial, seg.start)  # the state this rung started from:
            if start is not None and seg.start != seg.stop:  # no record names it any more
                start.unlink(missing_ok=True)
        if state is not None and not top:
            self.states[seg.trial] = state
        else:
            self.states.pop(seg.trial, None)
        self.outcome.records.append(row)
        self.trials[seg.trial] = row
        v = _value(rec)
        self.schedule.report(seg, v)
        g = self.counter.grad_evals
        if self.logger is not None and math.isfinite(v):
            self.logger.scalar(f"rung{seg.rung}/val_loss", v, g)
        if self.tracker.observe(g, v if top else None):
            self.outcome.best = row

    def _reserved(self) -> int:
        return sum(cost for _, cost in self.running.values())

    @property
    def done(self) -> bool:
        return not self.running and self.exhausted

    # -- the Job interface -----------------------------------------------------------------

    def units(self, free: int) -> list[Unit]:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        out: list[Unit] = []
        while len(out) < free and not self.exhausted and self.proposals < self.cap:
            affordable = self.counter.remaining - self._reserved()
            seg = self.schedule.next_job(affordable)
            if seg is None:
                break
            state = self.states.pop(seg.trial, None) if seg.start > 0 else None
            seg = replace(seg, start=seg.start if state is not None else 0)
            cost = seg.stop - seg.start
            if cost > affordable:  # its state is lost: retraining from step 0 does not fit
                break
            hp = self._config(seg.trial)
            request = SegmentRequest(
                self.space.optimizer,
                hp,
                self.seed,
                seg.start,
                cost,
                None if state is None else state["params"],
                None if state is None else state["opt_state"],
            )
            payload = {"hparams": hp, "rung": seg.rung, "start": seg.start, "stop": seg.stop}
            key = unit_key(self.key_prefix, self.name, seg.trial, payload)
            self.running[key] = (seg, cost)
            out.append((key, run_segment, (self.task_ref, request)))
            self.proposals += 1
        if not out and not self.running and free > 0:  # nothing more will run
            self.exhausted = True
            self._close()
        return out

    def finish(self, completion: Completion) -> None:
        seg, _ = self.running.pop(completion.key)
        if completion.status == "ok":
            rec = dict(completion.value)
        elif completion.status == "error":
            rec = failed_record(str(completion.reason), traceback=completion.traceback)
        else:
            rec = failed_record(str(completion.reason))
        rec["attempts"] = completion.attempts
        if completion.lost:
            rec["lost"] = list(completion.lost)
        self._finish_rung(seg, rec, replayed=False)

    # -- the outcome -----------------------------------------------------------------------

    def statuses(self) -> dict[int, str]:
        """Each trial's status: ``completed``, ``pruned``, ``diverged`` or ``failed``."""
        out = {}
        for t, row in self.trials.items():
            if row["status"] != "ok":
                out[t] = str(row["status"])
            else:
                out[t] = "completed" if row["top"] else "pruned"
        return out

    def _close(self) -> None:
        """The study's end: records durable, stopped trials pruned, one HParams row each."""
        if self._closed:
            return
        self._closed = True
        status = self.statuses()
        if self.store is not None:
            self.store.sync()
            self.store.mark_pruned(sorted(t for t, s in status.items() if s == "pruned"))
        self.outcome.grad_evals = self.counter.grad_evals
        self.outcome.wall_s = self._wall()
        if self.trial_logger is None:
            return
        for t, row in sorted(self.trials.items()):
            lg = self.trial_logger(f"{self.name}/trial-{t:04d}")
            hp = {
                **row["hparams"],
                "status": status[t],
                "trial": t,
                "method": self.method,
                "seed": self.seed,
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

    def result(self, method: str, workers: int, extra: Mapping[str, Any] | None = None) -> Result:
        """The best configuration trained to the top rung: its hparams, metrics, curve, costs."""
        self._close()
        out = self.outcome
        g = self.counter.grad_evals
        if self.tracker.curve and self.tracker.curve[-1].grad_evals < g:
            self.tracker.observe(g)  # the curve runs to where spending ends
        status = self.statuses()
        counts = {
            s: sum(1 for v in status.values() if v == s)
            for s in ("completed", "pruned", "diverged", "failed")
        }
        b = out.best
        final = None
        if b is not None:
            final = FinalMetrics(
                float(b["val_loss"]),
                float(b["test_loss"]) if b.get("test_loss") is not None else math.nan,
                b.get("val_accuracy"),
                b.get("test_accuracy"),
            )
        res = self.tracker.result(
            final,
            grad_evals=g,
            wall_s=out.wall_s or self._wall(),
            extra={
                "trials": len(self.trials),
                "rungs_run": len(out.records),
                "trials_resumed_rungs": out.resumed,
                "trials_completed": counts["completed"],
                "trials_pruned": counts["pruned"],
                "trials_diverged": counts["diverged"],
                "trials_failed": counts["failed"],
                "trial_compute_s": out.compute_s,
                "workers": workers,
                "min_steps": self.min_steps,
                "max_steps": self.max_steps,
                "optimizer": self.space.optimizer,
                "space": self.space.to_dict(),
                **(extra or {}),
            },
        )
        res.method = method
        if b is not None:
            res.best_hparams = dict(b["hparams"])
            res.extra["best_trial"] = b["trial"]
        else:
            res.status = "failed" if not counts["diverged"] else "diverged"
            res.reason = (
                f"no configuration reached the top rung of {self.max_steps} steps within "
                f"{self.budget.grad_evals} gradient evaluations ({counts})"
            )
        return res


class MultiFidelitySearch(TrialSearch):
    """Base of ``hyperband`` and ``asha``: random configurations trained rung by rung.

    Args:
        eta: reduction factor η (both papers: 3).
        min_steps: the smallest rung in steps (default ``steps_per_trial // η³``, at least 1).
        space, workers, executor, run_dir, storage: see
            :class:`~selfref.methods.search.TrialSearch` (the run directory also keeps the
            rung checkpoints; with a storage each configuration is one Optuna trial with its
            rungs as intermediate values, stopped ones ``PRUNED``).
        trial_logger: ``name -> Logger`` for one HParams row per trial (names
            ``<method>-s<seed>/trial-<i>``); ``selfref compare`` passes its own.
    """

    name: ClassVar[str] = "multifidelity"

    def __init__(
        self,
        eta: int = 3,
        min_steps: int | None = None,
        space: SearchSpace | None = None,
        workers: int | None = None,
        executor: Executor | None = None,
        run_dir: RunDir | str | None = None,
        trial_logger: Callable[[str], Logger] | None = None,
        storage: str | None = None,
    ) -> None:
        if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
            raise ValueError(f"eta must be an integer >= 2, got {eta!r}")
        if min_steps is not None and min_steps < 1:
            raise ValueError(f"min_steps must be >= 1, got {min_steps}")
        super().__init__(
            space=space, workers=workers, executor=executor, run_dir=run_dir, storage=storage
        )
        self.eta, self.min_steps = eta, min_steps
        self.trial_logger = trial_logger

    def schedule(self, max_steps: int, min_steps: int) -> Schedule:
        raise NotImplementedError

    def _min_steps(self, max_steps: int) -> int:
        if self.min_steps is not None:
            if self.min_steps > max_steps:
                raise ValueError(
                    f"min_steps {self.min_steps} is above the trial length {max_steps}"
                )
            return self.min_steps
        return max(1, max_steps // self.eta**3)

    def study(
        self,
        task: Task,
        budget: Budget,
        logger: Logger | None,
        seed: int,
        task_ref: Any,
        key_prefix: str = "",
        sync_s: float = 0.0,
    ) -> MultiFidelityStudy:
        """This method's study of ``task``: its rungs are the units (see
        :meth:`TrialSearch.study <selfref.methods.search.TrialSearch.study>`)."""
        space = self.space if self.space is not None else default_space(task)
        max_steps = budget.steps_per_trial
        budget.require_trial()
        min_steps = self._min_steps(max_steps)
        name = f"{self.name}-s{seed}"
        store = open_store(self.run_dir, self.storage, name, space, self.name, seed, sync_s)
        return MultiFidelityStudy(
            name,
            task,
            task_ref,
            space,
            budget,
            seed,
            self.schedule(max_steps, min_steps),
            method=self.name,
            min_steps=min_steps,
            store=store,
            logger=logger,
            key_prefix=key_prefix,
            checkpoint_dir=self.run_dir.checkpoints / name if self.run_dir else None,
            trial_logger=self.trial_logger,
        )

    def describe(self, proposer: Any) -> dict[str, Any]:
        return {"eta": self.eta}


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
