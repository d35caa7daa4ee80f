"""The trial runner every search method shares: workers, trials.jsonl, resume, retries.

A *trial* is one full :func:`selfref.train.train` run of ``budget.steps_per_trial`` steps with
one point of a :class:`~selfref.search_space.SearchSpace`, followed by the val and test
evaluation of its final weights. It costs the gradient evaluations it took (a diverged run
stops early and is charged only what it spent).

Pieces, bottom up:

- :func:`run_trial` runs one trial in whatever process calls it and returns its *record*, a
  JSON-able dict (status ``ok`` / ``diverged`` / ``failed`` with a reason). A trial that
  raises is recorded as failed with the exception; it does not stop the search.
- :class:`TrialRunner` runs trials in ``workers`` worker processes (``multiprocessing``
  "spawn" context, one torch thread each; the task is pickled once per worker). A worker that
  dies mid-trial (segfault, ``os._exit``, OOM kill) is detected through its process sentinel,
  replaced, and its trial retried once; a second death marks the trial failed.
  ``workers=0`` runs trials in the calling process (no isolation; for debugging and tests).
- :class:`TrialStore` persists one study's records as lines of the run directory's
  ``trials.jsonl`` (through :meth:`selfref.runs.RunDir.append_trial`, fsync'd as each trial
  finishes), tagged with the study name, so several studies share one file.
- :func:`run_study` drives a :class:`Proposer` (grid, random, Optuna…) over a runner with a
  :class:`~selfref.budget.CostCounter`: it keeps every worker busy while the unreserved
  budget still covers a full trial, writes each finished record at once, and on resume
  replays the finished records instead of re-running them. A deterministic proposer's trial
  ``i`` is a pure function of ``(seed, i)``, so a resumed study checks that every stored trial
  still matches its proposal and runs exactly the missing indices.
- :class:`TrialSearch` is the base of the search methods: ``Method.run`` on top of the above.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import pickle
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, ClassVar, Protocol

import torch

from selfref.budget import Budget, CostCounter, peak_memory_bytes
from selfref.logging import Logger
from selfref.methods.base import CurvePoint, Result
from selfref.runs import RunDir
from selfref.search_space import SearchSpace, default_space
from selfref.tasks import Task

__all__ = [
    "TrialRequest",
    "run_trial",
    "TrialRunner",
    "TrialStore",
    "Proposer",
    "StudyOutcome",
    "run_study",
    "TrialSearch",
    "default_workers",
]

Record = dict[str, Any]
TrialFn = Callable[[Task, "TrialRequest"], Record]


def default_workers() -> int:
    """The number of CPU cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class TrialRequest:
    """What one trial needs besides the task (sent to a worker as a small pickle).

    Args:
        optimizer: inner optimizer name (the space's).
        hparams: the point to train with (optimizer hyperparameters and ``l2``).
        steps: training steps of the trial.
        seed: seeds the initial weights and the minibatch order (the study's seed, so every
            trial of a study sees the same initialization and data order).
    """

    optimizer: str  # inner optimizer
    hparams: Mapping[str, Any]  # the trial's point
    steps: int  # inner training steps
    seed: int  # training seed


def run_trial(task: Task, request: TrialRequest) -> Record:
    """Train once with ``request.hparams`` and evaluate val and test; never raises.

    Returns:
        A record with ``status`` (``ok``, ``diverged`` or ``failed``), ``reason``,
        ``val_loss``, ``val_accuracy``, ``test_loss``, ``test_accuracy`` (None where not
        available or not finite), ``grad_evals`` (steps actually taken), ``compute_s`` and
        ``pid``. An exception becomes ``status="failed"`` with its type, message and traceback.
    """
    from selfref.train import train

    t0 = time.perf_counter()
    counter = CostCounter(Budget(request.steps, request.steps))
    rec: Record = {
        "status": "ok",
        "reason": None,
        "val_loss": None,
        "val_accuracy": None,
        "test_loss": None,
        "test_accuracy": None,
        "grad_evals": 0,
        "pid": os.getpid(),
    }
    hp = {k: v for k, v in request.hparams.items() if k != "l2"}
    l2 = float(request.hparams.get("l2", 0.0))
    try:
        out = train(
            task, request.optimizer, hp, request.steps, request.seed, counter=counter, l2=l2
        )
        rec["grad_evals"] = out.grad_evals
        if out.status != "ok":
            rec["status"] = "diverged"
            rec["reason"] = f"non-finite training loss at step {out.diverged_step}"
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
    except Exception as e:  # recorded with its reason; the search goes on
        rec["status"] = "failed"
        rec["reason"] = f"{type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc(limit=8)
        rec["grad_evals"] = counter.grad_evals
    rec["compute_s"] = time.perf_counter() - t0
    return rec


