"""Learned learning-rate and momentum schedules by RMAD (Maclaurin et al. 2015, section 3.1).

The paper's meta-optimization experiment, scaled to scikit-learn digits: a 64→50→50→10
sigmoid MLP trained for T = 100 steps of SGD with momentum, batch 100, with per-layer
schedules of the learning rate α_t and momentum decay γ_t (3 layers × 100 steps × 2 = 600
metaparameters), learned by 50 meta-iterations of Adam on exact hypergradients of the
validation loss. The learned schedules go to TensorBoard (``schedule/alpha/<layer>`` and
``schedule/gamma/<layer>`` against the inner step) and to ``schedules.png``.

Baseline at the same cost (50 hypergradients × (4·T + m) gradient evaluations): the best
*constant* (lr, momentum) that the harness's grid search and random search find, each trial
one 100-step training run of the same SGD with momentum (torch form, v ← μv + g, w ← w − lr·v,
which for constant settings is the same family as the paper's decay form with γ = μ,
α = lr / (1 − γ)).

Run:
    .venv/bin/python experiments/rmad_schedule.py              # the full experiment
    .venv/bin/python experiments/rmad_schedule.py --meta-iters 5 --no-baselines  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from selfref.budget import Budget
from selfref.hypergrad import hypergradient_cost
from selfref.hypergrad.rmad import meta_objective_batch
from selfref.logging import MemoryLogger, MultiLogger, TensorBoardLogger
from selfref.methods.rmad import RMAD
from selfref.runs import RunDir, atomic_write_text, json_default
from selfref.tasks.digits import DigitsMLP


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="inner steps T (paper: 100)")
    p.add_argument("--batch-size", type=int, default=100, help="minibatch size (paper: 100)")
    p.add_argument("--meta-iters", type=int, default=50, help="Adam meta-iterations (paper: 50)")
    p.add_argument("--meta-lr", type=float, default=0.1, help="Adam step on log α / logit γ")
    p.add_argument("--alpha", type=float, default=1.0, help="initial constant α")
    p.add_argument("--gamma", type=float, default=0.9, help="initial constant γ")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--logdir", default="logs", help="root of run directories")
    p.add_argument("--workers", type=int, default=None, help="baseline trial workers")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--no-baselines", action="store_true", help="skip grid and random search")
    return p.parse_args(argv)


def plot_schedules(res_extra: dict, curve: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sched = res_extra["schedules"]
    alpha = torch.tensor(sched["alpha"])  # (T, G)
    gamma = torch.tensor(sched["gamma"])  # (T, G)
    names = res_extra["groups"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for gi, name in enumerate(names):
        axes[0].plot(alpha[:, gi].numpy(), label=f"layer {name}")
        axes[1].plot(gamma[:, gi].numpy(), label=f"layer {name}")
    axes[0].set(title="learned learning rate α_t", xlabel="inner step t", yscale="log")
    axes[1].set(title="learned momentum decay γ_t", xlabel="inner step t")
    axes[2].plot(range(1, len(curve) + 1), curve, marker=".")
    axes[2].set(title="validation loss after T steps", xlabel="meta-iteration", yscale="log")
    for ax in axes[:2]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    task = DigitsMLP(hidden=(50, 50), batch_size=args.batch_size, device=args.device)
    _, m = meta_objective_batch(task, "val", args.seed)
    cost = hypergradient_cost(args.steps, m)
    budget = Budget(grad_evals=args.meta_iters * cost, steps_per_trial=args.steps)
    run = RunDir.create(args.logdir, "rmad_schedule", "rmad", args.seed, argv=sys.argv)
    config = {**vars(args), "hypergrad_cost": cost, "budget": budget.grad_evals, "task": task.name}
    run.write_config(config)

    tb = TensorBoardLogger(run.path)
    mem = MemoryLogger()
    logger = MultiLogger([tb, mem])
    t0 = time.perf_counter()
    method = RMAD(
        steps=args.steps,
        meta_iters=args.meta_iters,
        learn=("log_alpha", "logit_gamma"),
        alpha=args.alpha,
        gamma=args.gamma,
        meta_lr=args.meta_lr,
    )
    res = method.run(task, budget, logger, seed=args.seed)
    rmad_s = time.perf_counter() - t0
    for t, (a_row, g_row) in enumerate(
        zip(res.extra["schedules"]["alpha"], res.extra["schedules"]["gamma"])
    ):
        for gi, name in enumerate(res.extra["groups"]):
            tb.scalar(f"schedule/alpha/{name}", a_row[gi], t)
            tb.scalar(f"schedule/gamma/{name}", g_row[gi], t)
    plot_schedules(res.extra, mem.values("meta/loss"), run.path / "schedules.png")

    summary = {
        "rmad": {
            "val_loss": res.val_loss,
            "test_loss": res.test_loss,
            "val_accuracy": res.val_accuracy,
            "test_accuracy": res.test_accuracy,
            "initial_val_loss": mem.values("meta/loss")[0] if mem.values("meta/loss") else None,
            "grad_evals": res.grad_evals,
            "meta_iters": res.extra["meta_iters"],
            "guard_triggers": res.extra["guard_triggers"],
            "wall_s": rmad_s,
        }
    }
    if not args.no_baselines:
        from selfref.methods.grid import GridSearch
        from selfref.methods.random import RandomSearch
        from selfref.search_space import FloatDim, SearchSpace

        space = SearchSpace(
            (FloatDim("lr", 1e-3, 10.0, log=True), FloatDim("momentum", 0.0, 0.99)),
            optimizer="momentum",
        )
        for search in (
            GridSearch(space=space, workers=args.workers),
            RandomSearch(space=space, workers=args.workers),
        ):
            t1 = time.perf_counter()
            r = search.run(task, budget, None, seed=args.seed)
            summary[search.name] = {
                "val_loss": r.val_loss,
                "test_loss": r.test_loss,
                "val_accuracy": r.val_accuracy,
                "test_accuracy": r.test_accuracy,
                "best_hparams": r.best_hparams,
                "grad_evals": r.grad_evals,
                "trials": r.extra.get("trials"),
                "wall_s": time.perf_counter() - t1,
            }
    for name, s in summary.items():
        tb.scalar(f"compare/{name}_val_loss", s["val_loss"], 0)
    tb.close()
    run.write_results({"summary": summary, "rmad": res.to_dict()})
    atomic_write_text(
        run.path / "summary.json", json.dumps(summary, indent=2, default=json_default)
    )
    print(json.dumps(summary, indent=2, default=json_default))
    print(f"run directory: {run.path}")
    if not math.isfinite(res.val_loss):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
