"""Does a learned optimizer's step follow the step size each task needs?

Tuned Adam's learning rate is chosen per task; a learned optimizer must find its step during
the run. The held-out suite's losses are mostly underfits where tuned Adam's rate is high
(``experiments/rounds/round35.md``, ``round38.md``), so this diagnostic measures the one
mechanism directly, on tasks outside both evaluation suites:

- **design tasks**: tasks of the meta-training distribution (the ``lopt`` preset's:
  ``label_noise_prob = 0.6``) at the design seeds above its meta-validation seeds
  (:data:`~selfref.meta.problems.task_distribution.DESIGN_TASK_SEED_BASE`), as the rounds'
  design runs draw them;
- **xor tasks** (:data:`XOR_TASKS`): the parity generator on hand-picked MLPs of the
  meta-training family, a loss on a plateau at chance until the hidden units form, where
  tuned Adam's rate is 0.02-0.2 (round 38's probe).

Per task: tuned Adam (the held-out suite's 13-point grid, widened off an edge, 3 seeds) and its
learning rate; each checkpoint's run (the same seeds), its test-loss ratio to tuned Adam, and
its step: the time average of its mean log step ``log α + a_T + s_i`` over the run. Adam's
step on its normalized direction is its learning rate, and the learned step multiplies the
same direction (plus a bounded correction), so the two are in the same units.

Per checkpoint: the least-squares slope of the learned log step on log tuned-Adam rate over
all tasks (1: the step moves with the task's need one for one; 0: one step for every task), the
correlation, and the mean gap (learned minus Adam, in nats) on the tasks whose tuned rate is at
least 0.02 and on those at most 2e-3. A scatter plot (``--plot``) shows both against the
identity line.

Target (a goal for the mechanism, not a suite target): slope ≥ 0.5 for the first checkpoint.

Run: ``python -m benchmarks.lopt_steptrack`` (``--checkpoints A.pt B.pt``, default the shipped
one; ``--design-tasks N``; ``--workers N``: processes of one thread each; ``--quick``: two
design tasks and two xor tasks at 100 steps, Adam on a 4-point grid).
"""

from __future__ import annotations

import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.common import RESULTS_DIR, base_parser, target, write_result
from benchmarks.lopt_heldout import LR_GRID, run_learned, tuned
from selfref import checkpoints
from selfref.meta.baselines import log_grid
from selfref.meta.family import TaskFamily
from selfref.meta.problems.task_distribution import DESIGN_TASK_SEED_BASE
from selfref.net.optimizer import default_checkpoint
from selfref.tasks.distribution import DistributionConfig, TaskDistribution, TaskSpec, build_task

# (hidden, activation, inputs, data seed): round 38's probe
XOR_TASKS: tuple[tuple[tuple[int, ...], str, int, int], ...] = (
    ((16,), "tanh", 4, 1),
    ((32,), "relu", 6, 2),
    ((16, 16), "tanh", 4, 3),
    ((24,), "sigmoid", 4, 4),
    ((32, 32), "relu", 8, 5),
    ((12,), "tanh", 3, 6),
    ((48,), "sigmoid", 6, 7),
    ((20, 20), "sigmoid", 5, 8),
)
HIGH_LR, LOW_LR = 0.02, 2e-3  # the gap is reported on tasks at or above / at or below these

_CKS: dict[str, dict[str, Any]] = {}  # the checkpoints, loaded once per worker process


def xor_spec(hidden: tuple[int, ...], activation: str, inputs: int, seed: int) -> TaskSpec:
    """The spec of one xor task of :data:`XOR_TASKS`."""
    return TaskSpec("xor", data_seed=seed, hidden=hidden, activation=activation, batch_size=32,
                    n_samples=1000, n_features=inputs, n_classes=2)  # fmt: skip


def design_specs(n: int) -> list[TaskSpec]:
    """The first ``n`` design tasks (the rounds' design runs draw the same ones)."""
    dist = TaskDistribution(DistributionConfig(label_noise_prob=0.6))
    return [dist.sample(DESIGN_TASK_SEED_BASE + i) for i in range(n)]


