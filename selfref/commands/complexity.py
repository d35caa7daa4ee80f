"""``selfref complexity``: one hypernetwork vs separately trained variational nets on a λ grid.

Grebenkova, Bakhteev, Strijov 2021: trains a hypernetwork λ → (μ, log σ) once over the λ
range, and, for comparison, one variational network per λ of the grid; prunes each by the
signal-to-noise ratio (0%, 10%, …, 90% of the weights, biases kept; one ranking over all
weights, or per layer as in the authors' code with ``--prune-scope layer``) and reports test
accuracy against the pruned fraction for each λ.

Writes a run directory ``<logdir>/complexity/<stamp>-<family>-s<seed>/`` with config.json,
argv.txt, results.json, results.md (the table), accuracy_vs_pruning.png and TensorBoard
scalars (``prune/<model>/lambda_<λ>`` against the pruned percentage, training losses), then
prints the table and the ``tensorboard --logdir`` line.

Example:
    selfref complexity --task digits-mlp --epochs 20 --lambdas 0.001 0.1 10
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from selfref.commands.common import (
    UsageError,
    add_device_arg,
    add_logdir_arg,
    nonneg_int,
    positive_float,
    positive_int,
)

__all__ = ["add_parser", "run", "DEFAULT_LAMBDAS", "format_table"]

DEFAULT_LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
SUPPORTED_TASKS = ("digits-mlp", "digits-logreg", "mnist-mlp")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "complexity",
        help="complexity control: one hypernetwork vs variational nets on a λ grid",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--task", default="digits-mlp", help=f"one of {', '.join(SUPPORTED_TASKS)}")
    p.add_argument(
        "--hidden",
        type=positive_int,
        nargs="+",
        default=None,
        help="hidden layer sizes of the MLP tasks (default, as the paper: 50, i.e. 64-50-10)",
    )
    p.add_argument(
        "--lambdas",
        type=positive_float,
        nargs="+",
        default=list(DEFAULT_LAMBDAS),
        help="λ grid for the separate networks and the table (default: 1e-3 … 1e2)",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help="epochs of each separate network (default 100)",
    )
    length.add_argument(
        "--steps", type=positive_int, default=None, help="minibatches of each separate network"
    )
    p.add_argument(
        "--hyper-steps",
        type=positive_int,
        default=None,
        help="minibatches of the hypernetwork (default: a third of the separate nets' "
        "total gradient evaluations, divided by --draws)",
    )
    p.add_argument("--family", default="linear", choices=["linear", "piecewise"])
    p.add_argument(
        "--pivots", type=positive_int, default=None, help="K for --family piecewise (default 5)"
    )
    p.add_argument("--draws", type=positive_int, default=5, help="S, λ draws per minibatch")
    p.add_argument("--lr", type=positive_float, default=0.01, help="Adam step size")
    p.add_argument(
        "--prune-scope",
        default="global",
        choices=["global", "layer"],
        help="SNR ranking: over all weights (global, the paper's text) or per layer (the "
        "authors' code)",
    )
    p.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"])
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--data-dir", default=None, help="MNIST IDX directory (mnist-mlp only)")
    add_logdir_arg(p)
    add_device_arg(p)
    p.set_defaults(func=run)


def format_table(
    fractions: list[float], rows: dict[str, dict[str, list[float]]], lambdas: list[float]
) -> str:
    """Markdown: one row per (λ, model), one column per pruned fraction (test accuracy)."""
    head = "| λ | model | " + " | ".join(f"{round(100 * q)}%" for q in fractions) + " |"
    sep = "|---|---|" + "---|" * len(fractions)
    lines = [head, sep]
    for lam in lambdas:
        for model in rows:
            accs = rows[model][f"{lam:g}"]
            cells = " | ".join(f"{a:.3f}" for a in accs)
            lines.append(f"| {lam:g} | {model} | {cells} |")
    return "\n".join(lines)


def _plot(
    path: Path,
    fractions: list[float],
    rows: dict[str, dict[str, list[float]]],
    lambdas: list[float],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("viridis")
    xs = [100 * q for q in fractions]
    for i, lam in enumerate(lambdas):
        c = colors(i / max(1, len(lambdas) - 1))
        ax.plot(xs, rows["hypernet"][f"{lam:g}"], "-o", color=c, ms=3, label=f"hyper λ={lam:g}")
        ax.plot(xs, rows["separate"][f"{lam:g}"], "--", color=c, label=f"separate λ={lam:g}")
    ax.set_xlabel("weights pruned by SNR (%)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Complexity control: hypernetwork (solid) vs separate nets (dashed)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from selfref.logging import TensorBoardLogger
    from selfref.methods.complexity import (
        PRUNE_FRACTIONS,
        ComplexityConfig,
        pruning_curve,
        train_hypernet,
        train_separate,
    )
    from selfref.options import option_hints
    from selfref.runs import RunDir, check_logdir
    from selfref.tasks import make, task_class

    if args.task not in SUPPORTED_TASKS:
        raise UsageError(
            f"--task {args.task!r} is not supported by complexity; valid: "
            f"{', '.join(SUPPORTED_TASKS)}"
        )
    bad = [lam for lam in args.lambdas if not math.isfinite(lam)]
    if bad:
        raise UsageError(f"--lambdas must be finite positive numbers, got {bad}")
    lambdas = sorted(set(args.lambdas))
    check_logdir(args.logdir)
    if args.pivots is not None and args.family != "piecewise":
        raise UsageError(f"--pivots applies to --family piecewise only, not {args.family!r}")
    accepted = option_hints(task_class(args.task)) or {}
    options: dict[str, Any] = {"device": args.device}
    for flag, key, value in (
        ("--hidden", "hidden", None if args.hidden is None else tuple(args.hidden)),
        ("--data-dir", "data_dir", args.data_dir),
    ):
        if value is None:
            continue
        if key not in accepted:
            takers = [t for t in SUPPORTED_TASKS if key in (option_hints(task_class(t)) or {})]
            raise UsageError(
                f"{flag} does not apply to --task {args.task!r}; tasks that take it: "
                f"{', '.join(takers)}"
            )
        options[key] = value
    if "hidden" in accepted:
        options.setdefault("hidden", (50,))  # the paper's 64-50-10
    task = make(args.task, **options)
    lo, hi = min(lambdas + [1e-3]), max(lambdas + [1e2])
    cfg = ComplexityConfig(
        family=args.family,
        pivots=5 if args.pivots is None else args.pivots,
        draws=args.draws,
        lam_low=lo,
        lam_high=hi,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
    )
    per_epoch = max(1, task.num_examples("train") // task.batch_size)  # minibatches per epoch
    sep_steps = args.steps if args.steps is not None else (args.epochs or 100) * per_epoch
    hyper_steps = args.hyper_steps or max(1, (sep_steps * len(lambdas)) // (3 * cfg.draws))

    run_dir = RunDir.create(args.logdir, "complexity", args.family, args.seed)
    config = {
        "command": "complexity",
        "task": args.task,
        "task_options": options,
        "lambdas": lambdas,
        "separate_steps": sep_steps,
        "hyper_steps": hyper_steps,
        "seed": args.seed,
        "complexity": cfg,
        "prune_fractions": list(PRUNE_FRACTIONS),
        "prune_scope": args.prune_scope,
    }
    run_dir.write_config(config)
    logger = TensorBoardLogger(run_dir.path)
    try:
        t0 = time.perf_counter()
        hyper = train_hypernet(task, cfg, hyper_steps, args.seed, logger=logger)
        hyper_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        seps = {
            lam: train_separate(task, lam, sep_steps, args.seed, config=cfg, logger=logger)
            for lam in lambdas
        }
        sep_s = time.perf_counter() - t0
        fractions = list(PRUNE_FRACTIONS)
        rows: dict[str, dict[str, list[float]]] = {"hypernet": {}, "separate": {}}
        for lam in lambdas:
            for model, fit in (("hypernet", hyper), ("separate", seps[lam])):
                rows[model][f"{lam:g}"] = pruning_curve(
                    task, fit, lam, fractions, scope=args.prune_scope
                )
            for model in rows:
                for q, acc in zip(fractions, rows[model][f"{lam:g}"]):
                    logger.scalar(f"prune/{model}/lambda_{lam:g}", acc, round(100 * q))
        sep_evals = sum(f.grad_evals for f in seps.values())
        results = {
            "accuracy": rows,
            "prune_fractions": fractions,
            "prune_scope": args.prune_scope,
            "hypernet": {"grad_evals": hyper.grad_evals, "wall_s": hyper_s, "status": hyper.status},
            "separate": {
                "grad_evals": sep_evals,
                "wall_s": sep_s,
                "status": {f"{k:g}": f.status for k, f in seps.items()},
            },
            "compute_ratio": hyper.grad_evals / sep_evals,
        }
        run_dir.write_results(results)
        table = format_table(fractions, rows, lambdas)
        header = (
            f"# Complexity control on {args.task} (test accuracy vs pruned fraction, "
            f"{args.prune_scope} SNR ranking)\n\n"
            f"hypernetwork ({args.family}): {hyper.grad_evals} gradient evaluations; "
            f"separate nets: {sep_evals} ({len(lambdas)} × {sep_steps}); "
            f"ratio {hyper.grad_evals / sep_evals:.3f}\n\n"
        )
        from selfref.runs import atomic_write_text

        atomic_write_text(run_dir.path / "results.md", header + table + "\n")
        _plot(run_dir.path / "accuracy_vs_pruning.png", fractions, rows, lambdas)
    finally:
        logger.close()
    print(header + table)
    print(f"\nrun directory: {run_dir.path}")
    print(f"tensorboard --logdir {run_dir.path}")
    return 0
