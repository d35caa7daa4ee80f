"""Data-parallel meta-training on torch.distributed: the ranks' :class:`Comm`, and torchrun.

``torchrun --nproc-per-node N -m selfref meta-train ...`` (or ``selfref meta-train --nproc N``,
which starts that torchrun itself) runs N ranks of the one loop
(:mod:`selfref.meta.trainer`). Every rank holds the same φ and takes the same Adam step:

- each rank runs its own shard of the global meta-batch (task instances; ES/PES particles),
  from its own counter-based stream ``seed_of(seed, rank, step)``
  (``MetaTrainConfig.shards`` makes the result independent of the world size:
  :mod:`selfref.meta.shards`);
- the meta-gradient, meta-loss, cost and logged metrics are averaged over the ranks in one
  all-reduce (:meth:`TorchDistributedComm.mean`, float64);
- held-out evaluation runs on rank 0 and is broadcast; the checkpoint gathers every rank's
  estimator state; rank 0 alone writes logs, ``last.pt``, ``best.pt`` and ``results.json``;
- a resume with the same world size continues bit for bit;
- a rank that dies (or hangs past the process group's timeout) makes the next collective
  fail on the others: each prints one line (:class:`RankFailure`) and exits non-zero, and
  torchrun's agent stops the rest (ranks it stops with SIGTERM print one line too,
  :func:`sigterm_raises`). Checkpoints are written atomically, so the last one is intact.

Backends: gloo on CPU, NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``). Everything binds to
the loopback on one machine (:func:`launch`: ``--local-addr 127.0.0.1``,
``MASTER_ADDR=127.0.0.1``, ``GLOO_SOCKET_IFNAME=lo``).

Several machines: run the same command on every node. With torchrun's c10d rendezvous
(hosted at HOST:PORT, reachable from every node; the rendezvous numbers the nodes)::

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29400 --rdzv-id RUN \\
        -m selfref meta-train --task digits-mlp --meta-batch 128 --logdir /shared/logs

or with a fixed node order (node 0, at HOST, then holds rank 0), on node i::

    torchrun --nnodes 2 --node-rank i --nproc-per-node 4 \\
        --master-addr HOST --master-port 29500 -m selfref meta-train ...

Set ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` to the interface the nodes share. Rank 0
writes the run directory on its node and every rank reads ``--resume RUN_DIR``, so put
``--logdir`` on a file system all nodes share.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch

__all__ = [
    "TorchDistributedComm",
    "RankFailure",
    "torchrun_env",
    "sigterm_raises",
    "torchrun_command",
    "launch",
    "DEFAULT_TIMEOUT_S",
]

DEFAULT_TIMEOUT_S = 600.0  # a collective that waits longer than this fails (a hung rank)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RankFailure(RuntimeError):
    """A collective failed (a peer rank died or timed out) or this rank was told to stop."""


def torchrun_env(environ: Any = None) -> dict[str, int] | None:
    """``{"rank", "world_size", "local_rank"}`` when started by torchrun, else None.

    A rank is recognized by ``RANK`` or ``WORLD_SIZE``; torchrun sets them with
    ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` for every rank, and all of them must be
    present (``MASTER_ADDR`` alone, as set for the launcher, is not a rank).

    Raises:
        ValueError: some of them are set but not all, or they are not integers.
    """
    env = os.environ if environ is None else environ
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    present = [k for k in _TORCHRUN_VARS if k in env]
    if len(present) < len(_TORCHRUN_VARS):
        missing = [k for k in _TORCHRUN_VARS if k not in env]
        raise ValueError(
            f"{', '.join(present)} set but {', '.join(missing)} not: start the ranks with "
            "torchrun (or selfref meta-train --nproc N), or unset them"
        )
    try:
        out = {k.lower(): int(env[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    except ValueError:
        raise ValueError(
            f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got "
            f"{env['RANK']!r}/{env['WORLD_SIZE']!r}/{env['LOCAL_RANK']!r}"
        ) from None
    if not 0 <= out["rank"] < out["world_size"]:
        raise ValueError(f"RANK {out['rank']} is not in [0, WORLD_SIZE={out['world_size']})")
    return out


def _to_cpu(obj: Any) -> Any:
    """Every tensor of a nested dict/list/tuple on the CPU (what object collectives pickle)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _first_line(e: BaseException) -> str:
    """The gist of a backend error: its first sentence, without gloo's source location."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text.splitlines()[0])
    return line.split(". ")[0].rstrip(".")[:200]


class TorchDistributedComm:
    """The :class:`~selfref.meta.trainer.Comm` of a torch.distributed process group.

    Build it with :meth:`from_env` inside a torchrun rank (it initializes the default process
    group from torchrun's environment), or around a group that is already initialized.

    Args:
        device: where the ranks' tensors live: a CUDA device uses NCCL, the CPU gloo.
        timeout_s: a collective waiting longer than this raises :class:`RankFailure`.
        init: initialize the default process group from the environment (``env://``).

    Example (in each rank of ``torchrun --nproc-per-node 2``)::

        comm = TorchDistributedComm.from_env("cpu")
        trainer = MetaTrainer(problem, config, logger if comm.rank == 0 else None,
                              run_dir=run_dir, comm=comm)
        trainer.train()
        comm.close()
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        init: bool = True,
    ) -> None:
        import torch.distributed as dist

        if not dist.is_available():
            raise ValueError("this torch build has no torch.distributed")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.device = torch.device(device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.timeout_s = float(timeout_s)
        if init and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            kw: dict[str, Any] = {"timeout": timedelta(seconds=self.timeout_s)}
            if self.device.type == "cuda":
                kw["device_id"] = self.device
            try:
                dist.init_process_group(self.backend, **kw)
            except RuntimeError as e:
                raise RankFailure(f"could not join the process group: {_first_line(e)}") from e
        if not dist.is_initialized():
            raise ValueError("no process group: pass init=True or initialize one first")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    @classmethod
    def from_env(
        cls, device: str | torch.device = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> TorchDistributedComm:
        """Join the ranks torchrun started; ``"cuda"`` becomes ``cuda:LOCAL_RANK``."""
        env = torchrun_env()
        if env is None:
            raise ValueError("not started by torchrun (RANK, WORLD_SIZE, ... are not set)")
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", env["local_rank"])
        return cls(dev, timeout_s)

    def _collective(self, op: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except RankFailure:
            raise
        except RuntimeError as e:  # gloo: "Connection closed by peer", timeouts; NCCL errors
            raise RankFailure(
                f"rank {self.rank}: {op} failed, another rank died or timed out ({_first_line(e)})"
            ) from e

    def mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """One all-reduce of every tensor, flattened into one float64 buffer, divided by the
        world size; each result has its input's shape, dtype and device."""
        import torch.distributed as dist

        if not tensors:
            return []
        flat = torch.cat([t.detach().reshape(-1).to(self.device, torch.float64) for t in tensors])
        self._collective("all_reduce", dist.all_reduce, flat)
        flat = flat / self.world_size
        out, offset = [], 0
        for t in tensors:
            n = t.numel()
            out.append(flat[offset : offset + n].reshape(t.shape).to(t.device, t.dtype))
            offset += n
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (tensors moved to the CPU) in rank order on rank 0."""
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        self._collective("gather", dist.gather_object, _to_cpu(obj), out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (tensors moved to the CPU) on every rank."""
        import torch.distributed as dist

        box = [_to_cpu(obj) if self.rank == 0 else None]
        self._collective("broadcast", dist.broadcast_object_list, box, src=0)
        return box[0]

    def close(self) -> None:
        """Leave the process group (after a clean run; after a failure just exit)."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def sigterm_raises(rank: int) -> Iterator[None]:
    """Within the block SIGTERM raises :class:`RankFailure` (main thread only).

    torchrun stops the surviving ranks with SIGTERM when one fails; this turns that into one
    line from the rank instead of a silent death. Checkpoint writes clean up on the way out
    (:func:`selfref.checkpoints.save`), so the last checkpoint stays intact.
    """

    def handler(signum: int, frame: Any) -> None:
        raise RankFailure(
            f"rank {rank}: stopped by SIGTERM (torchrun stops every rank when one fails, "
            "or the run was stopped)"
        )

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def torchrun_command(nproc: int, args: Sequence[str], module: str = "selfref") -> list[str]:
    """The single-machine torchrun command running ``python -m module *args`` on ``nproc``
    ranks, its rendezvous on the loopback (``--standalone``, a free port)."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--local-addr",
        "127.0.0.1",
        "--nproc-per-node",
        str(nproc),
        "-m",
        module,
        *args,
    ]


def launch(nproc: int, args: Sequence[str], module: str = "selfref") -> int:
    """Run :func:`torchrun_command` and return its exit code (128 + n when signal n ended it).

    The ranks bind to 127.0.0.1 (``MASTER_ADDR``, ``GLOO_SOCKET_IFNAME=lo``); each gets
    ``OMP_NUM_THREADS`` = cores / nproc unless it is set. SIGINT, SIGTERM and SIGHUP are
    forwarded to torchrun (started in its own session, so each arrives once), which stops
    the ranks. Call from the main thread.
    """
    cmd = torchrun_command(nproc, args, module)
    env = dict(os.environ)
    env.update({"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"})
    if "OMP_NUM_THREADS" not in env:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        env["OMP_NUM_THREADS"] = str(max(1, (cores or 1) // nproc))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum: int, frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, forward) for s in sigs}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc.poll() is None:  # an exception here: stop torchrun, which stops the ranks
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return rc if rc >= 0 else 128 - rc
