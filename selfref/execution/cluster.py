"""The Dask executor: units of work as tasks on a Dask distributed cluster.

``DaskExecutor("local:N")`` starts a local cluster of N single-thread worker processes
(each under a nanny that restarts it if it dies), bound to 127.0.0.1; any other string is
the address of a running scheduler (``tcp://127.0.0.1:8786``), e.g. one started by
``dask scheduler`` or by dask-jobqueue on Slurm. Needs the extra ``selfref[cluster]``.

- Resources: every unit declares one ``CPU`` (one ``GPU`` with ``gpu=True``), so a worker
  runs as many units at once as it declares (``dask worker --resources CPU=1``); the
  executor's capacity is the sum over the workers that have joined.
- Sharing: :meth:`DaskExecutor.share` scatters an object to every worker once
  (``Client.scatter(broadcast=True)``); workers that join later fetch it from a peer. If
  the workers holding it all die (a scheduler's active memory manager may keep only one
  copy), it is scattered again and the units that needed it start again, uncharged.
- Faults: a unit whose worker dies fails on the scheduler with ``KilledWorker`` after the
  scheduler's own ``allowed-failures`` retries; the executor then starts it again itself
  until it has been retried ``retries`` times in all (:class:`~selfref.execution.base.
  ExecutorBase`), then it completes as ``lost``. A local cluster is started with
  ``allowed-failures`` 0, so the driver does the one retry and counts the attempts; for a
  scheduler of your own, start it with ``DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0``
  for the same (with Dask's default of 3, a unit gets those 3 retries and no more). Dask
  places a unit on a worker before that worker has a free slot, so a worker's death is
  charged to every unit placed on it, also one that had not started there yet.
- Timeout: a unit past the timeout is cancelled and its worker restarted through its nanny
  (a thread cannot be stopped otherwise); a worker without a nanny keeps running the
  abandoned call to its end. The clock starts when the unit starts on its worker: with a
  timeout, each unit first logs a ``selfref-unit-start`` event the driver subscribes to
  (so time spent waiting for a worker, e.g. one its nanny is restarting, is not counted).
- Keys: a unit's Dask key is its executor key plus the attempt, so a driver that resumes
  submits the same keys again, and a cluster still running one of them may hand its
  result to the new driver.
"""

from __future__ import annotations

import logging
import time
import traceback as tb_module
import warnings
from collections.abc import Callable
from typing import Any

from selfref.execution.base import ExecutorBase, _Job

__all__ = ["DaskExecutor", "EXTRA_MESSAGE", "parse_cluster", "check_available"]

EXTRA_MESSAGE = "install the extra: pip install 'selfref[cluster]'"
RESCUES = 3  # uncharged restarts of one unit whose shared inputs were lost


def check_available() -> None:
    """Raise ImportError naming the extra when Dask distributed is missing."""
    try:
        import distributed  # noqa: F401
    except ImportError as e:
        raise ImportError(f"--cluster needs Dask distributed; {EXTRA_MESSAGE}") from e


def parse_cluster(spec: str) -> tuple[str, int | None]:
    """``"local:N"`` -> ("local", N); anything else -> (the scheduler address, None).

    Raises:
        ValueError: ``local:`` with a count that is not a positive integer, or an empty spec.
    """
    spec = spec.strip()
    if not spec:
        raise ValueError("--cluster is empty; give local:N or a scheduler address")
    if spec.startswith("local"):
        _, _, n = spec.partition(":")
        try:
            count = int(n)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(
                f"--cluster {spec!r}: a local cluster is local:N with N >= 1 workers, e.g. local:2"
            )
        return "local", count
    return spec, None


def _worker_setup(threads: int | None, setup: Callable[[], None] | None) -> Any:
    from distributed import WorkerPlugin

    class SelfrefWorkerSetup(WorkerPlugin):  # one per executor; runs on every worker
        def setup(self, worker: Any) -> None:
            if threads is not None:
                import torch

                torch.set_num_threads(threads)
            if setup is not None:
                setup()

    return SelfrefWorkerSetup()


_START_TOPIC = "selfref-unit-start"


