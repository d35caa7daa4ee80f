"""The in-process executor: units run one at a time in the calling process (``workers=0``).

No isolation and no parallelism: for debugging, tests, and objects that cannot be pickled.
A unit runs inside :meth:`InProcessExecutor.wait`; an exception it raises becomes a
completion with status ``error``. A unit cannot be stopped from outside, so a timeout is
refused.
"""

from __future__ import annotations

import traceback
from collections import deque
from typing import Any

from selfref.execution.base import ExecutorBase, _Job, torch_threads

__all__ = ["InProcessExecutor"]


class InProcessExecutor(ExecutorBase):
    """Runs each unit in this process when :meth:`wait` is called.

    Args:
        threads: torch threads around each unit (the previous setting is restored);
            None leaves torch's setting alone.
    """

    name = "in-process"
    workers = 0

    def __init__(self, threads: int | None = 1) -> None:
        super().__init__(retries=0, timeout=None)
        self.threads = threads
        self._queue: deque[str] = deque()

    def capacity(self) -> int:
        return 1

    def _launch(self, key: str, job: _Job) -> None:
        self._queue.append(key)

    def _poll(self, timeout: float | None) -> list[tuple[str, str, Any]]:
        if not self._queue:
            return []
        key = self._queue.popleft()
        job = self._jobs[key]
        try:
            with torch_threads(self.threads):
                value = job.fn(*job.args)
        except Exception as e:  # completes as an error with its reason; the caller goes on
            return [(key, "error", (f"{type(e).__name__}: {e}", traceback.format_exc(limit=8)))]
        return [(key, "ok", value)]

    def _stop(self, key: str) -> None:  # no timeout, so never called
        raise RuntimeError("an in-process unit cannot be stopped")
