"""The execution interface: units of work submitted by key, completions waited for.

A *unit of work* is one call ``fn(*args)`` of a picklable top-level function: one trial of
a search method, or one (method, seed) run of a single-run method. Every executor
(:class:`~selfref.execution.inprocess.InProcessExecutor`,
:class:`~selfref.execution.local.LocalExecutor`,
:class:`~selfref.execution.cluster.DaskExecutor`) has the same surface:

- ``capacity()``: how many units may be in flight now; ``submit(key, fn, *args)`` starts
  one (``key`` is a string that names it and comes back with its completion);
- ``share(obj)``: a handle to pass in ``args`` in place of a large object every unit reads
  (the task), so it travels to each worker once, not with every unit;
- ``wait(timeout)``: blocks until at least one unit has finished (or ``timeout`` seconds
  passed) and returns their :class:`Completion` objects;
- ``close()``: stops what the executor started.

The fault policy is written once, in :class:`ExecutorBase`, for every backend:

- a unit whose worker process (or node) dies is *lost*; it is started again, ``retries``
  times (default once), then completes with status ``lost``;
- a unit that raises completes with status ``error`` (its exception and traceback), never
  retried: the same call would raise again;
- with ``timeout`` seconds, a unit running longer is stopped (its worker process is killed
  where the backend can) and completes with status ``timeout``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

__all__ = [
    "Completion",
    "CompletionStatus",
    "Executor",
    "ExecutorBase",
    "torch_threads",
    "default_workers",
]

CompletionStatus = Literal["ok", "error", "lost", "timeout"]


def default_workers() -> int:
    """The number of CPU cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Set torch's intra-op threads to ``n`` for the block, then restore them (None: as is)."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class Completion:
    """How one unit of work ended.

    Attributes:
        key: the key it was submitted under.
        status: ``ok`` (``value`` holds what it returned), ``error`` (it raised), ``lost``
            (its worker died on every attempt) or ``timeout`` (stopped after the timeout).
        value: the unit's return value (status ok), else None.
        reason: why it did not finish ok (None when ok).
        traceback: the exception's traceback (status error), when known.
        attempts: how many times it was started (2 after one retry).
        lost: one line per attempt whose worker died (empty when none did).
    """

    key: str
    status: CompletionStatus = "ok"
    value: Any = None
    reason: str | None = None
    traceback: str | None = None
    attempts: int = 1
    lost: tuple[str, ...] = ()


@runtime_checkable
class Executor(Protocol):
    """Where units of work run (see the module docstring)."""

    name: str  # "in-process", "local" or "dask"
    workers: int  # worker processes (or cluster slots) when built; 0 = in this process

    def capacity(self) -> int:
        """How many units may be in flight now (at least 1)."""
        ...

    @property
    def in_flight(self) -> int:
        """Units submitted and not yet returned by :meth:`wait`."""
        ...

    def share(self, obj: Any) -> Any:
        """A handle that stands for ``obj`` in a unit's arguments (sent to each worker once)."""
        ...

    def submit(self, key: str, fn: Callable[..., Any], *args: Any) -> None:
        """Start ``fn(*args)``; ``key`` comes back with its :class:`Completion`."""
        ...

    def wait(self, timeout: float | None = None) -> list[Completion]:
        """Block until a unit has finished or ``timeout`` passed; return what finished."""
        ...

    def close(self) -> None:
        """Stop what this executor started (units in flight are abandoned)."""
        ...


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    attempts: int = 0
    lost: list[str] = field(default_factory=list)
    started: float | None = None  # time.monotonic() when the current attempt started running