def _announced(dkey: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Tell the driver this unit has started on a worker, then run it."""
    from distributed import get_worker

    get_worker().log_event(_START_TOPIC, dkey)
    return fn(*args)


def _allowed_failures(dask_scheduler: Any) -> int:
    return int(dask_scheduler.allowed_failures)


class DaskExecutor(ExecutorBase):
    """Units as tasks on a Dask cluster (see the module docstring).

    Args:
        cluster: ``"local:N"`` or a scheduler address.
        threads: torch threads in each worker process (set once per worker).
        retries: times in all a unit whose worker died is started again.
        timeout: seconds a unit may run (None: no limit).
        gpu: units declare the ``GPU`` resource instead of ``CPU``.
        setup: a picklable function run once on every worker (also ones that join later).
        connect_s: seconds to wait for the scheduler and for its first worker.
        prefetch: units in flight beyond the cluster's slots (queued on the workers, so a
            worker that finishes one starts the next without a round trip to the driver).

    Raises:
        ImportError: Dask distributed is missing (names the extra).
        ValueError: a bad ``cluster``; no scheduler or no worker within ``connect_s``; no
            worker that declares the resource units need.
    """

    name = "dask"

    def __init__(
        self,
        cluster: str,
        threads: int | None = 1,
        retries: int = 1,
        timeout: float | None = None,
        gpu: bool = False,
        setup: Callable[[], None] | None = None,
        connect_s: float = 60.0,
        prefetch: int = 0,
    ) -> None:
        check_available()
        import dask
        from distributed import Client, LocalCluster, as_completed

        super().__init__(retries=retries, timeout=timeout)
        where, n = parse_cluster(cluster)
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.prefetch = prefetch
        self.resource = "GPU" if gpu else "CPU"
        self.address = where
        self._cluster: Any = None
        if n is not None:
            local_config = {
                "distributed.scheduler.allowed-failures": 0,  # the driver retries (above)
                # keep the broadcast copies of shared objects (the memory manager would
                # drop all but one, which a worker's death then loses)
                "distributed.scheduler.active-memory-manager.start": False,
            }
            with dask.config.set(local_config):
                self._cluster = LocalCluster(
                    n_workers=n,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=None,
                    resources={self.resource: 1},
                    silence_logs=logging.ERROR,
                )
            self.client = Client(self._cluster)
            self.address = self._cluster.scheduler_address
        else:
            try:
                self.client = Client(where, timeout=connect_s)
            except (OSError, TimeoutError) as e:
                raise ValueError(
                    f"no Dask scheduler answered at {where!r} within {connect_s:g} s ({e})"
                ) from None
        try:
            self.client.wait_for_workers(1, timeout=connect_s)
        except TimeoutError:
            self.close()
            raise ValueError(
                f"no worker joined the Dask scheduler at {self.address} within {connect_s:g} s"
            ) from None
        self._capacity_at = 0.0
        self._capacity = 0
        if self._slots() < 1:
            self.close()
            raise ValueError(
                f"no worker of the Dask cluster at {self.address} declares the resource "
                f"{self.resource}; start workers with `dask worker {self.address} --nthreads 1 "
                f"--resources {self.resource}=1`"
            )
        self.scheduler_retries = int(self.client.run_on_scheduler(_allowed_failures))
        self.retries = max(0, retries - self.scheduler_retries)
        self.workers = self._capacity
        self.client.register_plugin(_worker_setup(threads, setup), name="selfref-worker-setup")
        self._futures: dict[str, Any] = {}  # executor key -> Dask future of the current attempt
        self._handles: dict[int, tuple[Any, Any]] = {}  # id(obj) -> (obj, newest scattered future)
        self._owner: dict[str, int] = {}  # key of every future scattered for an object -> id(obj)
        self._rescues: dict[str, int] = {}  # executor key -> uncharged restarts after a loss
        self._keys: dict[str, str] = {}  # Dask key -> executor key
        self._done = as_completed(with_results=True, raise_errors=False)
        self._started: set[str] = set()  # Dask keys that announced their start
        if timeout is not None:
            self.client.subscribe_topic(_START_TOPIC, self._on_start)

    def _on_start(self, event: Any) -> None:  # runs in the client's event-loop thread
        _, dkey = event
        self._started.add(str(dkey))

    # -- capacity and sharing --------------------------------------------------------------

    def _workers(self) -> dict[str, Any]:
        """Every worker's info (Dask >= 2025 reports only a few unless asked for all)."""
        try:
            info = self.client.scheduler_info(n_workers=-1)
        except TypeError:  # older Dask: every worker, always
            info = self.client.scheduler_info()
        return dict(info.get("workers", {}))

    def _slots(self) -> int:
        workers = self._workers().values()
        self._capacity = int(sum(w.get("resources", {}).get(self.resource, 0) for w in workers))
        self._capacity_at = time.monotonic()
        return self._capacity

    def capacity(self) -> int:
        if time.monotonic() - self._capacity_at > 1.0:  # workers join and leave
            self._slots()
        return max(1, self._capacity) + self.prefetch

    def share(self, obj: Any) -> Any:
        """Scatter ``obj`` to every worker once; the returned future stands for it."""
        if id(obj) in self._handles and self._handles[id(obj)][1].status == "finished":
            return self._handles[id(obj)][1]
        return self._scatter(obj)

    def _scatter(self, obj: Any) -> Any:
        """Broadcast ``obj`` to every worker now and keep its future as its handle."""
        [fut] = self.client.scatter([obj], broadcast=True, hash=False)  # a list scatters each
        self._handles[id(obj)] = (obj, fut)
        self._owner[fut.key] = id(obj)
        return fut

    def _shared(self, a: Any) -> tuple[Any, Any] | None:
        """(object, its newest future) when ``a`` is any future ever scattered for a shared
        object — an older one too, which a unit submitted before a loss still holds."""
        i = self._owner.get(str(getattr(a, "key", "")))
        return None if i is None else self._handles[i]

    def _fresh(self, a: Any) -> Any:
        """A shared object's newest future (scattered again when the client already shows
        it lost); any other argument as it is."""
        h = self._shared(a)
        if h is None:
            return a
        obj, fut = h
        return fut if fut.status == "finished" else self._scatter(obj)

    def _renew(self, a: Any) -> Any:
        """For a unit the scheduler dropped while it held ``a``: the shared object's future
        scattered again — unconditionally, since the client's status of the lost future may
        still say finished — unless a newer future than ``a`` exists already (another unit's
        loss renewed it); any other argument as it is."""
        h = self._shared(a)
        if h is None:
            return a
        obj, fut = h
        if fut is not a and fut.status == "finished":
            return fut
        return self._scatter(obj)

    # -- the backend hooks -----------------------------------------------------------------

    def _launch(self, key: str, job: _Job) -> None:
        job.args = tuple(self._fresh(a) for a in job.args)
        dkey = f"{key}#{job.attempts}"
        fn, args = job.fn, job.args
        if self.timeout is not None:
            fn, args = _announced, (dkey, job.fn, *job.args)
        fut = self.client.submit(
            fn, *args, key=dkey, pure=False, resources={self.resource: 1}, retries=0
        )
        self._futures[key] = fut
        self._keys[dkey] = key
        self._done.add(fut)

    def _poll(self, timeout: float | None) -> list[tuple[str, str, Any]]:
        from distributed import KilledWorker

        if not self._futures:
            return []
        if self.timeout is not None:  # look for start announcements at least twice a second
            timeout = 0.5 if timeout is None else min(timeout, 0.5)
            for k, f in self._futures.items():
                if f.key in self._started:
                    self._started.discard(f.key)
                    self._running(k)
        end = None if timeout is None else time.monotonic() + timeout
        ac = self._done
        with ac.thread_condition:  # as_completed fetches each result as its unit ends
            while not ac.has_ready():
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    break
                ac.thread_condition.wait(timeout=0.1 if left is None else min(left, 0.1))
        events: list[tuple[str, str, Any]] = []
        batch: list[tuple[Any, Any]] = ac.next_batch(block=False)
        for fut, result in batch:
            key = self._keys.pop(str(fut.key), "")
            status: str = fut.status
            if not key or self._futures.get(key) is not fut:
                continue  # cancelled after its timeout: already completed
            del self._futures[key]
            if status == "finished":
                events.append((key, "ok", result))
            elif status == "cancelled" or not isinstance(result, tuple):
                job = self._jobs[key]
                renewed = tuple(self._renew(a) for a in job.args)
                if self._rescues.get(key, 0) < RESCUES and any(
                    r is not a for r, a in zip(renewed, job.args)
                ):
                    # the scheduler dropped a unit nobody stopped: a shared object it needs
                    # was lost with a worker (the client may not show it yet); scatter it
                    # again and start the unit again, not charged as an attempt
                    self._rescues[key] = self._rescues.get(key, 0) + 1
                    job.args = renewed
                    job.attempts -= 1
                    self._start(key, job)
                else:
                    events.append((key, "lost", "cancelled by the scheduler"))
            else:
                _, exc, tb = result
                if isinstance(exc, KilledWorker):
                    self._capacity_at = 0.0  # look again: the cluster has a worker less
                    extra = f" (after {self.scheduler_retries} scheduler retries)"
                    why = "its worker died" + (extra if self.scheduler_retries else "")
                    events.append((key, "lost", why))
                else:
                    text = "".join(tb_module.format_tb(tb))
                    events.append((key, "error", (f"{type(exc).__name__}: {exc}", text)))
        return events

    def _stop(self, key: str) -> None:
        fut = self._futures.pop(key)
        self._keys.pop(fut.key, None)
        dkey = fut.key
        where = [w for w, keys in self.client.processing().items() if dkey in keys]
        fut.cancel()
        if not where:
            return
        info = self._workers()
        nannies = [w for w in where if info.get(w, {}).get("nanny")]
        if nannies:
            self.client.restart_workers(nannies, raise_for_error=False)
        if len(nannies) < len(where):
            warnings.warn(
                f"unit {key!r} ran past the timeout on a worker without a nanny; it is "
                "abandoned but keeps that worker busy until it ends",
                RuntimeWarning,
                stacklevel=2,
            )

    def close(self) -> None:
        """Close the client (and the local cluster, if this executor started one)."""
        if self._closed:
            return
        super().close()
        client = getattr(self, "client", None)
        if client is not None and self.timeout is not None:
            client.unsubscribe_topic(_START_TOPIC)
        if client is not None:
            client.close()
        if self._cluster is not None:
            self._cluster.close()
