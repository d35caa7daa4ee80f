"""Data-parallel meta-training: shards and streams, the ranks' collectives, real torchrun runs.

Fast tests run two ranks as threads over an in-memory :class:`_ThreadComm` (every collective
checks that both ranks reached the same one), and a one-rank gloo group in-process. The slow
ones start real ``torchrun`` processes (gloo, CPU, bound to 127.0.0.1): 2 ranks against
1 rank at the same global meta-batch (float64), rank 0 alone writing, and a SIGKILL of one
rank followed by a resume that ends with the uninterrupted run's meta-parameters.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from selfref.checkpoints import load
from selfref.logging import MemoryLogger
from selfref.meta import MetaTrainConfig, MetaTrainer
from selfref.meta.distributed import (
    RankFailure,
    TorchDistributedComm,
    sigterm_raises,
    torchrun_command,
    torchrun_env,
)
from selfref.meta.shards import ShardedEstimator
from selfref.meta.trainer import seed_of
from selfref.net import SelfReferentialNet
from selfref.runs import RunDir
from selfref.tasks import make

REPO = Path(__file__).resolve().parents[1]


def _net() -> SelfReferentialNet:
    return SelfReferentialNet.from_task(make("quadratic", dtype=torch.float64), hidden=6)


def _cfg(**kw: Any) -> MetaTrainConfig:
    base: dict[str, Any] = dict(
        meta_steps=6,
        unroll=3,
        inner_steps=6,
        meta_batch=8,
        eval_tasks=4,
        eval_every=2,
        checkpoint_every=2,
        meta_lr=1e-2,
    )
    base.update(kw)
    return MetaTrainConfig(**base)


# -- two ranks as threads --------------------------------------------------------------------


class _Hub:
    """What the ranks of a :class:`_ThreadComm` share: a barrier, one slot per rank, a log."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.barrier = threading.Barrier(n, timeout=120)
        self.slots: list[Any] = [None] * n
        self.ops: list[list[str]] = [[] for _ in range(n)]

    def exchange(self, rank: int, op: str, obj: Any) -> list[Any]:
        self.ops[rank].append(op)
        self.slots[rank] = (op, obj)
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()
        reached = sorted({o for o, _ in got})
        if len(reached) != 1:
            self.barrier.abort()
            raise AssertionError(f"ranks reached different collectives: {reached}")
        return [v for _, v in got]


class _ThreadComm:
    """An in-memory Comm of ranks that are threads (float64 mean, as TorchDistributedComm)."""

    def __init__(self, hub: _Hub, rank: int) -> None:
        self.hub, self.rank, self.world_size = hub, rank, hub.n

    def mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        every = self.hub.exchange(self.rank, "mean", [t.detach().clone() for t in tensors])
        out = []
        for i, t in enumerate(tensors):
            total = sum(ts[i].double() for ts in every)
            out.append((total / self.world_size).to(t.dtype))
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        every = self.hub.exchange(self.rank, "gather", obj)
        return every if self.rank == 0 else None

    def broadcast(self, obj: Any) -> Any:
        return self.hub.exchange(self.rank, "broadcast", obj)[0]


def _run_threads(cfg: MetaTrainConfig, run_dirs: list[RunDir | None], n: int = 2):
    hub = _Hub(n)
    results: list[Any] = [None] * n
    loggers = [MemoryLogger() for _ in range(n)]
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            comm = _ThreadComm(hub, r)
            tr = MetaTrainer(_net(), cfg, loggers[r], run_dir=run_dirs[r], comm=comm)
            results[r] = tr.train()
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)
            hub.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results, hub, loggers