class ExecutorBase:
    """The bookkeeping every backend shares: keys, retries of lost units, timeouts.

    A backend implements ``_launch(key, job)`` (start the job's current attempt),
    ``_poll(timeout) -> list[(key, kind, payload)]`` with kind ``"ok"`` (payload: the
    value), ``"error"`` (payload: (reason, traceback)) or ``"lost"`` (payload: why), and
    ``_stop(key)`` (stop a running attempt after a timeout). It calls :meth:`_running` when
    an attempt actually starts to run (so a worker's start-up is not charged to the unit's
    timeout).

    Args:
        retries: times a lost unit is started again before it completes as ``lost``.
        timeout: seconds a unit may run (None: no limit).
    """

    name = "base"
    workers = 0

    def __init__(self, retries: int = 1, timeout: float | None = None) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
        self.retries = retries
        self.timeout = timeout
        self._jobs: dict[str, _Job] = {}
        self._retry: deque[str] = deque()  # lost units waiting for a free slot
        self._closed = False

    # -- backend hooks ---------------------------------------------------------------------

    def capacity(self) -> int:
        raise NotImplementedError

    def share(self, obj: Any) -> Any:
        return obj

    def _launch(self, key: str, job: _Job) -> None:
        raise NotImplementedError

    def _poll(self, timeout: float | None) -> list[tuple[str, str, Any]]:
        raise NotImplementedError

    def _stop(self, key: str) -> None:
        raise NotImplementedError

    def _running(self, key: str) -> None:
        job = self._jobs.get(key)
        if job is not None and job.started is None:
            job.started = time.monotonic()

    # -- the shared surface ----------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    def submit(self, key: str, fn: Callable[..., Any], *args: Any) -> None:
        if self._closed:
            raise RuntimeError(f"the {self.name} executor is closed")
        if key in self._jobs:
            raise ValueError(f"a unit with key {key!r} is already in flight")
        if self.in_flight >= self.capacity():
            raise RuntimeError("no idle worker: call wait() first")
        job = _Job(fn, tuple(args))
        self._jobs[key] = job
        self._start(key, job)

    def _start(self, key: str, job: _Job) -> None:
        job.attempts += 1
        job.started = None
        self._launch(key, job)

    def _relaunch(self) -> None:
        """Start lost units again once a slot is free (a retry never queues behind another
        unit on a worker, where that worker's death would be charged to it as well)."""
        while self._retry and self.in_flight - len(self._retry) < self.capacity():
            key = self._retry.popleft()
            self._start(key, self._jobs[key])

    def _complete(self, key: str, status: CompletionStatus, **kw: Any) -> Completion:
        job = self._jobs.pop(key)
        return Completion(key, status, attempts=job.attempts, lost=tuple(job.lost), **kw)

    def wait(self, timeout: float | None = None) -> list[Completion]:
        if not self._jobs:
            return []
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            self._relaunch()
            done = self._expire()
            if done:
                return done
            now = time.monotonic()
            t = None if end is None else max(0.0, end - now)
            deadlines = [
                j.started + self.timeout
                for j in self._jobs.values()
                if self.timeout is not None and j.started is not None
            ]
            if deadlines:
                first = max(0.0, min(deadlines) - now)
                t = first if t is None else min(t, first)
            for key, kind, payload in self._poll(t):
                if key not in self._jobs:  # stopped after its timeout: already completed
                    continue
                if kind == "ok":
                    done.append(self._complete(key, "ok", value=payload))
                elif kind == "error":
                    reason, tb = payload
                    done.append(self._complete(key, "error", reason=reason, traceback=tb))
                else:  # lost: its worker died
                    job = self._jobs[key]
                    job.lost.append(str(payload))
                    if job.attempts <= self.retries:
                        job.started = None
                        self._retry.append(key)
                    else:
                        why = "; ".join(job.lost)
                        done.append(
                            self._complete(
                                key,
                                "lost",
                                reason=f"worker died on every attempt ({why}); retried "
                                f"{self.retries} time{'s' if self.retries != 1 else ''}, then "
                                "marked failed",
                            )
                        )
            self._relaunch()
            if done or not self._jobs or (end is not None and time.monotonic() >= end):
                return done + self._expire()

    def _expire(self) -> list[Completion]:
        """Stop and complete the units that have run past the timeout."""
        if self.timeout is None:
            return []
        now = time.monotonic()
        late = [
            k
            for k, j in self._jobs.items()
            if j.started is not None and now - j.started >= self.timeout
        ]
        out = []
        for key in late:
            self._stop(key)
            out.append(
                self._complete(
                    key, "timeout", reason=f"ran longer than the timeout of {self.timeout:g} s"
                )
            )
        return out

    def close(self) -> None:
        self._closed = True
        self._jobs.clear()
        self._retry.clear()

    def __enter__(self) -> ExecutorBase:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
