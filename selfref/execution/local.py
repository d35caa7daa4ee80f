"""The local executor: worker processes on this machine through ``concurrent.futures``.

Each worker slot is its own ``concurrent.futures.ProcessPoolExecutor`` with one process
(``multiprocessing`` "spawn" context by default: portable and safe with CUDA). One pool per
slot, not one pool of N processes, because of what a shared pool cannot do:

- attribute a crash: when any process of a pool dies, the pool breaks and *every* pending
  future fails with ``BrokenProcessPool``, so the unit that killed it cannot be told from
  the innocent ones. With one process per pool, the broken pool names its one unit, which
  is retried once (:class:`~selfref.execution.base.ExecutorBase`) on a fresh process;
- stop one running call: ``Future.cancel`` cannot stop a running call, and before Python
  3.14 a pool cannot kill its workers. Each slot learns its process id from a first call
  (which also marks the worker ready and times its start-up), so a unit past the timeout
  is stopped by killing exactly its process.

What the hand-written pool this replaces had and this has not: the exit code of a dead
worker (``concurrent.futures`` reaps it without telling), so a lost unit's reason names
the process id only.

A worker process holds the objects given to :meth:`LocalExecutor.share` before it started
(they travel once, with its first call, into ``_worker_objects``, the one piece of
per-process state, written only inside worker processes); a slot started before a
``share`` gets that object inline with each unit instead.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import pickle
import signal
import time
import traceback
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import torch

from selfref.execution.base import ExecutorBase, _Job, default_workers

__all__ = ["LocalExecutor"]

_CONTEXTS = ("spawn", "forkserver")

# Worker processes only: the shared objects this process received at start (token -> obj).
_worker_objects: dict[str, Any] = {}


@dataclass(frozen=True)
class _Shared:
    """Stands for a shared object in a unit's arguments (resolved in the worker)."""

    token: str


@dataclass(frozen=True)
class _Inline:
    """A shared object sent with the unit (its worker started before it was shared)."""

    blob: bytes


def _init_worker(threads: int | None, setup: Callable[[], None] | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    if setup is not None:
        setup()


def _hello(blobs: dict[str, bytes]) -> tuple[int, float]:
    """The first call of a worker: take the shared objects; say who and when."""
    for token, blob in blobs.items():
        _worker_objects[token] = pickle.loads(blob)
    return os.getpid(), time.time()


def _resolve(a: Any) -> Any:
    if isinstance(a, _Shared):
        return _worker_objects[a.token]
    if isinstance(a, _Inline):
        return pickle.loads(a.blob)
    return a


@dataclass(frozen=True)
class _ByValue:
    """A unit's result as plain-pickle bytes: tensors travel by value, not as shared memory."""

    blob: bytes


def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> _ByValue:
    """Run a unit in the worker; its result goes back pickled by value. The pool's own
    pickler (``multiprocessing``'s, which ``import torch`` extends) would move every tensor
    of the result into a shared-memory file whose descriptor the driver holds for as long
    as the tensor lives: a study that keeps many results' weights (hyperband's and ASHA's
    states waiting for promotion) ran the driver out of file descriptors (a 10-seed
    ``selfref compare``: ``OSError: [Errno 24] Too many open files``)."""
    result = fn(*(_resolve(a) for a in args))
    return _ByValue(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))


@dataclass
class _Slot:
    pool: cf.ProcessPoolExecutor
    ready: cf.Future  # _hello(): (pid, time.time() when ready)
    tokens: frozenset[str]  # shared objects its process received at start
    started_at: float  # time.time() when the pool was made
    pid: int | None = None
    key: str | None = None  # unit in flight
    future: cf.Future | None = None
    dead: bool = False  # its process was killed (timeout): replace before reuse