def test_two_thread_ranks_equal_one_rank_with_two_shards(tmp_path):
    """2 ranks (1 shard each) take the same steps as 1 rank running both shards; rank 0 alone
    writes; every collective is reached by both ranks in the same order."""
    runs = [RunDir.create(tmp_path / f"r{r}", "meta", "t", 0, argv=["x"]) for r in range(2)]
    (res0, res1), hub, (log0, log1) = _run_threads(_cfg(), runs)
    log = MemoryLogger()
    single = MetaTrainer(_net(), _cfg(shards=2), log).train()
    for k, v in single.meta_params.items():
        assert torch.equal(res0.meta_params[k], res1.meta_params[k]), k
        torch.testing.assert_close(res0.meta_params[k], v, rtol=0, atol=1e-10)
    assert res0.history == single.history and res0.best_step == single.best_step
    assert res0.meta_train_grad_evals == single.meta_train_grad_evals
    for tag in ("meta/loss", "inner/final_loss", "modify/update_norm"):  # means over ranks
        assert log0.values(tag) == pytest.approx(log.values(tag), rel=1e-12), tag
    assert not log1.scalars and not log1.texts  # rank 1 logs nothing
    assert hub.ops[0] == hub.ops[1] and hub.ops[0].count("gather") >= 3  # last.pt, best.pt
    assert sorted(p.name for p in runs[0].checkpoints.iterdir()) == ["best.pt", "last.pt"]
    assert not runs[1].checkpoints.exists()  # rank 1 was handed a run dir and wrote nothing
    ck = load(runs[0].checkpoints / "last.pt")
    assert ck["world_size"] == 2 and len(ck["estimators"]) == 2
    # the two ranks ran different instances (their own streams), not one stream twice
    seeds = [e["inner"]["seeds"] for e in ck["estimators"]]
    assert len(seeds[0]) == 4 and seeds[0] != seeds[1]
    unsharded = MetaTrainer(_net(), _cfg(), MemoryLogger()).train()  # one stream of 8
    assert not torch.equal(unsharded.meta_params["core.out.w"], single.meta_params["core.out.w"])


def test_thread_ranks_stop_together_under_max_seconds_with_cosine_by_time(tmp_path):
    """The time limit and the cosine-by-time meta-lr read rank 0's clock: both ranks stop at
    the same step with the same φ (each rank's own clock let them drift apart)."""
    cfg = _cfg(
        meta_steps=100_000, max_seconds=1.0, lr_schedule="cosine", eval_every=3, meta_lr=5e-2
    )
    runs = [RunDir.create(tmp_path, "meta", "t", 0, argv=["x"]), None]
    (res0, res1), hub, _ = _run_threads(cfg, runs)
    assert 0 < res0.steps_done == res1.steps_done < cfg.meta_steps
    for k in res0.meta_params:
        assert torch.equal(res0.meta_params[k], res1.meta_params[k]), k
    assert hub.ops[0] == hub.ops[1]
    assert load(runs[0].checkpoints / "last.pt")["step"] == res0.steps_done


def test_sharded_estimator_runs_each_shard_on_its_own_stream():
    cfg = _cfg(shards=4)
    est = cfg.make_estimator(world_size=2, rank=1)
    assert isinstance(est, ShardedEstimator) and est.shards == [2, 3]
    assert est.base.meta_batch == 2  # type: ignore[attr-defined]
    assert not isinstance(_cfg().make_estimator(2, 1), ShardedEstimator)
    tr = MetaTrainer(_net(), cfg)
    state = est.init(tr.problem, tr.meta_params, torch.Generator(), 0)
    out = est.estimate(tr.problem, tr.meta_params, state, torch.Generator(), 6, 5)
    for j, sub in zip([2, 3], out.state["shards"]):
        g = torch.Generator().manual_seed(seed_of(cfg.seed, j, 5))
        assert sub["inner"]["seeds"] == torch.randint(0, 2**30, (2,), generator=g).tolist()
    with pytest.raises(ValueError, match="multiple of the world size"):
        _cfg(shards=2).make_estimator(world_size=4)
    with pytest.raises(ValueError, match="does not split evenly into 3 shards"):
        _cfg(shards=3)


# -- torchrun's environment, the command, a one-rank gloo group --------------------------------


