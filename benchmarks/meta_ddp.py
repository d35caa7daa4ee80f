"""Data-parallel meta-training: 2 ranks (torchrun, gloo) against 1 rank, same global meta-batch.

The L2L setting of Andrychowicz et al. 2016, section 3.1 (a coordinatewise LSTM on 10-d
quadratics, unrolls of 20 over horizons of 100, truncated BPTT), in float64, with a global
meta-batch big enough that the per-step compute dominates the all-reduce. Three
configurations run side by side, round-robin over ``--rounds`` rounds, each process with
``torch.set_num_threads(1)``:

- ``two_ranks``: ``torchrun --nproc-per-node 2`` on 127.0.0.1, each rank half of the
  meta-batch on its own stream;
- ``one_rank``: one process running both halves in turn (``shards=2``, the same two
  streams), the same computation, so φ must match ``two_ranks``;
- ``one_rank_one_stream``: one process, the whole meta-batch in one ``vmap`` (``shards=1``),
  the fastest single-process way to run that meta-batch (other instances, so another φ).

Meta-steps per second are timed on rank 0 after ``--warmup`` steps (the all-reduce included;
process start-up and the process group's set-up not). Each configuration's best round is
kept (other sessions on a shared machine only slow a run down); the speedup is two_ranks over
the faster single-process configuration. Targets: speedup ≥ 1.7; φ after 20 meta-steps
equal to one_rank's within 1e-10 (max |Δ|).

A control beside it: the machine's parallel ceiling now — a fixed single-thread matmul load
run in two processes at once against one process alone (2 × t_alone / t_pair; 2.0 on two
idle cores). On a machine shared with other jobs the speedup cannot exceed it.

Usage: python -m benchmarks.meta_ddp [--quick] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, base_parser, target, write_result
from selfref import checkpoints

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("two_ranks", "one_rank", "one_rank_one_stream")


def _worker(args: argparse.Namespace) -> None:
    """One rank (under torchrun) or the single process: meta-train, time, save φ (rank 0)."""
    torch.set_num_threads(1)
    from selfref.meta import MetaTrainConfig, MetaTrainer
    from selfref.meta.distributed import TorchDistributedComm, torchrun_env
    from selfref.meta.trainer import train_step
    from selfref.net import SelfReferentialNet
    from selfref.tasks import make

    comm = TorchDistributedComm.from_env("cpu") if torchrun_env() else None
    net = SelfReferentialNet.from_task(make("quadratic", dtype=torch.float64))
    cfg = MetaTrainConfig(
        meta_steps=args.steps,
        unroll=args.unroll,
        inner_steps=100,
        meta_batch=args.meta_batch,
        shards=args.shards,
        eval_every=0,
        checkpoint_every=0,
        eval_tasks=1,
        seed=0,
    )
    tr = MetaTrainer(net, cfg, comm=comm)
    state = tr.state
    for s in range(args.steps):
        if s == args.warmup:
            tr.comm.broadcast(None)  # line the ranks up before the clock starts
            t0 = time.perf_counter()
        state, _ = train_step(tr.problem, tr.estimator, cfg, state, tr.comm)
    rate = (args.steps - args.warmup) / (time.perf_counter() - t0)
    if tr.comm.rank == 0:
        out = {"meta_params": state["meta_params"], "steps_per_s": rate, "step": state["step"]}
        checkpoints.save(out, args.worker_out)
    if comm is not None:
        comm.close()


def _spin(n: int) -> None:
    """The control's fixed load: ``n`` single-thread 256×256 float64 matmuls."""
    torch.set_num_threads(1)
    a = torch.randn(256, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    for _ in range(n):
        b = (a @ b) / 256.0


def _ceiling(n: int) -> float:
    """2 × (one process alone) / (two at once), wall-clock of the same load each."""
    cmd = [sys.executable, "-c", f"from benchmarks.meta_ddp import _spin; _spin({n})"]

    def wall(k: int) -> float:
        t0 = time.perf_counter()
        ps = [subprocess.Popen(cmd, cwd=REPO, env=_env()) for _ in range(k)]
        for q in ps:
            q.wait(timeout=600)
        return time.perf_counter() - t0

    wall(1)  # warm the file cache
    return 2 * wall(1) / wall(2)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
        MASTER_ADDR="127.0.0.1",
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
    )
    return env