def mean_log_step(curve: list[list[float]] | list[tuple[int, float]]) -> float:
    """The time average of a ``log_step_curve`` [(step, mean log step), ...]: the trapezoid
    rule over its steps (its points need not be evenly spaced)."""
    if len(curve) < 2:
        return float(curve[0][1])
    area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(curve[:-1], curve[1:]))
    return float(area / (curve[-1][0] - curve[0][0]))


def fit_line(x: list[float], y: list[float]) -> dict[str, float]:
    """Least-squares slope and intercept of y on x, and their correlation.

    Example:
        >>> fit_line([0.0, 1.0, 2.0], [1.0, 2.0, 3.0])
        {'slope': 1.0, 'intercept': 1.0, 'r': 1.0}
    """
    if len(x) < 2 or len(set(x)) < 2:
        raise ValueError("a line needs at least two distinct x values")
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((a - mx) ** 2 for a in x)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    syy = sum((b - my) ** 2 for b in y)
    slope = sxy / sxx
    r = sxy / math.sqrt(sxx * syy) if syy > 0 else 0.0
    return {"slope": slope, "intercept": my - slope * mx, "r": r}


def init_worker(paths: list[str], threads: int) -> None:
    """Load the checkpoints at ``paths`` once for :func:`run_task` in this process."""
    torch.set_num_threads(threads)
    for p in paths:
        _CKS[p] = checkpoints.load_meta(p)


def run_task(job: tuple[str, dict[str, Any], int, bool]) -> dict[str, Any]:
    """One task (kind, spec, steps, quick): tuned Adam and the run of every checkpoint that
    :func:`init_worker` loaded."""
    kind, spec_dict, steps, quick = job
    spec = TaskSpec.from_dict(spec_dict)
    family = TaskFamily(build_task(spec))
    grid = log_grid(1e-3, 1.0, 4) if quick else LR_GRID
    adam = tuned(family, "adam", steps, grid, None)
    row: dict[str, Any] = {
        "kind": kind,
        "task": spec.label(),
        "spec": spec.to_dict(),
        "steps": steps,
        "adam_lr": adam["setting"]["lr"],
        "adam_lr_on_edge": adam["lr_on_edge"],
        "adam_test": adam["test"]["mean"],
        "learned": {},
    }
    for path, ck in _CKS.items():
        out = run_learned(ck, family, steps, packed=True)
        row["learned"][path] = {
            "test": out["test"]["mean"],
            "train": out["train"]["mean"],
            "ratio": out["test"]["mean"] / adam["test"]["mean"],
            "mean_log_step": mean_log_step(out["log_step_curve"]),
            "final_log_step": float(out["log_step_curve"][-1][1]),
            "log_step_curve": out["log_step_curve"],
            "train_loss_curve": out["train_loss_curve"],
            "diverged": out["diverged"],
        }
    return row


def summarize(rows: list[dict[str, Any]], path: str) -> dict[str, float]:
    """One checkpoint's tracking numbers over ``rows`` (see the module docstring)."""
    x = [math.log(r["adam_lr"]) for r in rows]
    y = [r["learned"][path]["mean_log_step"] for r in rows]
    out = fit_line(x, y)
    for name, keep in (("high_lr", lambda lr: lr >= HIGH_LR), ("low_lr", lambda lr: lr <= LOW_LR)):
        gaps = [b - a for a, b, r in zip(x, y, rows) if keep(r["adam_lr"])]
        out[f"{name}_tasks"] = len(gaps)
        if gaps:
            out[f"{name}_gap_nats"] = statistics.fmean(gaps)
    ratios = [r["learned"][path]["ratio"] for r in rows]
    out["le_adam_frac"] = sum(q <= 1 for q in ratios) / len(ratios)
    out["median_ratio"] = statistics.median(ratios)
    return out


