"""Where trials and runs execute: one interface, three executors, the trial store, the driver.

- :mod:`~selfref.execution.base`: the :class:`Executor` interface, :class:`Completion`, and
  the fault policy written once (a unit whose worker dies is retried once, then ``lost``;
  a timeout stops a unit);
- :mod:`~selfref.execution.inprocess`: units in this process (``workers=0``);
- :mod:`~selfref.execution.local`: local worker processes (``concurrent.futures``);
- :mod:`~selfref.execution.cluster`: a Dask distributed cluster (extra ``selfref[cluster]``);
- :mod:`~selfref.execution.store`: the store a study's finished trials persist in;
- :mod:`~selfref.execution.driver`: several jobs sharing one executor.

:func:`make_executor` picks one from the command line's ``--workers`` / ``--cluster``.
"""

from __future__ import annotations

from collections.abc import Callable

from selfref.execution.base import (
    Completion,
    Executor,
    ExecutorBase,
    default_workers,
    torch_threads,
)
from selfref.execution.driver import Job, drive
from selfref.execution.inprocess import InProcessExecutor
from selfref.execution.local import LocalExecutor
from selfref.execution.store import StudyStore, TrialStore

__all__ = [
    "Completion",
    "Executor",
    "ExecutorBase",
    "InProcessExecutor",
    "LocalExecutor",
    "Job",
    "drive",
    "StudyStore",
    "TrialStore",
    "make_executor",
    "default_workers",
    "torch_threads",
]


def make_executor(
    workers: int | None = None,
    cluster: str | None = None,
    *,
    threads: int | None = 1,
    setup: Callable[[], None] | None = None,
    retries: int = 1,
    timeout: float | None = None,
    gpu: bool = False,
    prefetch: int = 0,
) -> Executor:
    """The executor for ``workers`` local processes, or for a Dask ``cluster``.

    Args:
        workers: local worker processes (None: one per CPU core; 0: in this process).
            Ignored with ``cluster``.
        cluster: ``"local:N"`` (a local Dask cluster of N single-thread workers) or a Dask
            scheduler address (``tcp://127.0.0.1:8786``); None: local processes.
        threads: torch threads per unit.
        setup: run once in each local worker process at start.
        retries: times a unit whose worker died is started again.
        timeout: seconds a unit may run (None: no limit).
        gpu: units need a GPU (Dask: each declares the ``GPU`` resource instead of ``CPU``).
        prefetch: Dask: units in flight beyond the cluster's slots (0: none). Ignored
            without ``cluster``.

    Raises:
        ValueError: a bad ``cluster`` string, a timeout without worker processes.
        ImportError: ``cluster`` without Dask installed (names the extra).
    """
    if cluster is not None:
        from selfref.execution.cluster import DaskExecutor

        return DaskExecutor(
            cluster,
            threads=threads,
            retries=retries,
            timeout=timeout,
            gpu=gpu,
            setup=setup,
            prefetch=prefetch,
        )
    if workers == 0:
        if timeout is not None:
            raise ValueError(
                "a trial timeout needs worker processes (workers >= 1 or a cluster): a unit "
                "in this process cannot be stopped"
            )
        return InProcessExecutor(threads=threads)
    return LocalExecutor(workers, threads=threads, setup=setup, retries=retries, timeout=timeout)