def _run(cmd: list[str], timeout: float) -> None:
    """Run ``cmd`` to the end; on a timeout stop it (torchrun stops its ranks on SIGTERM)."""
    p = subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()
        try:
            p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
        raise RuntimeError(f"{' '.join(cmd)} ran past {timeout} s") from None
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{out.decode()[-3000:]}")


def _measure(name: str, common: list[str], out: Path, timeout: float) -> dict[str, Any]:
    from selfref.meta.distributed import torchrun_command

    worker = ["--worker", "--worker-out", str(out), *common]
    if name == "two_ranks":
        cmd = torchrun_command(2, worker, module="benchmarks.meta_ddp")
    else:
        shards = "2" if name == "one_rank" else "1"
        cmd = [sys.executable, "-m", "benchmarks.meta_ddp", *worker, "--shards", shards]
    _run(cmd, timeout)
    return checkpoints.load(out)


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=None, help="rounds of the three (default 3)")
    p.add_argument("--meta-batch", type=int, default=None, help="global meta-batch")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--unroll", type=int, default=20, help=argparse.SUPPRESS)
    p.add_argument("--shards", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.device not in ("cpu", "auto"):
        raise SystemExit("meta_ddp measures gloo ranks on the CPU; use --device cpu")
    rounds = args.rounds or (1 if args.quick else 3)
    meta_batch = args.meta_batch or (64 if args.quick else 512)
    unroll = 5 if args.quick else 20
    common = ["--steps", "20", "--warmup", "2", "--unroll", str(unroll)]
    common += ["--meta-batch", str(meta_batch)]
    load_start = os.getloadavg()[0]
    rates: dict[str, list[float]] = {c: [] for c in CONFIGS}
    phis: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="meta_ddp-") as tmp:
        for r in range(rounds):
            order = CONFIGS[r % 3 :] + CONFIGS[: r % 3]  # rotate: no configuration always first
            for name in order:
                res = _measure(name, common, Path(tmp) / f"{name}-{r}.pt", timeout=900)
                assert int(res["step"]) == 20
                rates[name].append(float(res["steps_per_s"]))
                phis[name] = res["meta_params"]
    best = {c: max(v) for c, v in rates.items()}
    single = max(best["one_rank"], best["one_rank_one_stream"])
    diff = max(float((phis["two_ranks"][k] - v).abs().max()) for k, v in phis["one_rank"].items())
    ceiling = _ceiling(200 if args.quick else 2000)
    metrics: dict[str, Any] = {
        **{f"{c}_meta_steps_per_s": best[c] for c in CONFIGS},
        **{f"{c}_meta_steps_per_s_round{i}": v for c in CONFIGS for i, v in enumerate(rates[c])},
        "speedup_two_ranks_vs_one_rank": best["two_ranks"] / best["one_rank"],
        "speedup_two_ranks_vs_one_rank_one_stream": best["two_ranks"] / best["one_rank_one_stream"],
        "speedup_two_ranks": best["two_ranks"] / single,
        "max_abs_diff_meta_params_two_ranks_vs_one_rank": diff,
        "meta_params_float64": float(
            all(v.dtype == torch.float64 for v in phis["two_ranks"].values())
        ),
        "machine_parallel_ceiling_2_vs_1": ceiling,
        "loadavg_1min_start": load_start,
        "loadavg_1min_end": os.getloadavg()[0],
    }
    config = {
        "quick": args.quick,
        "task": "quadratic (float64)",
        "core": "lstm",
        "estimator": "tbptt",
        "global_meta_batch": meta_batch,
        "unroll": unroll,
        "inner_steps": 100,
        "meta_steps": 20,
        "timed_steps": 18,
        "rounds": rounds,
        "threads_per_process": 1,
        "backend": "gloo on 127.0.0.1",
    }
    targets = {
        "speedup_two_ranks": target(metrics["speedup_two_ranks"], ">= 1.7"),
        "max_abs_diff_meta_params_two_ranks_vs_one_rank": target(diff, "<= 1e-10"),
    }
    out = args.out or (RESULTS_DIR / "meta_ddp.quick.json" if args.quick else None)
    write_result("meta_ddp", config, metrics, targets, out=out)


if __name__ == "__main__":
    main()
