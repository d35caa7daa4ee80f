"""The study loop: a proposer's trials within a budget, recorded as they finish, resumable.

A :class:`Study` is the state of one search (method, seed): it asks its :class:`Proposer`
for points, hands them out as units of work (:class:`~selfref.execution.driver.Job`), and
records each finished trial at once. :func:`run_study` drives one study on an executor;
``selfref compare`` drives all of a comparison's studies on one executor at once.

- A trial is handed out only while the budget not yet reserved by trials in flight covers
  a full trial, so the counter can never overspend; each finished trial is charged what it
  spent, appended to the store at once (:class:`~selfref.execution.store.StudyStore`) and
  told to the proposer. A trial that raised, lost its worker twice or ran past the timeout
  is recorded as failed with its reason (:func:`~selfref.methods.trial.failed_record`).
- Resume: the store's finished records are replayed instead of re-run. A deterministic
  proposer's trial ``i`` is a pure function of ``(seed, i)``, so a resumed study checks
  that every stored trial still matches its proposal and runs exactly the missing indices
  (trials that were in flight when the driver died among them, with the same points and
  the same unit keys, so a cluster still running one hands its result to the new driver).
  Others continue after the largest finished index.
- Unit keys are ``<prefix><study>/<index>/<digest of the request>``: the same trial always
  gets the same key, a different trial never does.

- Synchronous lag (``sync_lag`` = L, for proposers that are not deterministic): trial ``i``
  is asked only once trials ``0 … i−L`` have finished, and results are told in index order
  just before the ask that first may see them, so ``ask(i)`` sees exactly trials ``≤ i−L``
  told and ``i−L+1 … i−1`` pending (Optuna's constant liar reads those as running). The
  proposals are then a function of the seed, L and the trials' results, not of which worker
  finished first; at most L trials are in flight. Without it (None) each result is told as
  it arrives: the fastest schedule, but TPE's points then depend on the timing.

Multi-fidelity methods (hyperband, ASHA; :mod:`selfref.methods.hyperband`) subclass
:class:`Study`: each rung of a configuration is a unit of its own with fewer steps that
continues from the previous rung's weights and optimizer state, its schedule reads the
rung's record and promotes the configuration (one more unit) or stops (prunes) it, and each
unit reserves and is charged its own length. A proposer that needs each result before its
next point (rnn-bo) runs with ``max_in_flight=1``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from selfref.budget import Budget, CostCounter
from selfref.execution.base import Completion, Executor
from selfref.execution.driver import Unit, drive
from selfref.execution.store import StudyStore
from selfref.logging import Logger
from selfref.methods.base import CurvePoint, FinalMetrics, Result, Tracker
from selfref.methods.trial import Record, TrialFn, TrialRequest, failed_record, run_trial
from selfref.search_space import SearchSpace
from selfref.tasks import Task

__all__ = ["Proposer", "StudyOutcome", "Study", "run_study", "unit_key"]


class Proposer(Protocol):
    """Where a study's points come from.

    ``deterministic`` proposers (grid, random) give trial ``i`` as a pure function of
    ``(seed, i)``: ``ask(i)`` may be called in any order and again on resume. Others (Optuna)
    depend on the results told so far; on resume their finished trials are passed to
    ``replay`` and new trials continue after the largest finished index.
    """

    deterministic: bool

    def ask(self, index: int) -> dict[str, Any] | None:
        """The point of trial ``index``, or None when there are no more points."""
        ...

    def tell(self, index: int, hparams: Mapping[str, Any], record: Mapping[str, Any]) -> None:
        """Trial ``index`` has finished with ``record``."""
        ...

    def replay(self, index: int, hparams: Mapping[str, Any], record: Mapping[str, Any]) -> None:
        """A trial finished in an earlier process (resume)."""
        ...


@dataclass
class StudyOutcome:
    """Everything a study did: records in completion order, best trial, curve and costs."""

    records: list[Record] = field(default_factory=list)
    best: Record | None = None
    curve: list[CurvePoint] = field(default_factory=list)
    grad_evals: int = 0
    wall_s: float = 0.0
    resumed: int = 0  # records replayed from the store instead of run

    @property
    def compute_s(self) -> float:
        """Sum of the trials' own compute seconds (those run by this process)."""
        return sum(float(r.get("compute_s") or 0.0) for r in self.records[self.resumed :])

    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "diverged": 0, "failed": 0}
        for r in self.records:
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out


def _normalize(hp: Mapping[str, Any]) -> dict[str, Any]:
    """A point as it reads back from JSON (tuples -> lists, numpy/torch scalars -> Python)."""
    return json.loads(json.dumps(dict(hp), default=float))


def unit_key(prefix: str, name: str, index: int, payload: Any) -> str:
    """``<prefix><name>/<index>/<digest>``: the same unit always gets the same key."""
    text = json.dumps(payload, sort_keys=True, default=str)
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]
    return f"{prefix}{name}/{index}/{digest}"


