"""The execution interface: one contract test run on every executor, then each one's faults.

Unit functions live at module level so worker processes (local and Dask) can import them.
"""

from __future__ import annotations

import os
import time

import pytest

from selfref.execution import (
    Completion,
    Executor,
    InProcessExecutor,
    LocalExecutor,
    drive,
    make_executor,
)
from selfref.execution.driver import Unit


def add(a: int, b: int) -> int:
    return a + b


def total(data: list[int], k: int) -> int:
    return sum(data) * k


def boom(x: int) -> int:
    raise FloatingPointError(f"boom {x}")


def die(code: int) -> int:
    os._exit(code)


def die_once(marker: str) -> int:
    """Kill the worker the first time (the marker file does not exist yet), then succeed."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(9)
    return os.getpid()


def sleep_then(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


def tensors(n: int, seed: int) -> dict[str, object]:
    """A result holding ``n`` small tensors (as a hyperband rung's weights and Adam state)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"state": [torch.randn(3, generator=g) for _ in range(n)], "seed": seed}


def check_executor(ex: Executor) -> None:
    """The contract every executor keeps (values, errors, shared objects, capacity)."""
    assert ex.capacity() >= 1 and ex.in_flight == 0
    obj = list(range(10))
    data = ex.share(obj)
    assert ex.share(obj) is data  # shared once
    results: dict[str, Completion] = {}
    pending = [("a", add, (2, 3)), ("b", total, (data, 2)), ("c", boom, (7,))]
    while pending or ex.in_flight:
        while pending and ex.in_flight < ex.capacity():
            key, fn, args = pending.pop(0)
            ex.submit(key, fn, *args)
        for c in ex.wait():
            results[c.key] = c
    assert results["a"].status == "ok" and results["a"].value == 5
    assert results["b"].status == "ok" and results["b"].value == 90
    c = results["c"]
    assert c.status == "error" and c.value is None and c.attempts == 1
    assert c.reason == "FloatingPointError: boom 7"
    assert c.traceback is not None and "boom" in c.traceback
    with pytest.raises(ValueError, match="already in flight"):
        ex.submit("x", sleep_then, 0.2, 1)
        ex.submit("x", add, 1, 1)
    [done] = ex.wait()
    assert done.key == "x" and done.value == 1
    assert ex.wait(timeout=0.01) == []  # nothing in flight: returns at once


def test_in_process_executor_keeps_the_contract() -> None:
    ex = InProcessExecutor()
    check_executor(ex)
    ex.close()
    with pytest.raises(RuntimeError, match="closed"):
        ex.submit("y", add, 1, 2)
    with pytest.raises(ValueError, match="cannot be stopped"):
        make_executor(workers=0, timeout=1.0)


@pytest.mark.slow
def test_local_executor_keeps_the_contract_retries_lost_units_and_times_out(tmp_path) -> None:
    with LocalExecutor(workers=2, retries=1, timeout=3.0) as ex:
        check_executor(ex)
        assert ex.started_workers == 2 and len(ex.startup_s) == 2
        # a unit whose worker dies on every attempt: retried once, then lost
        ex.submit("dead", die, 7)
        ex.submit("flaky", die_once, str(tmp_path / "marker"))
        got = {c.key: c for c in ex.wait() + ex.wait()}
        while ex.in_flight:
            got.update({c.key: c for c in ex.wait()})
        dead, flaky = got["dead"], got["flaky"]
        assert dead.status == "lost" and dead.attempts == 2 and len(dead.lost) == 2
        assert "retried 1 time, then marked failed" in str(dead.reason)
        assert flaky.status == "ok" and flaky.attempts == 2 and len(flaky.lost) == 1
        # a unit past the timeout is stopped: its process is killed, a fresh one takes over
        t0 = time.monotonic()
        ex.submit("slow", sleep_then, 60.0, 1)
        [slow] = ex.wait()
        assert slow.status == "timeout" and "timeout of 3 s" in str(slow.reason)
        assert time.monotonic() - t0 < 30
        ex.submit("after", add, 1, 1)
        [after] = ex.wait()
        assert after.status == "ok" and after.value == 2


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_local_executor_results_hold_no_file_descriptors_in_the_driver() -> None:
    """Tensors in a unit's result arrive by value: keeping 400 of them (as a study keeps the
    states of rungs waiting for promotion) holds no shared-memory file per tensor in the
    driver, which ran a 10-seed ``selfref compare`` out of descriptors."""
    import torch

    with LocalExecutor(workers=1) as ex:
        ex.submit("warm", add, 1, 1)
        ex.wait()
        before = len(os.listdir("/proc/self/fd"))
        kept = []
        for i in range(4):
            ex.submit(f"t{i}", tensors, 100, i)
            kept += [c.value for c in ex.wait()]
        after = len(os.listdir("/proc/self/fd"))
    assert after - before < 20  # one descriptor per tensor would be 400
    assert [v["seed"] for v in kept] == [0, 1, 2, 3]
    g = torch.Generator().manual_seed(3)
    assert torch.equal(kept[3]["state"][0], torch.randn(3, generator=g))


class _Countdown:
    """A job of ``n`` units of ``add``; records what came back."""

    def __init__(self, name: str, n: int) -> None:
        self.name, self.left, self.out = name, n, []
        self.flying = 0

    @property
    def done(self) -> bool:
        return self.left == 0 and self.flying == 0

    def units(self, free: int) -> list[Unit]:
        k = min(free, self.left)
        self.left -= k
        self.flying += k
        return [(f"{self.name}/{self.left + i}", add, (self.left + i, 0)) for i in range(k)]

    def finish(self, c: Completion) -> None:
        self.flying -= 1
        self.out.append(c.value)


def test_drive_runs_jobs_in_order_on_one_executor() -> None:
    a, b = _Countdown("a", 3), _Countdown("b", 2)
    order: list[str] = []
    drive(InProcessExecutor(), [a, b], on_done=lambda j: order.append(j.name))
    assert sorted(a.out) == [0, 1, 2] and sorted(b.out) == [0, 1]
    assert order == ["a", "b"]  # in-process: one slot, the earlier job first


@pytest.mark.slow
def test_dask_local_cluster_keeps_the_contract_retries_and_times_out(tmp_path) -> None:
    pytest.importorskip("distributed", reason="the cluster extra is not installed")
    from selfref.execution.cluster import DaskExecutor

    with DaskExecutor("local:2", timeout=5.0) as ex:
        assert ex.workers == 2 and ex.scheduler_retries == 0 and ex.retries == 1
        check_executor(ex)
        # (a unit lost on every attempt is the same code for every backend: the local test)
        ex.submit("flaky", die_once, str(tmp_path / "marker"))
        [flaky] = ex.wait()
        assert flaky.status == "ok" and flaky.attempts == 2 and len(flaky.lost) == 1
        ex.submit("slow", sleep_then, 60.0, 1)
        [slow] = ex.wait()
        assert slow.status == "timeout"
        ex.submit("after", add, 2, 2)
        [after] = ex.wait()
        assert after.status == "ok" and after.value == 4


def test_cluster_spec_is_checked() -> None:
    from selfref.execution.cluster import parse_cluster

    assert parse_cluster("local:3") == ("local", 3)
    assert parse_cluster("tcp://127.0.0.1:8786") == ("tcp://127.0.0.1:8786", None)
    for bad in ("local:0", "local:x", "local", ""):
        with pytest.raises(ValueError):
            parse_cluster(bad)