def test_torchrun_env_and_command():
    assert torchrun_env({}) is None
    assert torchrun_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}) is None
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "a",
        "MASTER_PORT": "1",
    }
    assert torchrun_env(env) == {"rank": 1, "world_size": 2, "local_rank": 1}
    with pytest.raises(ValueError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT not"):
        torchrun_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="not in"):
        torchrun_env({**env, "RANK": "2"})
    cmd = torchrun_command(3, ["meta-train", "--seed", "1"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and cmd[cmd.index("--local-addr") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--nproc-per-node") + 1] == "3"
    assert cmd[-5:] == ["-m", "selfref", "meta-train", "--seed", "1"]


def test_nproc_is_stripped_from_the_forwarded_arguments():
    from selfref.commands.meta_train import _strip_nproc

    argv = ["meta-train", "--nproc", "2", "--seed", "3", "--nproc=4", "--npro", "2", "-o", "a=1"]
    assert _strip_nproc(argv) == ["meta-train", "--seed", "3", "-o", "a=1"]


def test_cli_bad_distributed_input_is_one_line_and_exit_2(run_cli, tmp_logdir, monkeypatch):
    r = run_cli("meta-train", "--shards", 3, "--meta-batch", 8, "--logdir", tmp_logdir)
    assert r.code == 2 and "does not split evenly into 3 shards" in r.err
    assert len(r.err_lines) == 1
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for k, v in {**env, "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    r = run_cli("meta-train", "--nproc", 2, "--logdir", tmp_logdir)
    assert r.code == 2 and "under torchrun leave it out" in r.err
    monkeypatch.delenv("MASTER_PORT")
    r = run_cli("meta-train", "--logdir", tmp_logdir)
    assert r.code == 2 and "MASTER_PORT not" in r.err
    assert not tmp_logdir.exists()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_gloo_comm_of_one_rank_keeps_shapes_dtypes_and_equals_single_process(monkeypatch):
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for k, v in {**env, "MASTER_PORT": str(_free_port()), "GLOO_SOCKET_IFNAME": "lo"}.items():
        monkeypatch.setenv(k, v)
    comm = TorchDistributedComm.from_env("cpu", timeout_s=60)
    try:
        assert (comm.rank, comm.world_size, comm.backend) == (0, 1, "gloo")
        a = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
        b = torch.arange(4, dtype=torch.float64)
        ma, mb = comm.mean([a, b])
        assert ma.dtype == torch.float32 and ma.shape == (2, 3) and torch.equal(ma, a)
        assert mb.dtype == torch.float64 and torch.equal(mb, b)
        got = comm.gather({"x": b})
        assert got is not None and len(got) == 1 and torch.equal(got[0]["x"], b)
        assert comm.broadcast({"score": 1.5}) == {"score": 1.5}
        res = MetaTrainer(_net(), _cfg(), comm=comm).train()
    finally:
        comm.close()
    ref = MetaTrainer(_net(), _cfg()).train()
    for k, v in ref.meta_params.items():
        assert torch.equal(res.meta_params[k], v), k


def test_sigterm_raises_one_rank_failure_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RankFailure, match="rank 3: stopped by SIGTERM"):
        with sigterm_raises(3):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert signal.getsignal(signal.SIGTERM) == before


# -- real torchrun processes -----------------------------------------------------------------

# A tiny float64 meta-training: 30 meta-steps, checkpoints every 3, held-out evaluation every 10.
_ARGS = [
    "meta-train", "--task", "quadratic", "-o", "dtype=float64", "--core-option", "hidden=6",
    "--meta-steps", "30", "--unroll", "3", "--inner-steps", "9", "--meta-batch", "8",
    "--eval-tasks", "4", "--eval-every", "10", "--checkpoint-every", "3", "--meta-lr", "0.01",
    "--device", "cpu",
]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
        MASTER_ADDR="127.0.0.1",
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
    )
    return env


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), children first."""
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def _rank_pid(pid: int, rank: int) -> int | None:
    for p in _descendants(pid):
        try:
            env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(e.startswith(b"TORCHELASTIC_") for e in env):
            return p
    return None


class _Procs:
    """Processes a test starts; :meth:`stop` ends each one and its descendants, by pid."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], log: Path) -> subprocess.Popen:
        with log.open("w") as f:
            p = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                kids = _descendants(p.pid)
                for pid in [p.pid, *kids]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                p.wait(timeout=60)


@pytest.fixture
def procs():
    ps = _Procs()
    try:
        yield ps
    finally:
        ps.stop()


def _wait(p: subprocess.Popen, log: Path, timeout: float = 240) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{p.args} did not finish in {timeout} s:\n{log.read_text()[-3000:]}")


def _only_run(logdir: Path) -> Path:
    runs = list((logdir / "meta-train").iterdir())
    assert len(runs) == 1, runs  # rank 0 alone creates the run directory
    return runs[0]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """An uninterrupted 2-rank run under plain torchrun (c10d rendezvous on a free loopback
    port); returns (run directory, its output)."""
    root = tmp_path_factory.mktemp("ddp")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
        "--local-addr", "127.0.0.1", "-m", "selfref", *_ARGS, "--logdir", str(root / "logs"),
    ]  # fmt: skip
    ps = _Procs()
    try:
        log = root / "out.txt"
        p = ps.start(cmd, log)
        assert _wait(p, log) == 0, log.read_text()[-3000:]
    finally:
        ps.stop()
    return _only_run(root / "logs"), log.read_text()


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_rank_and_rank_0_alone_writes(two_rank_run, run_cli, tmp_path):
    run, out = two_rank_run
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert [f for f in files if not f.startswith("events.out.tfevents")] == [
        "argv.txt", "checkpoints/best.pt", "checkpoints/last.pt", "config.json", "results.json",
    ]  # fmt: skip
    assert sum(f.startswith("events.out.tfevents") for f in files) == 1  # one TensorBoard writer
    assert out.count('"meta_train_grad_evals"') == 1 and out.count("run directory:") == 1
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    two = load(run / "checkpoints" / "last.pt")
    assert two["world_size"] == 2 and two["step"] == 30
    # one process, one rank, the same two shards of the global meta-batch of 8
    r = run_cli(*_ARGS, "--shards", 2, "--logdir", tmp_path)
    assert r.code == 0, r.err
    one = load(_only_run(tmp_path) / "checkpoints" / "last.pt")
    assert one["world_size"] == 1
    for k, v in one["meta_params"].items():
        assert v.dtype == torch.float64
        torch.testing.assert_close(two["meta_params"][k], v, rtol=0, atol=1e-10)
    assert [h["step"] for h in two["history"]] == [10, 20, 30]
    for h1, h2 in zip(one["history"], two["history"]):
        assert h1["score"] == pytest.approx(h2["score"], abs=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1])
