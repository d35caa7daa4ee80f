"""Black-box and multi-fidelity HPO: the learned RNN optimizer (Chen et al. 2017), Hyperband, ASHA.

Measured in one run, side by side:

1. **The paper's synthetic functions** (Chen et al. 2017, sections 3.1–3.2): GP samples of
   length scales held out of meta-training (d = 2 and 6), Branin, Hartmann 3 and Hartmann 6,
   at equal numbers of evaluations (``--steps``, default 50, within the training horizon of
   100) over 10 seeds, for ``rnn-bo`` (the shipped checkpoints), Optuna's TPE and GP samplers
   and random search (:func:`experiments.chen_blackbox.compare`). Target per function: the
   RNN's median final regret within the band of TPE and GP, read as no worse than the worse
   of their two medians (``rnn_minus_band_top <= 0``; below the band is better still).
   Target: the RNN's time per proposal at least 10× below the GP sampler's (median seconds
   per ask, measured in the same run; a ratio, noisy on a shared machine).
2. **digits-mlp** (the harness's default space, trials of 200 steps): grid search over the
   full budget (10,000 gradient evaluations: a 4×4×3 grid), and ``hyperband`` and ``asha``
   (η = 3, rungs of 7, 22, 66, 200 steps) with the same budget. For each seed, the gradient
   evaluations at which their best-so-far validation loss first reaches grid search's best,
   divided by grid search's evaluations (target <= 1/3, median over seeds; a method that never
   reaches it within the budget counts as infinity).

``--quick`` shrinks both parts (a smoke run, < 1 minute; its targets are not meaningful).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch

from benchmarks.common import base_parser, target, write_result
from experiments.chen_blackbox import compare
from selfref import methods
from selfref.budget import Budget
from selfref.execution import default_workers
from selfref.tasks import make


def synthetic(steps: int, seeds: int, n_gp: int) -> tuple[dict[str, Any], dict[str, Any], dict]:
    summary = compare(steps, seeds, (2, 6), n_gp, ("rnn-bo", "tpe", "gp", "random"))
    metrics: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    for name, per in summary["problems"].items():
        med = {m: v["median_final_regret"] for m, v in per.items()}
        for m, v in med.items():
            metrics[f"{name}/{m}_median_regret"] = v
            metrics[f"{name}/{m}_mean_regret"] = per[m]["mean_final_regret"]
        top = max(med["tpe"], med["gp"])
        metrics[f"{name}/rnn_minus_band_top"] = med["rnn-bo"] - top
        targets[f"{name}/rnn_minus_band_top"] = target(med["rnn-bo"] - top, "<= 0")
    ask = summary["ask_s"]
    for m, v in ask.items():
        metrics[f"ask_s/{m}"] = v
    ratio = ask["gp"] / ask["rnn-bo"]
    metrics["gp_over_rnn_ask_time"] = ratio
    targets["gp_over_rnn_ask_time"] = target(ratio, ">= 10")
    curves = {
        name: {m: v["median_curve"] for m, v in per.items()}
        for name, per in summary["problems"].items()
    }
    return metrics, targets, curves


def _evals_to_reach(curve: list[Any], level: float) -> float:
    for p in curve:
        if p.best_val_loss <= level:
            return float(p.grad_evals)
    return math.inf


def multifidelity(
    grad_evals: int, steps: int, seeds: tuple[int, ...], workers: int
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    task = make("digits-mlp")
    budget = Budget(grad_evals, steps)
    metrics: dict[str, Any] = {}
    ratios: dict[str, list[float]] = {"hyperband": [], "asha": []}
    detail: dict[str, Any] = {}
    for seed in seeds:
        t0 = time.perf_counter()
        grid = methods.make("grid", workers=workers).run(task, budget, seed=seed)
        detail[f"grid-s{seed}"] = {
            "val_loss": grid.val_loss,
            "grad_evals": grid.grad_evals,
            "wall_s": time.perf_counter() - t0,
            "grid_size": grid.extra["grid_size"],
        }
        for name in ratios:
            t0 = time.perf_counter()
            res = methods.make(name, workers=workers).run(task, budget, seed=seed)
            reach = _evals_to_reach(res.curve, grid.val_loss)
            ratios[name].append(reach / grid.grad_evals)
            detail[f"{name}-s{seed}"] = {
                "val_loss": res.val_loss,
                "test_loss": res.test_loss,
                "grad_evals": res.grad_evals,
                "evals_to_reach_grid_best": reach,
                "trials": res.extra["trials"],
                "trials_pruned": res.extra["trials_pruned"],
                "trials_completed": res.extra["trials_completed"],
                "wall_s": time.perf_counter() - t0,
                "curve": [[p.grad_evals, p.best_val_loss] for p in res.curve],
            }
    targets: dict[str, Any] = {}
    for name, rs in ratios.items():
        med = statistics.median(rs)
        metrics[f"digits-mlp/{name}_evals_to_grid_best_over_grid_evals"] = med
        metrics[f"digits-mlp/{name}_ratios_per_seed"] = rs
        targets[f"digits-mlp/{name}_evals_to_grid_best_over_grid_evals"] = target(med, "<= 0.3334")
    grid_vals = [detail[f"grid-s{s}"]["val_loss"] for s in seeds]
    metrics["digits-mlp/grid_best_val_loss_mean"] = statistics.fmean(grid_vals)
    for name in ratios:
        vals = [detail[f"{name}-s{s}"]["val_loss"] for s in seeds]
        metrics[f"digits-mlp/{name}_best_val_loss_mean"] = statistics.fmean(vals)
    return metrics, targets, detail


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50, help="evaluations per synthetic run")
    p.add_argument("--seeds", type=int, default=10, help="seeds of the synthetic part")
    p.add_argument("--gp-functions", type=int, default=1, help="GP samples per dimension")
    p.add_argument("--hpo-seeds", default="0,1,2", help="seeds of the digits-mlp part")
    p.add_argument("--workers", type=int, default=None, help="trial workers (default: cores)")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--skip-hpo", action="store_true")
    p.add_argument(
        "--hpo-from",
        default=None,
        help="take part 2 from an earlier result file of this benchmark (run separately)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    steps, seeds, n_gp = args.steps, args.seeds, args.gp_functions
    hpo_evals, hpo_steps = 10_000, 200
    hpo_seeds = tuple(int(s) for s in args.hpo_seeds.split(","))
    if args.quick:
        steps, seeds, n_gp = 15, 2, 1
        hpo_evals, hpo_steps, hpo_seeds = 1_200, 54, (0,)
    workers = default_workers() if args.workers is None else args.workers
    metrics: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    config: dict[str, Any] = {
        "synthetic": {"steps": steps, "seeds": seeds, "gp_dims": [2, 6], "gp_functions": n_gp},
        "hpo": {
            "task": "digits-mlp",
            "grad_evals": hpo_evals,
            "steps_per_trial": hpo_steps,
            "seeds": list(hpo_seeds),
            "workers": workers,
            "eta": 3,
        },
    }
    t0 = time.perf_counter()
    if not args.skip_synthetic:
        m, t, curves = synthetic(steps, seeds, n_gp)
        metrics.update(m)
        targets.update(t)
        config["synthetic"]["median_regret_curves"] = curves
        config["synthetic"]["wall_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    if args.hpo_from is not None:
        import json
        from pathlib import Path

        old = json.loads(Path(args.hpo_from).read_text())
        metrics.update({k: v for k, v in old["metrics"].items() if k.startswith("digits-mlp/")})
        targets.update({k: v for k, v in old["targets"].items() if k.startswith("digits-mlp/")})
        config["hpo"] = {**old["config"]["hpo"], "from": args.hpo_from, "date": old["date"]}
    elif not args.skip_hpo:
        m, t, detail = multifidelity(hpo_evals, hpo_steps, hpo_seeds, workers)
        metrics.update(m)
        targets.update(t)
        config["hpo"]["runs"] = detail
        config["hpo"]["wall_s"] = time.perf_counter() - t1
    out = args.out or (None if not args.quick else "benchmarks/results/blackbox_hpo.quick.json")
    write_result("blackbox_hpo", config, metrics, targets, out)


if __name__ == "__main__":
    main()
