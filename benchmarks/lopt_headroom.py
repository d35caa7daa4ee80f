"""How far below tuned Adam a schedule or an oracle gets on the held-out suite (its targets).

The held-out suite (:mod:`benchmarks.lopt_heldout`) asks a learned optimizer for a final test
loss at most 0.9× tuned Adam's in the median task. This benchmark measures what tuning
alone buys on the same tasks, horizons, seeds and grids, with Adam's update unchanged:

- ``adam``: tuned Adam with a constant learning rate (chosen on val; the suite's reference);
- ``adam_cosine``: Adam under a cosine schedule annealed to 0 at the last step
  (:func:`selfref.meta.baselines.schedule_factor`), its learning rate chosen on val on the
  same grid, widened off an edge;
- ``adam_early_stop``: constant-lr Adam with early stopping on val — each run keeps its
  weights from the one of 50 evenly spaced steps with the lowest whole-val-split loss, and the
  learning rate is chosen on that early-stopped val loss (the grid widened off an edge this
  choice lies on, too)
  (:func:`selfref.meta.baselines.early_stopped`). A method, not an oracle: it reads val as the
  learned optimizer may, though the whole split where the optimizer reads minibatches;
- ``oracle_constant`` and ``oracle_cosine``: the learning rate of each with the lowest mean
  **test** loss. They are bounds on what choosing a learning rate could give (a method that
  chose on test would be cheating), not methods;
- ``learned``: the learned optimizer's row of a ``lopt_heldout`` result (``--heldout``, by
  default the committed one), where its task and steps are the ones measured here.

For each, per task: the ratio of its mean final test loss over the seeds to tuned Adam's;
over tasks: the fraction at or below 1, the median and the geometric mean — the suite's
summaries. No targets: the numbers say how much of the suite's 0.9 is within reach of a
learning rate and a schedule.

Run: ``python -m benchmarks.lopt_headroom`` (``--x10``: also at 10× the meta-training
horizon, about three times as long; ``--quick``: three tasks, short horizons, a 4-point grid).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, base_parser, write_result
from benchmarks.lopt_heldout import (
    LR_GRID,
    SEEDS,
    SUITE,
    ratio_summary,
    result_test_losses,
    task_table,
    tuned,
)
from selfref.meta.baselines import log_grid
from selfref.meta.family import TaskFamily
from selfref.tasks.distribution import build_task

T_META = 200  # the shipped preset's inner_steps: the horizons of the held-out suite
COLUMNS = ("adam_cosine", "adam_early_stop", "oracle_constant", "oracle_cosine", "learned")


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--heldout",
        default=str(RESULTS_DIR / "lopt_heldout.json"),
        help="lopt_heldout result for the learned column (default: the committed one)",
    )
    p.add_argument("--x10", action="store_true", help="also at 10x the meta-training horizon")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    suite, lrs, t_meta, mults = list(SUITE), LR_GRID, T_META, [None] + ([10] if args.x10 else [])
    if args.quick:
        suite, lrs, t_meta, mults = suite[:3], log_grid(1e-3, 1.0, 4), 25, [None]
    learned = (
        {cell: v["learned"] for cell, v in result_test_losses(args.heldout).items()}
        if not args.quick
        else {}
    )
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for ht in suite:
        family = TaskFamily(build_task(ht.spec))
        for mult in mults:
            steps = t_meta * (mult or ht.horizon_mult)
            const = tuned(family, "adam", steps, lrs, None, widen_early_stop=True)
            cos = tuned(family, "adam", steps, lrs, None, schedule="cosine")
            adam = const["test"]["mean"]
            row: dict[str, Any] = {
                "task": ht.name,
                "steps": steps,
                "horizon_mult": mult or ht.horizon_mult,
                "adam": {"lr": const["setting"]["lr"], "test": adam,
                         "lr_on_edge": const["lr_on_edge"]},
                "adam_cosine": {"lr": cos["setting"]["lr"], "test": cos["test"]["mean"],
                                "lr_on_edge": cos["lr_on_edge"]},
                "adam_early_stop": {"lr": const["early_stop"]["setting"]["lr"],
                                    "test": const["early_stop"]["test"]["mean"],
                                    "stop_steps": const["early_stop"]["stop_steps"],
                                    "lr_on_edge": const["early_stop"]["lr_on_edge"]},
                "oracle_constant": {"lr": const["test_oracle"]["setting"]["lr"],
                                    "test": const["test_oracle"]["test_mean"]},
                "oracle_cosine": {"lr": cos["test_oracle"]["setting"]["lr"],
                                  "test": cos["test_oracle"]["test_mean"]},
            }  # fmt: skip
            if (ht.name, steps) in learned:
                row["learned"] = {"test": learned[(ht.name, steps)]}
            for col in COLUMNS:
                if col in row:
                    row[col]["ratio"] = row[col]["test"] / adam
            rows.append(row)
            print(
                f"{ht.name} x{row['horizon_mult']}: adam {adam:.4f} "
                + " ".join(f"{c} {row[c]['ratio']:.3f}" for c in COLUMNS if c in row),
                flush=True,
            )
    metrics: dict[str, Any] = {"wall_s": time.perf_counter() - t0}
    for group, mult in (("main", None), ("x10", 10)):
        group_rows = [r for r in rows if (mult is None) == (r["horizon_mult"] != 10)]
        if not group_rows:
            continue
        for col in COLUMNS:
            ratios = [r[col]["ratio"] for r in group_rows if col in r]
            if len(ratios) == len(group_rows):
                metrics.update({f"{group}/{col}/{k}": v for k, v in ratio_summary(ratios).items()})
        metrics[f"{group}/baseline_lr_on_edge"] = sum(
            r["adam"]["lr_on_edge"]
            + r["adam_cosine"]["lr_on_edge"]
            + r["adam_early_stop"]["lr_on_edge"]
            for r in group_rows
        )
    config = {
        "t_meta": t_meta,
        "seeds": list(SEEDS),
        "lr_grid": [lrs[0], lrs[-1], len(lrs)],
        "quick": args.quick,
        "heldout": None if args.quick else args.heldout,
        "tasks": task_table(suite),
        "per_task": rows,
    }
    out = args.out or (None if not args.quick else "benchmarks/results/lopt_headroom.quick.json")
    write_result("lopt_headroom", config, metrics, {}, out)


if __name__ == "__main__":
    main()