def plot(rows: list[dict[str, Any]], paths: list[str], file: Path) -> None:
    """Learned mean log step against log tuned-Adam rate, per checkpoint, with y = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 5.0))
    x = [math.log(r["adam_lr"]) for r in rows]
    lo, hi = min(x) - 0.5, max(x) + 0.5
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="step = tuned Adam's rate")
    for i, path in enumerate(paths):
        for kind, marker in (("design", "o"), ("xor", "^")):
            pts = [(a, r["learned"][path]["mean_log_step"])
                   for a, r in zip(x, rows) if r["kind"] == kind]  # fmt: skip
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=f"C{i}", alpha=0.75,
                           label=f"{Path(path).name} ({kind})")  # fmt: skip
    ax.set_xlabel("log tuned-Adam learning rate")
    ax.set_ylabel("learned mean log step over the run")
    ax.set_title("Does the learned step follow the task's step size?")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", default=None, help="default: the shipped one")
    p.add_argument("--design-tasks", type=int, default=22)
    p.add_argument("--steps", type=int, default=600, help="steps per run (3x the horizon)")
    p.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    p.add_argument("--plot", default=None, help="PNG of the scatter (default beside --out)")
    args = p.parse_args()
    if args.workers < 1 or args.design_tasks < 0 or args.steps < 2:
        p.error("--workers >= 1, --design-tasks >= 0 and --steps >= 2 are required")
    paths = [str(c) for c in (args.checkpoints or [default_checkpoint()])]
    n_design, xor, steps = args.design_tasks, list(XOR_TASKS), args.steps
    if args.quick:
        n_design, xor, steps = 2, xor[:2], 100
    jobs = [("design", s.to_dict(), steps, args.quick) for s in design_specs(n_design)]
    jobs += [("xor", xor_spec(*t).to_dict(), steps, args.quick) for t in xor]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers, initializer=init_worker, initargs=(paths, 1)) as pool:
        rows = list(tqdm(pool.map(run_task, jobs), total=len(jobs), desc="lopt_steptrack"))
    for r in rows:
        cells = " ".join(
            f"{Path(q).name} step {v['mean_log_step']:+.2f} ratio {v['ratio']:.3f}"
            for q, v in r["learned"].items()
        )
        print(f"{r['kind']:6s} {r['task']:32s} adam lr {r['adam_lr']:.2g} "
              f"(log {math.log(r['adam_lr']):+.2f}) | {cells}", flush=True)  # fmt: skip
    metrics: dict[str, Any] = {"wall_s": time.perf_counter() - t0, "tasks": len(rows)}
    metrics["adam_lr_on_edge"] = sum(r["adam_lr_on_edge"] for r in rows)
    for i, path in enumerate(paths):
        for group, sel in (("all", rows), ("design", [r for r in rows if r["kind"] == "design"]),
                           ("xor", [r for r in rows if r["kind"] == "xor"])):  # fmt: skip
            if len({r["adam_lr"] for r in sel}) >= 2:
                for k, v in summarize(sel, path).items():
                    metrics[f"c{i}/{group}/{k}"] = v
    targets = {"c0_slope": target(metrics["c0/all/slope"], ">= 0.5")} if not args.quick else {}
    out = args.out or (str(RESULTS_DIR / "lopt_steptrack.quick.json") if args.quick else None)
    config = {
        "checkpoints": paths,
        "steps": steps,
        "design_tasks": n_design,
        "xor_tasks": [list(t) for t in xor],
        "lr_grid": [1e-3, 1.0, 4] if args.quick else [min(LR_GRID), max(LR_GRID), len(LR_GRID)],
        "quick": args.quick,
        "per_task": rows,
    }
    write_result("lopt_steptrack", config, metrics, targets, out)
    png = Path(args.plot) if args.plot else Path(out or RESULTS_DIR / "lopt_steptrack.json")
    png = png.with_suffix(".png")
    plot(rows, paths, png)
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