def test_torchrun_survives_a_killed_rank_by_resuming(two_rank_run, procs, tmp_path, victim):
    """SIGKILL one rank of a 2-rank ``--nproc 2`` run after its first checkpoint: the run ends
    with one line naming the intact checkpoint; the resume ends with the uninterrupted run's
    meta-parameters, bit for bit."""
    logdir, log = tmp_path / "logs", tmp_path / "killed.txt"
    p = procs.start(
        [sys.executable, "-m", "selfref", *_ARGS, "--nproc", "2", "--logdir", str(logdir)], log
    )
    deadline, pid, killed = time.monotonic() + 240, None, False
    while time.monotonic() < deadline and p.poll() is None:
        pid = pid or _rank_pid(p.pid, victim)
        if pid and list(logdir.glob("meta-train/*/checkpoints/last.pt")):
            os.kill(pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    assert killed, f"the run ended before the kill:\n{log.read_text()[-3000:]}"
    assert _wait(p, log) != 0
    text = log.read_text()
    # the victim may die between a progress line and its newline, so the survivor's error
    # can follow that line's text on the same line of the shared log
    errors = [
        ln[ln.index("selfref: error:") :] for ln in text.splitlines() if "selfref: error:" in ln
    ]
    assert len(errors) == 1, text[-3000:]
    assert "another rank died" in errors[0] or "stopped by SIGTERM" in errors[0], errors[0]
    run = _only_run(logdir)
    assert f"the last checkpoint is intact: {run / 'checkpoints' / 'last.pt'}" in errors[0]
    killed_at = load(run / "checkpoints" / "last.pt")  # intact: it loads
    assert killed_at["step"] % 3 == 0 and 3 <= killed_at["step"] < 30
    # resume with the same world size
    log2 = tmp_path / "resumed.txt"
    p2 = procs.start(
        [sys.executable, "-m", "selfref", "meta-train", "--resume", str(run), "--nproc", "2"], log2
    )
    assert _wait(p2, log2) == 0, log2.read_text()[-3000:]
    resumed = load(run / "checkpoints" / "last.pt")
    full = load(two_rank_run[0] / "checkpoints" / "last.pt")
    assert resumed["step"] == full["step"] == 30
    for k, v in full["meta_params"].items():
        assert torch.equal(resumed["meta_params"][k], v), k
        assert torch.equal(resumed["best"]["meta_params"][k], full["best"]["meta_params"][k]), k
    assert resumed["history"] == full["history"]
    assert json.loads((run / "results.json").read_text())["steps_done"] == 30