class LocalExecutor(ExecutorBase):
    """Units in ``workers`` local worker processes (see the module docstring).

    Args:
        workers: worker processes (default: the number of CPU cores).
        threads: torch threads in each worker (one avoids oversubscribing the cores).
        setup: a picklable function run once in each worker after it starts (e.g. one
            training step, so the first unit's time is not inflated by one-off costs).
        context: ``"spawn"`` or ``"forkserver"``.
        retries, timeout: see :class:`~selfref.execution.base.ExecutorBase`.

    Raises:
        ValueError: ``workers`` < 1 or an unknown context.
        RuntimeError: (from ``wait``) a worker process died before it was ready, e.g. a
            script that starts workers without an ``if __name__ == "__main__":`` guard.
    """

    name = "local"

    def __init__(
        self,
        workers: int | None = None,
        threads: int | None = 1,
        setup: Callable[[], None] | None = None,
        context: str = "spawn",
        retries: int = 1,
        timeout: float | None = None,
    ) -> None:
        super().__init__(retries=retries, timeout=timeout)
        n = default_workers() if workers is None else int(workers)
        if n < 1:
            raise ValueError(f"workers must be >= 1 for worker processes, got {workers}")
        if context not in _CONTEXTS:
            raise ValueError(
                f"unknown multiprocessing context {context!r}; valid: {', '.join(_CONTEXTS)}"
            )
        self.workers = n
        self.threads = threads
        self.setup = setup
        self._ctx = mp.get_context(context)
        self._blobs: dict[str, bytes] = {}
        self._handles: dict[int, tuple[Any, _Shared]] = {}  # id(obj) -> (obj, its handle)
        self._slots: list[_Slot] = []
        self.started_workers = 0  # processes started so far (replacements included)
        self.startup_s: list[float] = []  # per started worker: seconds until it was ready

    def capacity(self) -> int:
        return self.workers

    def share(self, obj: Any) -> Any:
        """Pickle ``obj`` once; workers started from now on receive it at start.

        Raises:
            Whatever pickling ``obj`` raises (e.g. a task holding a lambda).
        """
        if id(obj) in self._handles:
            return self._handles[id(obj)][1]
        token = f"s{len(self._blobs)}"
        self._blobs[token] = pickle.dumps(obj)
        handle = _Shared(token)
        self._handles[id(obj)] = (obj, handle)
        return handle

    # -- slots -----------------------------------------------------------------------------

    def _new_slot(self) -> _Slot:
        t0 = time.time()  # before submit: a spawn blocks there while the child imports
        pool = cf.ProcessPoolExecutor(
            max_workers=1,
            mp_context=self._ctx,  # type: ignore[arg-type]
            initializer=_init_worker,
            initargs=(self.threads, self.setup),
        )
        # the shared objects go as the first call, through the pool's queue (its feeder
        # thread writes them), not as initializer arguments: those are written during
        # the spawn itself, which then blocks until the child has imported everything
        slot = _Slot(pool, pool.submit(_hello, dict(self._blobs)), frozenset(self._blobs), t0)
        self.started_workers += 1
        return slot

    def _retire(self, slot: _Slot) -> None:
        if slot.pid is not None and (slot.key is not None or slot.dead):
            try:
                os.kill(slot.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        slot.pool.shutdown(wait=False, cancel_futures=True)
        self._slots.remove(slot)

    def _launch(self, key: str, job: _Job) -> None:
        for dead in [s for s in self._slots if s.dead]:
            self._retire(dead)
        free = next((s for s in self._slots if s.key is None), None)
        if free is None:
            free = self._new_slot()
            self._slots.append(free)
        slot = free
        args = tuple(
            _Inline(self._blobs[a.token])
            if isinstance(a, _Shared) and a.token not in slot.tokens
            else a
            for a in job.args
        )
        try:
            slot.future = slot.pool.submit(_call, job.fn, args)
        except BrokenProcessPool:  # its process died while idle: a fresh one takes the unit
            self._retire(slot)
            slot = self._new_slot()
            self._slots.append(slot)
            slot.future = slot.pool.submit(_call, job.fn, args)
        slot.key = key
        if slot.pid is not None:
            self._running(key)

    def _poll(self, timeout: float | None) -> list[tuple[str, str, Any]]:
        waiting = {s.ready: s for s in self._slots if s.pid is None and not s.dead}
        busy = {s.future: s for s in self._slots if s.key is not None and s.future is not None}
        if not waiting and not busy:
            return []
        done, _ = cf.wait([*waiting, *busy], timeout=timeout, return_when=cf.FIRST_COMPLETED)
        events: list[tuple[str, str, Any]] = []
        for fut in done:
            if fut in waiting:
                slot = waiting[fut]
                if fut.exception() is not None:
                    if slot.key is None:
                        self._retire(slot)
                        raise RuntimeError(
                            "a worker process exited before it was ready "
                            f"({type(fut.exception()).__name__}); a script that uses worker "
                            'processes needs an `if __name__ == "__main__":` guard (or use '
                            "workers=0)"
                        )
                    continue  # its unit's future fails too and reports it below
                slot.pid, t_ready = fut.result()
                self.startup_s.append(t_ready - slot.started_at)
                if slot.key is not None:
                    self._running(slot.key)
        for fut in done:
            if fut not in busy:
                continue
            slot = busy[fut]
            key = slot.key
            assert key is not None
            slot.key, slot.future = None, None
            exc = fut.exception()
            if exc is None:
                events.append((key, "ok", pickle.loads(fut.result().blob)))
            elif isinstance(exc, BrokenProcessPool):
                who = f"pid {slot.pid}" if slot.pid is not None else "not yet started"
                self._retire(slot)
                events.append((key, "lost", f"worker process ({who}) died"))
            else:
                tb = str(exc.__cause__) if exc.__cause__ is not None else None
                if tb is None:
                    tb = "".join(traceback.format_exception(exc, limit=8))
                events.append((key, "error", (f"{type(exc).__name__}: {exc}", tb)))
        return events

    def _stop(self, key: str) -> None:
        slot = next(s for s in self._slots if s.key == key)
        if slot.pid is not None:
            try:
                os.kill(slot.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        slot.key, slot.future, slot.dead = None, None, True

    def close(self) -> None:
        """Stop the workers: idle ones exit; those with a unit in flight are killed."""
        if self._closed:
            return
        super().close()
        for slot in list(self._slots):
            busy = slot.key is not None or slot.dead
            if busy and slot.pid is not None:
                try:
                    os.kill(slot.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            slot.pool.shutdown(wait=True, cancel_futures=True)
        self._slots = []