def _failed_record(reason: str, **extra: Any) -> Record:
    return {
        "status": "failed",
        "reason": reason,
        "val_loss": None,
        "val_accuracy": None,
        "test_loss": None,
        "test_accuracy": None,
        "grad_evals": 0,
        "compute_s": 0.0,
        "pid": os.getpid(),
        **extra,
    }


def _call_trial(trial_fn: TrialFn, task: Task, request: TrialRequest) -> Record:
    """``trial_fn(task, request)``; an exception becomes a failed record with its reason."""
    t0 = time.perf_counter()
    try:
        return trial_fn(task, request)
    except Exception as e:  # recorded with its reason; the search goes on
        return _failed_record(
            f"{type(e).__name__}: {e}",
            traceback=traceback.format_exc(limit=8),
            compute_s=time.perf_counter() - t0,
        )


def _warmup(task: Task) -> None:
    """One training step, so one-off costs (lazy imports, first kernels) are paid at start."""
    from selfref.train import train

    train(task, "sgd", {"lr": 1e-3}, steps=1, seed=0)


def _worker_main(conn: Connection, trial_fn: TrialFn, warmup: bool, threads: int | None) -> None:
    """Worker loop: receive the pickled task, then ``(key, request)`` messages, each answered
    by ``(key, record)``; ``None`` (or the parent going away) stops it."""
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        task = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return
    if warmup:
        _warmup(task)
    conn.send(("ready", os.getpid(), time.time()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent went away: nothing left to do
            return
        if msg is None:
            return
        key, request = msg
        record = _call_trial(trial_fn, task, request)
        try:
            conn.send((key, record))
        except (BrokenPipeError, OSError):
            return


@dataclass
class _Worker:
    process: Any  # multiprocessing.Process of the chosen context
    conn: Connection
    task_sent: bool = False  # the pickled task has been written to it
    ready: bool = False  # has sent its "ready" message
    job: tuple[Any, TrialRequest] | None = None  # (key, request) in flight
    started_at: float = 0.0  # time.time() when the process was started


class TrialRunner:
    """Runs trials of one task in worker processes, retrying a trial once if its worker dies.

    Use as a context manager (or call :meth:`close`). ``submit`` hands a trial to an idle
    worker; ``wait`` blocks until at least one trial has finished and returns
    ``[(key, record), ...]``. Records of retried trials carry ``attempts`` = 2; a trial whose
    worker died twice comes back ``failed`` with the exit codes in its reason.

    Args:
        task: the task every trial trains (pickled once into each worker).
        workers: worker processes; 0 runs trials in this process (no crash isolation).
            Default: the number of CPU cores.
        context: ``"spawn"`` (default, portable, safe with CUDA) or ``"forkserver"``.
        trial_fn: a picklable top-level function ``(task, request) -> record``
            (default :func:`run_trial`).
        warmup: run one training step in each worker at start, so the first trial's compute
            time is not inflated by one-off costs.
        threads: torch threads per trial (in each worker, or around in-process trials; the
            previous setting is restored); None leaves torch's default. One thread per worker
            avoids oversubscribing the cores.

    Raises:
        RuntimeError: (from ``wait``) a worker process died before it was ready, e.g. a
            script that starts workers without an ``if __name__ == "__main__":`` guard.
    """

    def __init__(
        self,
        task: Task,
        workers: int | None = None,
        context: str = "spawn",
        trial_fn: TrialFn = run_trial,
        warmup: bool = True,
        threads: int | None = 1,
    ) -> None:
        n = default_workers() if workers is None else int(workers)
        if n < 0:
            raise ValueError(f"workers must be >= 0 (0 = in-process), got {workers}")
        if context not in ("spawn", "forkserver"):
            raise ValueError(
                f"unknown multiprocessing context {context!r}; valid: spawn, forkserver"
            )
        self.task = task
        self.trial_fn = trial_fn
        self.warmup = warmup
        self.threads = threads
        self.workers = n
        self._attempts: dict[Any, int] = {}
        self._deaths: dict[Any, list[int | None]] = {}
        self._local: deque[tuple[Any, TrialRequest]] = deque()
        self._slots: list[_Worker | None] = []
        self._closed = False
        self.started_workers = 0  # processes started so far (replacements included)
        self.startup_s: list[float] = []  # per started worker: seconds until it was ready
        if n == 0:
            return
        try:
            self._task_bytes = pickle.dumps(task)
        except Exception as e:
            warnings.warn(
                f"task {getattr(task, 'name', task)!r} cannot be pickled for worker processes "
                f"({type(e).__name__}: {e}); running trials in this process instead",
                stacklevel=2,
            )
            self.workers = 0
            return
        self._ctx: Any = mp.get_context(context)
        self._slots = [self._start() for _ in range(n)]

    # -- process management -------------------------------------------------------------

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        p = self._ctx.Process(
            target=_worker_main,
            args=(child, self.trial_fn, self.warmup, self.threads),
            daemon=True,
            name="selfref-trial-worker",
        )
        started_at = time.time()
        p.start()
        child.close()
        self.started_workers += 1
        return _Worker(p, parent, started_at=started_at)

    @property
    def capacity(self) -> int:
        """How many trials can be in flight at once."""
        return max(1, self.workers)

    def idle(self) -> int:
        """Number of trials that can be submitted now."""
        if self.workers == 0:
            return 0 if self._local else 1
        return sum(1 for w in self._slots if w is None or w.job is None)

    @property
    def in_flight(self) -> int:
        if self.workers == 0:
            return len(self._local)
        return sum(1 for w in self._slots if w is not None and w.job is not None)

    def submit(self, key: Any, request: TrialRequest) -> None:
        """Start a trial on an idle worker (``key`` comes back with its record)."""
        if self._closed:
            raise RuntimeError("TrialRunner is closed")
        self._attempts[key] = self._attempts.get(key, 0) + 1
        if self.workers == 0:
            if self._local:
                raise RuntimeError("no idle worker: call wait() first")
            self._local.append((key, request))
            return
        for i, w in enumerate(self._slots):
            if w is not None and w.job is None and not w.process.is_alive():
                self._reap(w)
                w = self._slots[i] = None
            if w is None:
                w = self._slots[i] = self._start()
            if w.job is None:
                w.job = (key, request)
                try:
                    if not w.task_sent:  # sent here, not as a Process argument: a big spawn
                        w.conn.send_bytes(self._task_bytes)  # payload blocks if the child dies
                        w.task_sent = True
                    w.conn.send((key, request))
                except OSError:
                    pass  # the worker is gone: wait() sees its sentinel and retries the trial
                return
        raise RuntimeError("no idle worker: call wait() first")

    def wait(self) -> list[tuple[Any, Record]]:
        """Block until at least one submitted trial has finished; return those that have."""
        if self.workers == 0:
            if not self._local:
                return []
            key, request = self._local.popleft()
            with _torch_threads(self.threads):
                record = _call_trial(self.trial_fn, self.task, request)
            return [(key, self._finish(key, record))]
        done: list[tuple[Any, Record]] = []
        while not done:
            busy = [w for w in self._slots if w is not None and w.job is not None]
            if not busy:
                return []
            handles: list[Any] = [w.conn for w in busy] + [w.process.sentinel for w in busy]
            ready = set(wait(handles))
            for w in busy:
                got = False
                if w.conn in ready or w.process.sentinel in ready:
                    got = self._drain(w, done)
                if not got and w.process.sentinel in ready:
                    self._died(w, done)
        return done

    def _drain(self, w: _Worker, done: list[tuple[Any, Record]]) -> bool:
        """Read the worker's pending messages; True if its trial's record arrived."""
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "ready":
                    w.ready = True
                    self.startup_s.append(float(msg[2]) - w.started_at)
                    continue
                key, record = msg
                if w.job is None or key != w.job[0]:
                    raise RuntimeError(f"worker returned trial {key!r} it was not given")
                w.job = None
                done.append((key, self._finish(key, record)))
                return True
        except (EOFError, OSError):
            return False
        return False

    def _died(self, w: _Worker, done: list[tuple[Any, Record]]) -> None:
        """A worker's process ended with a trial in flight: retry it once, then mark it failed."""
        job = w.job
        code = self._reap(w)
        i = self._slots.index(w)
        self._slots[i] = None
        if not w.ready:
            raise RuntimeError(
                f"a trial worker process exited (code {code}) before it was ready; a script "
                'that uses worker processes needs an `if __name__ == "__main__":` guard '
                "(or use workers=0)"
            )
        if job is None:
            return
        key, request = job
        self._deaths.setdefault(key, []).append(code)
        if self._attempts[key] < 2:
            self.submit(key, request)  # a fresh process takes the slot
            return
        codes = ", ".join(str(c) for c in self._deaths[key])
        record = _failed_record(
            f"worker process died (exit codes {codes}); retried once, then marked failed",
            pid=None,
        )
        done.append((key, self._finish(key, record)))

    def _finish(self, key: Any, record: Record) -> Record:
        record = dict(record)
        record["attempts"] = self._attempts.pop(key, 1)
        deaths = self._deaths.pop(key, [])
        if deaths:
            record["worker_exit_codes"] = deaths
        return record

    def _reap(self, w: _Worker) -> int | None:
        w.process.join(timeout=5)
        w.conn.close()
        return w.process.exitcode

    def close(self) -> None:
        """Stop the workers (those that do not stop within 5 s are terminated)."""
        if self._closed:
            return
        self._closed = True
        for w in self._slots:
            if w is None:
                continue
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass  # already gone; joined below
        for w in self._slots:
            if w is None:
                continue
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(timeout=5)
            w.conn.close()
        self._slots = []

    def __enter__(self) -> TrialRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Set torch's intra-op threads to ``n`` for the block, then restore them."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class TrialStore:
    """One study's records in a run directory's ``trials.jsonl`` (shared by several studies).

    Args:
        run: the run directory.
        study: the study's name, e.g. ``"random-s0"``; each record carries it.
    """

    def __init__(self, run: RunDir, study: str) -> None:
        self.run = run
        self.study = study

    def load(self) -> list[Record]:
        """This study's finished records in file order (a torn last line is skipped)."""
        out: list[Record] = []
        seen: set[int] = set()
        for rec in self.run.iter_trials():
            if rec.get("study") != self.study:
                continue
            idx = int(rec["index"])
            if idx in seen:
                warnings.warn(
                    f"trials.jsonl holds trial {idx} of study {self.study!r} twice; "
                    "keeping the first",
                    stacklevel=2,
                )
                continue
            seen.add(idx)
            out.append(rec)
        return out

    def append(self, record: Mapping[str, Any]) -> None:
        self.run.append_trial({**record, "study": self.study})


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
    resumed: int = 0  # records replayed from trials.jsonl instead of run

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
    import json

    return json.loads(json.dumps(dict(hp), default=float))


def run_study(
    task: Task,
    space: SearchSpace,
    budget: Budget,
    seed: int,
    proposer: Proposer,
    runner: TrialRunner,
    *,
    store: TrialStore | None = None,
    logger: Logger | None = None,
    max_proposals: int | None = None,
) -> StudyOutcome:
    """Run a study: propose, train and record trials until the budget or the proposals end.

    A trial is dispatched only while the budget not yet reserved by trials in flight covers a
    full trial, so the counter can never overspend; each finished trial is charged what it
    spent, appended to ``store`` at once and told to the proposer. After each trial the curve
    gets the point (gradient evaluations so far, best validation loss so far) and the logger
    gets ``trial/val_loss``, ``best/val_loss_vs_grad_evals`` and ``hparams/<name>``, all at
    step = gradient evaluations so far.

    Args:
        task, space, budget, seed: what to tune, where, with how much, under which seed.
        proposer: the search method's source of points.
        runner: where trials run (its task must be ``task``).
        store: persistence for crash safety and resume (None: in memory only).
        logger: receives the per-trial scalars.
        max_proposals: at most this many trials (default ``2 * budget.max_trials``, a guard
            against trials that fail before spending anything).

    Raises:
        ValueError: a budget smaller than one trial; a stored trial that does not match the
            seeded proposal (the space or seed changed since the study started); stored trials
            that spend more than the budget.
    """
    if runner.task is not task:
        raise ValueError("the TrialRunner was built for a different task object")
    steps = budget.steps_per_trial
    if budget.max_trials < 1:
        raise ValueError(
            f"budget of {budget.grad_evals} gradient evaluations is smaller than one trial of "
            f"{steps} steps"
        )
    cap = 2 * budget.max_trials if max_proposals is None else max_proposals
    t0 = time.perf_counter()
    counter = CostCounter(budget)
    out = StudyOutcome()

    def record_done(index: int, hp: Mapping[str, Any], rec: Record, replayed: bool) -> None:
        counter.spend(int(rec.get("grad_evals") or 0))
        rec = {
            "index": index,
            "hparams": dict(hp),
            **{k: v for k, v in rec.items() if k not in ("index", "hparams", "study")},
        }
        rec["grad_evals_total"] = counter.grad_evals
        if not replayed and store is not None:
            store.append(rec)
        out.records.append(rec)
        v = rec.get("val_loss")
        if rec["status"] == "ok" and v is not None and math.isfinite(v):
            if out.best is None or v < out.best["val_loss"]:
                out.best = rec
        if out.best is not None:
            out.curve.append(CurvePoint(counter.grad_evals, float(out.best["val_loss"])))
        if logger is not None:
            g = counter.grad_evals
            if v is not None and math.isfinite(v):
                logger.scalar("trial/val_loss", v, g)
            if out.best is not None:
                logger.scalar("best/val_loss_vs_grad_evals", out.best["val_loss"], g)
            for name, value in hp.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    logger.scalar(f"hparams/{name}", value, g)

    finished = store.load() if store is not None else []
    for rec in finished:
        idx, hp = int(rec["index"]), rec["hparams"]
        if proposer.deterministic:
            expected = proposer.ask(idx)
            if expected is None or _normalize(expected) != _normalize(hp):
                raise ValueError(
                    f"trial {idx} in trials.jsonl was {hp} but the seeded proposal is "
                    f"{expected}; the search space, seed or method options changed since the "
                    "study started"
                )
        if not counter.can_spend(int(rec.get("grad_evals") or 0)):
            raise ValueError(
                f"the stored trials spend more than the budget of {budget.grad_evals} "
                "gradient evaluations; resume with the budget the study started with"
            )
        proposer.replay(idx, hp, rec)
        record_done(idx, hp, dict(rec), replayed=True)
    out.resumed = len(finished)

    done_idx = {int(r["index"]) for r in finished}
    next_idx = 0 if proposer.deterministic else (max(done_idx) + 1 if done_idx else 0)
    proposals = len(finished)
    in_flight: dict[int, dict[str, Any]] = {}
    exhausted = False
    try:
        while True:
            while (
                not exhausted
                and runner.idle() > 0
                and proposals < cap
                and counter.remaining - steps * len(in_flight) >= steps
            ):
                while next_idx in done_idx:
                    next_idx += 1
                hp = proposer.ask(next_idx)
                if hp is None:
                    exhausted = True
                    break
                hp = _normalize(hp)
                in_flight[next_idx] = hp
                runner.submit(next_idx, TrialRequest(space.optimizer, hp, steps, seed))
                next_idx += 1
                proposals += 1
            if not in_flight:
                break
            for idx, rec in runner.wait():
                hp = in_flight.pop(idx)
                record_done(idx, hp, rec, replayed=False)
                proposer.tell(idx, hp, rec)
    except Exception:
        # The error propagates; first let trials in flight finish so a shared runner is
        # idle (and its answers not mistaken for the next study's) when the caller goes on.
        while runner.in_flight:
            runner.wait()
        raise
    out.grad_evals = counter.grad_evals
    out.wall_s = time.perf_counter() - t0
    return out


class TrialSearch:
    """Base of the search methods: a :class:`Proposer` run by :func:`run_study`.

    Args:
        space: the search space (default :func:`selfref.search_space.default_space`).
        workers: worker processes when no ``runner`` is given (default: CPU cores;
            0 = in-process).
        runner: a shared :class:`TrialRunner` for the same task (``selfref compare`` keeps one
            pool of workers for every method and seed); used only if built for the task given
            to :meth:`run`, else a private runner is started and closed.
        run_dir: where ``trials.jsonl`` lives; finished trials of the study
            ``<name>-s<seed>`` found there are kept, not re-run (resume).
    """

    name: ClassVar[str] = "search"

    def __init__(
        self,
        space: SearchSpace | None = None,
        workers: int | None = None,
        runner: TrialRunner | None = None,
        run_dir: RunDir | str | None = None,
        storage: str | None = None,
    ) -> None:
        if space is not None and not isinstance(space, SearchSpace):
            raise ValueError(f"space must be a SearchSpace, got {type(space).__name__}")
        if workers is not None and workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = in-process), got {workers}")
        self.space = space
        self.workers = workers
        self.runner = runner
        self.run_dir = RunDir.open(run_dir) if isinstance(run_dir, str) else run_dir
        self.storage = storage  # an Optuna RDB URL (selfref.execution.optuna_storage)

    def proposer(self, space: SearchSpace, budget: Budget, seed: int) -> Proposer:
        raise NotImplementedError

    def describe(self, proposer: Proposer) -> dict[str, Any]:
        """Method-specific facts for ``Result.extra``."""
        return {}

    def run(
        self, task: Task, budget: Budget, logger: Logger | None = None, seed: int = 0
    ) -> Result:
        """Search ``space`` on ``task`` within ``budget``; the best trial's metrics come back.

        Raises:
            ValueError: a budget smaller than one trial, a resume that does not match.
        """
        space = self.space if self.space is not None else default_space(task)
        if budget.max_trials < 1:
            raise ValueError(
                f"budget of {budget.grad_evals} gradient evaluations is smaller than one trial "
                f"of {budget.steps_per_trial} steps"
            )
        proposer = self.proposer(space, budget, seed)
        from selfref.execution.optuna_storage import open_store

        store = open_store(
            self.run_dir, self.storage, f"{self.name}-s{seed}", space, self.name, seed
        )
        shared = self.runner is not None and self.runner.task is task
        runner = self.runner if shared else TrialRunner(task, self.workers)
        assert runner is not None
        try:
            study = run_study(
                task, space, budget, seed, proposer, runner, store=store, logger=logger
            )
        finally:
            if not shared:
                runner.close()
        return study_result(
            self.name, task, seed, study, space, runner.workers, self.describe(proposer)
        )


def study_result(
    name: str,
    task: Task,
    seed: int,
    study: StudyOutcome,
    space: SearchSpace,
    workers: int,
    extra: Mapping[str, Any] | None = None,
) -> Result:
    """The :class:`Result` of a study: the best trial's hparams and metrics, curve and costs."""
    counts = study.counts()
    res = Result(
        method=name,
        task=task.name,
        seed=seed,
        curve=list(study.curve),
        grad_evals=study.grad_evals,
        wall_s=study.wall_s,
        peak_mem_bytes=peak_memory_bytes(getattr(task, "device", None)),
        extra={
            "trials": len(study.records),
            "trials_ok": counts["ok"],
            "trials_diverged": counts["diverged"],
            "trials_failed": counts["failed"],
            "trials_resumed": study.resumed,
            "trial_compute_s": study.compute_s,
            "workers": workers,
            "optimizer": space.optimizer,
            "space": space.to_dict(),
            **(extra or {}),
        },
    )
    if study.best is not None:
        b = study.best
        res.best_hparams = dict(b["hparams"])
        res.val_loss = float(b["val_loss"])
        res.val_accuracy = b.get("val_accuracy")
        res.test_loss = float(b["test_loss"]) if b.get("test_loss") is not None else math.nan
        res.test_accuracy = b.get("test_accuracy")
        res.extra["best_trial"] = b["index"]
    else:
        res.status = "diverged" if counts["diverged"] else "failed"
        reasons = sorted({str(r.get("reason")) for r in study.records})
        res.reason = f"no trial finished ok ({counts}); reasons: {'; '.join(reasons[:3])}"
    return res
