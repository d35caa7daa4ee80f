"""Round 38's diagnostic: learned optimizers against tuned Adam on eight parity (xor) tasks.

The tasks (:data:`benchmarks.lopt_steptrack.XOR_TASKS`) are the ``xor`` generator's (the
parity of the signs of 2 or 3 Gaussian inputs, a loss at chance until the hidden units form) on
hand-picked MLPs of the meta-training family (1-2 hidden layers of 12-48 relu, tanh or sigmoid
units; 3-8 inputs; batch 32; 1,000 examples). ``xor`` is in neither evaluation suite (see
``experiments/rounds/round38.md``). Each row prints tuned Adam's test loss (the held-out
suite's 13-point grid, widened off an edge, 3 seeds) and each checkpoint's, with its log10
ratio; ``--curves`` adds each checkpoint's mean log step over the run. Each task runs as
``benchmarks.lopt_steptrack`` runs it (:func:`~benchmarks.lopt_steptrack.run_task`), in this
process.

Run (from the repository root)::

    python -m experiments.rounds.round38_probe selfref/net/pretrained/lopt.pt X.pt
"""

from __future__ import annotations

import argparse
import json
import math

from benchmarks.lopt_steptrack import XOR_TASKS, init_worker, run_task, xor_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--curves", action="store_true")
    ap.add_argument("--out", default=None, help="JSON of the rows")
    args = ap.parse_args()
    init_worker(args.checkpoints, args.threads)  # the runs are lopt_steptrack's, in-process
    rows = []
    for task in XOR_TASKS:
        row = run_task(("xor", xor_spec(*task).to_dict(), args.steps, False))
        for v in row["learned"].values():
            v["log10_ratio"] = math.log10(v["ratio"])
        rows.append(row)
        cells = " | ".join(
            f"{v['test']:.3f} ({v['log10_ratio']:+.2f})" for v in row["learned"].values()
        )
        _, _, d, seed = task
        print(f"{row['task']}-d{d}-s{seed}".ljust(28) + f" adam {row['adam_test']:.3f} "
              f"(lr {row['adam_lr']:.2g}) | {cells}", flush=True)  # fmt: skip
        if args.curves:
            for path, v in row["learned"].items():
                steps = " ".join(f"{s}:{x:.1f}" for s, x in v["log_step_curve"])
                print(f"    {path}: log step {steps}")
    for path in args.checkpoints:
        ratios = [r["learned"][path]["log10_ratio"] for r in rows]
        wins = sum(x <= 0 for x in ratios)
        print(f"{path}: <= tuned Adam on {wins}/{len(rows)}, mean log10 ratio "
              f"{sum(ratios) / len(ratios):+.3f}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"steps": args.steps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
