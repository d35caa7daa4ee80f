"""HPO baselines on digits-mlp: the bar that gradient-based methods must beat, and the harness.

Measured in one run, side by side:

1. **Parallel speed-up and harness overhead.** The same set of random-search trials (seeded,
   so identical points) runs with 1 worker process and with 2; wall time includes starting
   the workers. Speed-up = wall(1) / wall(2) (target >= 1.7). Harness overhead of the
   1-worker study = (wall - sum of the trials' own compute seconds) / sum of compute: process
   start, pickling, logging, trials.jsonl bookkeeping (target < 10%).
2. **The default `selfref compare`** (quick budget, every method installed now) as a real
   subprocess: its wall time (target <= 300 s on 2 cores). Later issues add methods to the
   default set; the methods measured are listed in the config.
3. **The full-budget comparison** of grid, random, TPE and GP on digits-mlp (10,000 gradient
   evaluations per method and seed, trials of 200 steps, 5 seeds): best validation loss
   reached against gradient evaluations (mean/std per method; curves in the config).

``--quick`` shrinks every part (a smoke run, < 1 minute; its targets are not meaningful).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import base_parser, target, write_result
from selfref import methods
from selfref.budget import Budget
from selfref.compare import CompareConfig, _step_values, run_comparison
from selfref.methods.random import RandomSearch
from selfref.methods.trials import TrialRunner
from selfref.tasks import make

REPO = Path(__file__).resolve().parents[1]
SEARCH = ("grid", "random", "tpe", "gp")


def parallel_study(task: Any, trials: int, steps: int, workers: int) -> dict[str, float]:
    """Random search of ``trials`` trials on ``workers`` processes; wall includes their start."""
    t0 = time.perf_counter()
    with TrialRunner(task, workers) as runner:
        res = RandomSearch(runner=runner).run(task, Budget(trials * steps, steps), seed=0)
    wall = time.perf_counter() - t0
    assert res.extra["trials"] == trials, res.extra
    return {"wall_s": wall, "compute_s": res.extra["trial_compute_s"], "val": res.val_loss}


def quick_compare_subprocess(device: str, extra: list[str], timeout: float) -> dict[str, Any]:
    """Run `selfref compare` (plus ``extra`` arguments) as a real process; time it."""
    with tempfile.TemporaryDirectory() as logdir:
        cmd = [sys.executable, "-m", "selfref.cli", "compare", "--logdir", logdir]
        cmd += [] if device == "cpu" else ["--device", device]
        cmd += extra
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
            )
            code, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            code = -1
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        wall = time.perf_counter() - t0
    table = [ln for ln in out.splitlines() if ln.startswith("| ")]
    return {"wall_s": wall, "exit_code": code, "table": table, "tail": out.splitlines()[-8:]}


def summarize_curves(results: list[Any], budget: int, step: int) -> dict[str, Any]:
    """Per method: mean / min / max over seeds of best val loss on a grid of grad evals."""
    xs = np.arange(step, budget + 1, step, dtype=np.float64)
    out: dict[str, Any] = {"grad_evals": xs.astype(int).tolist()}
    for m in dict.fromkeys(r.method for r in results):
        ys = np.stack([_step_values(r.curve, xs) for r in results if r.method == m and r.curve])
        have = np.isfinite(ys).all(0)  # (x,) every seed has a value
        out[m] = {
            "mean": [float(v) if h else None for v, h in zip(ys.mean(0), have)],
            "min": [float(v) if h else None for v, h in zip(ys.min(0), have)],
            "max": [float(v) if h else None for v, h in zip(ys.max(0), have)],
            "per_seed": [[[p.grad_evals, p.best_val_loss] for p in r.curve] for r in results
                         if r.method == m],
        }  # fmt: skip
    return out


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2, help="workers of the parallel side")
    args = p.parse_args()
    device = args.device
    task = make("digits-mlp", device=device)
    installed = methods.names()
    search = [m for m in SEARCH if m in installed]

    # 1. speed-up and overhead (same trials, side by side)
    trials, steps = (8, 100) if args.quick else (384, 100)
    one = parallel_study(task, trials, steps, 1)
    two = parallel_study(task, trials, steps, args.workers)
    same_result = one["val"] == two["val"]  # same trials, one thread each: bitwise equal on CPU
    speedup = one["wall_s"] / two["wall_s"]
    overhead = (one["wall_s"] - one["compute_s"]) / one["compute_s"]
    overhead2 = (args.workers * two["wall_s"] - two["compute_s"]) / two["compute_s"]

    # 2. the default comparison, as users run it
    extra = ["--methods", "random", "--seeds", "0", "--budget", "200"] if args.quick else []
    default = quick_compare_subprocess(device, extra, timeout=120 if args.quick else 1200)

    # 3. the full-budget comparison of the search baselines
    if args.quick:
        grad_evals, spt, seeds = 400, 100, (0,)
    else:
        grad_evals, spt, seeds = 10_000, 200, (0, 1, 2, 3, 4)
    cfg = CompareConfig(
        task="digits-mlp",
        methods=tuple(search),
        seeds=seeds,
        grad_evals=grad_evals,
        steps_per_trial=spt,
        workers=args.workers,
        device=device,
        budget_name="quick" if args.quick else "full",
    )
    t0 = time.perf_counter()
    results = run_comparison(cfg, task)
    full_wall = time.perf_counter() - t0

    metrics: dict[str, float] = {}
    for m in search:
        rs = [r for r in results if r.method == m and r.status == "ok"]
        v = np.array([r.val_loss for r in rs])
        metrics[f"{m}_best_val_loss_mean"] = float(v.mean()) if len(v) else float("nan")
        metrics[f"{m}_best_val_loss_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        metrics[f"{m}_test_loss_mean"] = float(np.mean([r.test_loss for r in rs]))
        metrics[f"{m}_test_accuracy_mean"] = float(np.mean([r.test_accuracy for r in rs]))
        metrics[f"{m}_trials_mean"] = float(np.mean([r.extra["trials"] for r in rs]))
        metrics[f"{m}_wall_s_mean"] = float(np.mean([r.wall_s for r in rs]))
        metrics[f"{m}_runs_ok"] = float(len(rs))
        for frac in (0.25, 0.5):
            x = np.array([grad_evals * frac])
            at = [float(_step_values(r.curve, x)[0]) for r in rs]
            metrics[f"{m}_best_val_loss_at_{int(frac * 100)}pct_mean"] = float(np.mean(at))
    metrics.update(
        {
            "full_compare_wall_s": full_wall,
            "default_compare_wall_s": default["wall_s"],
            "default_compare_exit_code": float(default["exit_code"]),
            "workers1_wall_s": one["wall_s"],
            "workers1_trial_compute_s": one["compute_s"],
            f"workers{args.workers}_wall_s": two["wall_s"],
            "speedup_2_vs_1": speedup,
            "harness_overhead_frac_1worker": overhead,
            "harness_overhead_frac_2workers": overhead2,
        }
    )
    default_ok = default["exit_code"] == 0
    targets = {
        "default_compare_wall_s": target(
            default["wall_s"] if default_ok else float("inf"), "<= 300"
        ),
        "speedup_2_vs_1": target(speedup, ">= 1.7"),
        "harness_overhead_frac_1worker": target(overhead, "< 0.1"),
    }
    config = {
        "task": "digits-mlp",
        "device": device,
        "quick": args.quick,
        "parallel_runs_agree_bitwise": same_result,
        "load_average_at_end": os.getloadavg(),
        "parallel": {"trials": trials, "steps_per_trial": steps, "workers": [1, args.workers]},
        "default_compare": {
            "args": extra,
            "methods_installed_now": installed,
            "table": default["table"],
            "tail": default["tail"] if not default_ok else [],
        },
        "full_compare": cfg.to_dict(),
        "curves": summarize_curves(results, grad_evals, spt),
        "failed_runs": [
            {"method": r.method, "seed": r.seed, "reason": r.reason}
            for r in results
            if r.status != "ok"
        ],
    }
    out = args.out or (
        str(Path(__file__).resolve().parent / "results" / "hpo_baselines.quick.json")
        if args.quick
        else None
    )
    write_result("hpo_baselines", config, metrics, targets, out=out)


if __name__ == "__main__":
    main()
