"""The driver: several jobs (studies, single runs) share one executor's slots.

A :class:`Job` hands out units of work while it has some (``units(free)``) and is told
each one's :class:`~selfref.execution.base.Completion` (``finish``); it is ``done`` when
it will hand out nothing more and has nothing in flight. :func:`drive` keeps the executor
busy with the jobs' units, in the jobs' order (an earlier job fills free slots first, so a
later one starts as soon as an earlier one stops asking), and routes each completion back
to the job that submitted it. The driver process keeps all the state: units carry only
their arguments and return their results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from selfref.execution.base import Completion, Executor

__all__ = ["Job", "Unit", "drive"]

Unit = tuple[str, Callable[..., Any], tuple[Any, ...]]  # (key, fn, args)


class Job(Protocol):
    """Something that runs as units of work: a search study, or one single-run method."""

    @property
    def done(self) -> bool:
        """Nothing more to hand out and nothing in flight."""
        ...

    def units(self, free: int) -> list[Unit]:
        """At most ``free`` units to start now (fewer, or none, is fine)."""
        ...

    def finish(self, completion: Completion) -> None:
        """One of this job's units has ended."""
        ...


def drive(
    executor: Executor,
    jobs: Sequence[Job],
    on_done: Callable[[Job], None] | None = None,
    poll_s: float | None = None,
) -> None:
    """Run every job to its end on ``executor``; call ``on_done(job)`` as each one ends.

    Args:
        executor: where the units run.
        jobs: in priority order.
        on_done: called once per job, in the order they end.
        poll_s: wake up at least this often even when nothing finished (lets the jobs see
            a grown capacity, e.g. workers that joined a cluster); None waits for a unit.

    Raises:
        Whatever a job raises; the units still in flight are waited for first (and their
        completions dropped), so a shared executor is idle when the caller goes on.
    """
    owner: dict[str, Job] = {}
    reported: set[int] = set()

    def report() -> None:
        for job in jobs:
            if id(job) not in reported and job.done:
                reported.add(id(job))
                if on_done is not None:
                    on_done(job)

    try:
        report()
        while len(reported) < len(jobs):
            free = executor.capacity() - executor.in_flight
            for job in jobs:
                if free <= 0:
                    break
                if job.done:
                    continue
                for key, fn, args in job.units(free):
                    executor.submit(key, fn, *args)
                    owner[key] = job
                    free -= 1
            if not owner:  # nothing runs and no job asked for anything: they are stuck
                report()
                stuck = [j for j in jobs if id(j) not in reported]
                if stuck:
                    raise RuntimeError(f"{len(stuck)} job(s) neither finished nor asked to run")
                return
            for c in executor.wait(poll_s):
                owner.pop(c.key).finish(c)
            report()
    except BaseException:
        while owner and executor.in_flight:
            for c in executor.wait():
                owner.pop(c.key, None)
        raise