class Study:
    """One search study as a job of units (see the module docstring).

    Args:
        name: the study's name (``<method>-s<seed>``), in unit keys and the store.
        task: the task every trial trains (used in this process only for its name).
        task_ref: what the units receive for the task (``executor.share(task)``).
        space, budget, seed: where to search, with how much, under which seed.
        proposer: the search method's source of points.
        store: persistence for crash safety and resume (None: in memory only).
        logger: receives ``trial/val_loss``, ``best/val_loss_vs_grad_evals`` and
            ``hparams/<name>`` after each trial, all at step = gradient evaluations so far.
        max_proposals: at most this many trials (default ``2 * budget.max_trials``, a guard
            against trials that fail before spending anything).
        trial_fn: a picklable top-level function ``(task, request) -> record``.
        key_prefix: prepended to every unit key (keeps comparisons on one cluster apart).
        max_in_flight: at most this many trials at once (None: as many as the executor
            has slots; 1 for a proposer that needs each result before the next point).
        sync_lag: L of the synchronous lag (see the module docstring; None: tell results as
            they arrive). Ignored for deterministic proposers, which need none.

    Raises:
        ValueError: a budget smaller than one trial; a stored trial that does not match the
            seeded proposal (the space or seed changed since the study started); stored trials
            that spend more than the budget.
    """

    def __init__(
        self,
        name: str,
        task: Task,
        task_ref: Any,
        space: SearchSpace,
        budget: Budget,
        seed: int,
        proposer: Proposer,
        *,
        store: StudyStore | None = None,
        logger: Logger | None = None,
        max_proposals: int | None = None,
        trial_fn: TrialFn = run_trial,
        key_prefix: str = "",
        max_in_flight: int | None = None,
        sync_lag: int | None = None,
    ) -> None:
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1 or None, got {max_in_flight}")
        if sync_lag is not None and sync_lag < 1:
            raise ValueError(f"sync_lag must be >= 1 or None, got {sync_lag}")
        budget.require_trial()
        self.name = name
        self.task_ref = task_ref
        self.space = space
        self.budget = budget
        self.seed = seed
        self.proposer = proposer
        self.store = store
        self.logger = logger
        self.trial_fn = trial_fn
        self.key_prefix = key_prefix
        self.max_in_flight = max_in_flight
        self.sync_lag = None if proposer.deterministic else sync_lag
        self._untold: dict[int, tuple[dict[str, Any], Record]] = {}  # finished, not yet told
        self.cap = 2 * budget.max_trials if max_proposals is None else max_proposals
        self.counter = CostCounter(budget)
        self.tracker = Tracker(name, task, seed, logger)
        self.outcome = StudyOutcome()
        self.in_flight: dict[str, tuple[int, dict[str, Any]]] = {}  # key -> (index, point)
        self.exhausted = False
        self._t0: float | None = None  # when the first trial was handed out
        self._resume()

    # -- state -----------------------------------------------------------------------------

    def _resume(self) -> None:
        finished = self.store.load() if self.store is not None else []
        for rec in finished:
            idx, hp = int(rec["index"]), rec["hparams"]
            if self.proposer.deterministic:
                expected = self.proposer.ask(idx)
                if expected is None or _normalize(expected) != _normalize(hp):
                    raise ValueError(
                        f"trial {idx} in trials.jsonl was {hp} but the seeded proposal is "
                        f"{expected}; the search space, seed or method options changed since "
                        "the study started"
                    )
            if not self.counter.can_spend(int(rec.get("grad_evals") or 0)):
                raise ValueError(
                    f"the stored trials spend more than the budget of {self.budget.grad_evals} "
                    "gradient evaluations; resume with the budget the study started with"
                )
            self.proposer.replay(idx, hp, rec)
            self._record(idx, hp, dict(rec), replayed=True)
        self.outcome.resumed = len(finished)
        self.done_idx = {int(r["index"]) for r in finished}
        if self.proposer.deterministic:
            self.next_idx = 0
        else:
            self.next_idx = max(self.done_idx) + 1 if self.done_idx else 0
        self.proposals = len(finished)

    def _record(self, index: int, hp: Mapping[str, Any], rec: Record, replayed: bool) -> None:
        self.counter.spend(int(rec.get("grad_evals") or 0))
        rec = {
            "index": index,
            "hparams": dict(hp),
            **{k: v for k, v in rec.items() if k not in ("index", "hparams", "study")},
        }
        rec["grad_evals_total"] = g = self.counter.grad_evals
        if not replayed and self.store is not None:
            self.store.append(rec)
        out = self.outcome
        out.records.append(rec)
        v = rec.get("val_loss")
        ok = rec["status"] == "ok" and v is not None and math.isfinite(v)
        if self.tracker.observe(g, v if ok else None):
            out.best = rec
        if self.logger is not None:
            if v is not None and math.isfinite(v):
                self.logger.scalar("trial/val_loss", v, g)
            for name, value in hp.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.logger.scalar(f"hparams/{name}", value, g)

    def _can_reserve(self) -> bool:
        steps = self.budget.steps_per_trial
        reserved = steps * len(self.in_flight)
        return self.proposals < self.cap and self.counter.remaining - reserved >= steps

    @property
    def done(self) -> bool:
        return not self.in_flight and (self.exhausted or not self._can_reserve())

    def request(self, index: int, hp: Mapping[str, Any]) -> TrialRequest:
        """The request of trial ``index`` at point ``hp`` (a full trial of the budget)."""
        return TrialRequest(self.space.optimizer, hp, self.budget.steps_per_trial, self.seed)

    # -- the Job interface -----------------------------------------------------------------

    def units(self, free: int) -> list[Unit]:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        if self.max_in_flight is not None:
            free = min(free, self.max_in_flight - len(self.in_flight))
        out: list[Unit] = []
        while len(out) < free and not self.exhausted and self._can_reserve():
            while self.next_idx in self.done_idx:
                self.next_idx += 1
            if self.sync_lag is not None:
                horizon = self.next_idx - self.sync_lag  # told before this ask: <= horizon
                if any(i <= horizon for i, _ in self.in_flight.values()):
                    break
                self._tell_through(horizon)
            point = self.proposer.ask(self.next_idx)
            if point is None:
                self.exhausted = True
                break
            hp = _normalize(point)
            request = self.request(self.next_idx, hp)
            key = unit_key(self.key_prefix, self.name, self.next_idx, asdict(request))
            self.in_flight[key] = (self.next_idx, hp)
            out.append((key, self.trial_fn, (self.task_ref, request)))
            self.next_idx += 1
            self.proposals += 1
        return out

    def finish(self, completion: Completion) -> None:
        index, hp = self.in_flight.pop(completion.key)
        if completion.status == "ok":
            rec = dict(completion.value)
        elif completion.status == "error":
            rec = failed_record(str(completion.reason), traceback=completion.traceback)
        else:
            rec = failed_record(str(completion.reason))
        rec["attempts"] = completion.attempts
        if completion.lost:
            rec["lost"] = list(completion.lost)
        self._record(index, hp, rec, replayed=False)
        if self.sync_lag is None:
            self.proposer.tell(index, hp, rec)
        else:
            self._untold[index] = (hp, rec)
        if self.done:
            self._tell_through(math.inf)
            if self.store is not None:
                self.store.sync()
            self.outcome.grad_evals = self.counter.grad_evals
            self.outcome.wall_s = self._wall()

    def _tell_through(self, horizon: float) -> None:
        """Tell the proposer every finished trial with index <= ``horizon``, in index order."""
        for index in sorted(i for i in self._untold if i <= horizon):
            hp, rec = self._untold.pop(index)
            self.proposer.tell(index, hp, rec)

    def _wall(self) -> float:
        return 0.0 if self._t0 is None else time.perf_counter() - self._t0

    # -- the outcome -----------------------------------------------------------------------

    def result(self, method: str, workers: int, extra: Mapping[str, Any] | None = None) -> Result:
        """The study's :class:`Result`: the best trial's hparams and metrics, curve and costs."""
        out = self.outcome
        out.curve = list(self.tracker.curve)
        out.grad_evals = self.counter.grad_evals
        out.wall_s = out.wall_s or self._wall()
        counts = out.counts()
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
            grad_evals=out.grad_evals,
            wall_s=out.wall_s,
            extra={
                "trials": len(out.records),
                "trials_ok": counts["ok"],
                "trials_diverged": counts["diverged"],
                "trials_failed": counts["failed"],
                "trials_resumed": out.resumed,
                "trial_compute_s": out.compute_s,
                "workers": workers,
                "optimizer": self.space.optimizer,
                "space": self.space.to_dict(),
                **(extra or {}),
            },
        )
        res.method = method
        if b is not None:
            res.best_hparams = dict(b["hparams"])
            res.extra["best_trial"] = b["index"]
        else:
            res.status = "diverged" if counts["diverged"] else "failed"
            reasons = sorted({str(r.get("reason")) for r in out.records})
            res.reason = f"no trial finished ok ({counts}); reasons: {'; '.join(reasons[:3])}"
        return res


def run_study(
    task: Task,
    space: SearchSpace,
    budget: Budget,
    seed: int,
    proposer: Proposer,
    executor: Executor,
    *,
    name: str = "study",
    store: StudyStore | None = None,
    logger: Logger | None = None,
    max_proposals: int | None = None,
    trial_fn: TrialFn = run_trial,
    max_in_flight: int | None = None,
    sync_lag: int | None = None,
) -> Study:
    """Run one study to its end on ``executor`` and return it (see :class:`Study`)."""
    study = Study(
        name,
        task,
        executor.share(task),
        space,
        budget,
        seed,
        proposer,
        store=store,
        logger=logger,
        max_proposals=max_proposals,
        trial_fn=trial_fn,
        max_in_flight=max_in_flight,
        sync_lag=sync_lag,
    )
    drive(executor, [study])
    return study
