"""`selfref compare --cluster` on a real multi-process Dask cluster bound to 127.0.0.1.

A scheduler (``dask scheduler --host 127.0.0.1``) and two single-thread workers (``dask
worker --host 127.0.0.1 --no-nanny --resources CPU=1``) are started as processes for each
test and stopped by pid afterwards, also when a test fails. Faults are real: a worker or the
driver is SIGKILLed mid-study.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]),
        "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0",  # the driver does the retry
        "OMP_NUM_THREADS": "1",
    }


@dataclass
class Processes:
    """A scheduler and its workers, started here (each stopped by its pid)."""

    address: str = ""
    scheduler: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)

    def all(self) -> list[subprocess.Popen]:
        return ([self.scheduler] if self.scheduler is not None else []) + self.workers

    def stop(self) -> None:
        """Workers first, then the scheduler: SIGTERM, and SIGKILL after 5 s."""
        for group in (self.workers, [self.scheduler] if self.scheduler else []):
            for p in group:
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGTERM)
            for p in group:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait(timeout=15)


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )


def _wait_workers(address: str, n: int) -> list[str]:
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(n, timeout=120)
        return sorted(client.scheduler_info(n_workers=-1)["workers"])


@pytest.fixture
def dask_processes(tmp_path: Path) -> Iterator[Processes]:
    pytest.importorskip("distributed", reason="the cluster extra is not installed")
    procs = Processes()
    sched_file = tmp_path / "scheduler.json"
    py = [sys.executable, "-m", "dask"]
    try:
        procs.scheduler = _start(
            [*py, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(sched_file)],
            tmp_path / "scheduler.log",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            assert procs.scheduler.poll() is None, (tmp_path / "scheduler.log").read_text()
            time.sleep(0.1)
        time.sleep(0.2)  # the file is written whole, but give it a moment
        procs.address = json.loads(sched_file.read_text())["address"]
        assert procs.address.startswith("tcp://127.0.0.1:")
        for i in range(2):
            procs.workers.append(
                _start(
                    [*py, "worker", "--scheduler-file", str(sched_file), "--host", "127.0.0.1",
                     "--nthreads", "1", "--no-nanny", "--resources", "CPU=1", "--no-dashboard",
                     "--name", f"w{i}"],
                    tmp_path / f"worker{i}.log",
                )
            )  # fmt: skip
        addresses = _wait_workers(procs.address, 2)
        assert all(a.startswith("tcp://127.0.0.1:") for a in addresses), addresses
        yield procs
    finally:
        procs.stop()


def _compare(args: list[str], logdir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "selfref.cli", "compare", *args, "--logdir", str(logdir)]
    return subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _run_dir(proc: subprocess.Popen) -> Path:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("run directory: "):
            return Path(line.split(": ", 1)[1].strip())
    raise AssertionError("compare did not print its run directory")


def _wait_trials(path: Path, n: int, proc: subprocess.Popen, limit_s: float = 180) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, "compare ended before the fault was injected"
        time.sleep(0.02)
    raise AssertionError(f"fewer than {n} trials after {limit_s} s")


def _by_study(trials: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for line in trials.read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["study"], []).append(rec["index"])
    return out


@pytest.mark.slow
def test_compare_across_real_workers_survives_a_sigkilled_worker(
    dask_processes: Processes, tmp_path: Path, run_cli
) -> None:
    """Two search methods and a single-run one over two worker processes; one worker is
    SIGKILLed mid-study. Everything finishes, every trial is recorded exactly once, and the
    numbers are those of the same comparison run in this process."""
    common = ["--methods", "random,grid,selfref", "--seeds", "0,1", "--budget", "1200",
              "--steps-per-trial", "100"]  # fmt: skip
    proc = _compare([*common, "--cluster", dask_processes.address], tmp_path / "logs")
    try:
        run = _run_dir(proc)
        _wait_trials(run / "trials.jsonl", 6, proc)
        victim = dask_processes.workers[0]
        os.kill(victim.pid, signal.SIGKILL)  # a whole worker node, mid-study
        at_kill = (run / "trials.jsonl").read_text().count("\n")
        victim.wait(timeout=30)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 0, out
    assert at_kill < 4 * 12, "the worker was killed after the studies had ended"
    studies = _by_study(run / "trials.jsonl")
    assert sorted(studies) == ["grid-s0", "grid-s1", "random-s0", "random-s1"]
    for name, indices in studies.items():
        assert sorted(indices) == list(range(12)), (name, indices)  # all, each exactly once
    results = {(d["method"], d["seed"]): d for d in json.loads((run / "results.json").read_text())}
    assert len(results) == 6 and all(d["status"] == "ok" for d in results.values())
    assert all(d["grad_evals"] == 1200 for (m, _), d in results.items() if m != "selfref")
    # the same comparison in this process gives the same numbers (a killed worker changes
    # where units run, never what they compute)
    r = run_cli("compare", *common, "--workers", "0", "--logdir", tmp_path / "ref")
    assert r.code == 0, r.err
    [ref_run] = list((tmp_path / "ref" / "compare").iterdir())
    for d in json.loads((ref_run / "results.json").read_text()):
        got = results[(d["method"], d["seed"])]
        assert got["val_loss"] == d["val_loss"] and got["test_loss"] == d["test_loss"], d["method"]
        assert got["best_hparams"] == d["best_hparams"]


@pytest.mark.slow
def test_killed_driver_resumes_on_the_cluster_with_nothing_lost_or_repeated(
    dask_processes: Processes, tmp_path: Path, run_cli
) -> None:
    """The driver is SIGKILLed with trials in flight on the cluster; --resume (with
    --prefetch) finishes the study: finished trials kept byte for byte, none run twice, none
    missing."""
    args = ["--methods", "random", "--seeds", "0", "--budget", "4000", "--steps-per-trial",
            "200", "--cluster", dask_processes.address]  # fmt: skip
    proc = _compare(args, tmp_path / "logs")
    try:
        run = _run_dir(proc)
        trials = run / "trials.jsonl"
        _wait_trials(trials, 4, proc)
        os.kill(proc.pid, signal.SIGKILL)  # two trials are in flight on the workers
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    before = [ln for ln in trials.read_text().splitlines(keepends=True) if ln.endswith("\n")]
    assert 4 <= len(before) < 20
    # resumed with units queued on the workers beyond their slots (--prefetch)
    r = run_cli("compare", "--resume", run, "--cluster", dask_processes.address, "--prefetch", 2)
    assert r.code == 0, r.err
    after = trials.read_text().splitlines(keepends=True)
    assert after[: len(before)] == before  # nothing finished is lost or rewritten
    indices = [json.loads(ln)["index"] for ln in after]
    assert sorted(indices) == list(range(20))  # nothing repeated, nothing missing
    [res] = json.loads((run / "results.json").read_text())
    assert res["status"] == "ok" and res["extra"]["trials_resumed"] == len(before)
    assert res["grad_evals"] == 4000


def report_pid_then_sleep(path: str, seconds: float) -> int:
    """A unit that says which process runs it, then takes a while. The pid file appears
    whole (written aside, then renamed), so a reader never sees it empty."""
    Path(path + ".part").write_text(str(os.getpid()))
    os.replace(path + ".part", path)
    time.sleep(seconds)
    return os.getpid()


@pytest.mark.slow
def test_a_unit_whose_worker_is_killed_is_retried_once_on_the_other(
    dask_processes: Processes, tmp_path: Path
) -> None:
    from selfref.execution.cluster import DaskExecutor

    marker = tmp_path / "pid"
    with DaskExecutor(dask_processes.address) as ex:
        assert ex.workers == 2 and ex.scheduler_retries == 0 and ex.retries == 1
        ex.submit("u", report_pid_then_sleep, str(marker), 3.0)
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        first = int(marker.read_text())
        marker.unlink()
        assert first in {p.pid for p in dask_processes.workers}
        os.kill(first, signal.SIGKILL)
        [c] = ex.wait()
    assert c.status == "ok" and c.attempts == 2 and c.lost == ("its worker died",)
    assert c.value != first and c.value in {p.pid for p in dask_processes.workers}


def test_units_holding_an_older_shared_future_get_the_newest_after_a_loss() -> None:
    """The executor's sharing bookkeeping (no cluster: a stand-in client that scatters
    numbered futures). A unit retried after its worker died re-scatters the lost object; a
    second unit that still holds the first future must then get the newest one, not the lost
    one — the cascade behind the flake of the SIGKILL test above, where every later unit of a
    study was cancelled twice and replaced."""
    from selfref.execution.cluster import DaskExecutor

    class Future:
        def __init__(self, key: str) -> None:
            self.key, self.status = key, "finished"

    class Client:
        scattered: list[Future] = []

        def scatter(self, objs: list, broadcast: bool, hash: bool) -> list[Future]:
            assert broadcast and not hash
            self.scattered.append(Future(f"data-{len(self.scattered)}"))
            return [self.scattered[-1]]

    ex = object.__new__(DaskExecutor)  # only the bookkeeping: no scheduler, no workers
    ex.client, ex._handles, ex._owner = Client(), {}, {}
    data = {"x": 1}
    h1 = ex.share(data)
    assert ex.share(data) is h1 and ex._fresh(h1) is h1 and ex._renew("other") == "other"
    h1.status = "lost"  # the worker holding it died; unit A is retried and launched again
    h2 = ex._fresh(h1)
    assert h2 is not h1 and h2.status == "finished"
    # unit B, submitted with h1 before the loss, is cancelled: it must get h2, not h1 again
    assert ex._renew(h1) is h2 and ex._fresh(h1) is h2
    # h2 lost as well, while the client still says finished: B's next rescue scatters again
    h3 = ex._renew(h2)
    assert h3 not in (h1, h2) and ex.share(data) is h3 and ex._fresh(h1) is h3
    assert len(Client.scattered) == 3


# -- bad input: one line, exit 2, nothing started --------------------------------------------


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--cluster", "local:0"], "local:N with N >= 1"),
        (["--cluster", "local:2", "--workers", "2"], "--workers counts local processes"),
        (["--trial-timeout", "5", "--workers", "0"], "trial timeout needs worker processes"),
    ],
)
def test_bad_cluster_options_are_one_line_and_exit_2(tmp_path: Path, run_cli, args, match):
    pytest.importorskip("distributed", reason="the cluster extra is not installed")
    logdir = tmp_path / "logs"
    r = run_cli("compare", "--methods", "random", *args, "--logdir", logdir)
    assert r.code == 2 and len(r.err_lines) == 1, r.err
    assert match in r.err_lines[0]
    assert not logdir.exists()


def test_cluster_without_the_extra_says_how_to_install_it(
    tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    r = run_cli("compare", "--cluster", "local:2", "--logdir", tmp_path / "logs")
    assert r.code == 2 and len(r.err_lines) == 1
    assert "pip install 'selfref[cluster]'" in r.err_lines[0]
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_trial_timeout_stops_a_trial_and_records_it_failed(tmp_path: Path, run_cli) -> None:
    r = run_cli(
        "compare", "--methods", "random", "--seeds", "0", "--budget", "3000",
        "--steps-per-trial", "3000", "--workers", "1", "--trial-timeout", "0.2",
        "--logdir", tmp_path / "logs",
    )  # fmt: skip
    assert r.code == 0, r.err
    [run] = list((tmp_path / "logs" / "compare").iterdir())
    recs = [json.loads(ln) for ln in (run / "trials.jsonl").read_text().splitlines()]
    assert len(recs) == 2  # the guard against trials that spend nothing: 2 x max_trials
    for rec in recs:
        assert rec["status"] == "failed" and rec["grad_evals"] == 0
        assert rec["reason"] == "ran longer than the timeout of 0.2 s"
    [res] = json.loads((run / "results.json").read_text())
    assert res["status"] == "failed" and "timeout" in res["reason"]
