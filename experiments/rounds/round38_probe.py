"""Round 38's diagnostic: learned optimizers against tuned Adam on eight parity (xor) tasks.

The tasks (:data:`benchmarks.lopt_steptrack.XOR_TASKS`) are the ``xor`` generator's (the
parity of the signs of 2 or 3 Gaussian inputs, a loss at chance until the hidden units form) on
hand-picked MLPs of the meta-training family (1-2 hidden layers of 12-48 relu, tanh or sigmoid
units; 3-8 inputs; batch 32; 1,000 examples). ``xor`` is in neither evaluation suite (see
``experiments/rounds/round38.md``). Each row prints tuned Adam's test loss (the held-out
suite's 13-point grid, widened off an edge, 3 seeds) and each checkpoint's, with its log10
ratio; ``--curves`` adds each checkpoint's mean log step and training loss over the run.

Run (from the repository root)::

    python -m experiments.rounds.round38_probe selfref/net/pretrained/lopt.pt X.pt
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from benchmarks.lopt_heldout import LR_GRID, run_learned, tuned
from benchmarks.lopt_steptrack import XOR_TASKS, xor_spec
from selfref import checkpoints
from selfref.meta.family import TaskFamily
from selfref.tasks.distribution import build_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--curves", action="store_true")
    ap.add_argument("--out", default=None, help="JSON of the rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cks = {p: checkpoints.load_meta(p) for p in args.checkpoints}
    rows = []
    for hidden, act, d, seed in XOR_TASKS:
        spec = xor_spec(hidden, act, d, seed)
        family = TaskFamily(build_task(spec))
        t0 = time.perf_counter()
        adam = tuned(family, "adam", args.steps, LR_GRID, None)
        row = {"task": f"{spec.label()}-d{d}-s{seed}", "adam_test": adam["test"]["mean"],
               "adam_lr": adam["setting"]["lr"], "learned": {}}  # fmt: skip
        for path, ck in cks.items():
            run = run_learned(ck, family, args.steps, packed=True)
            row["learned"][path] = {
                "test": run["test"]["mean"],
                "train": run["train"]["mean"],
                "log10_ratio": math.log10(run["test"]["mean"] / adam["test"]["mean"]),
                "log_step_curve": run["log_step_curve"],
                "train_loss_curve": run["train_loss_curve"],
            }
        rows.append(row)
        cells = " | ".join(
            f"{v['test']:.3f} ({v['log10_ratio']:+.2f})" for v in row["learned"].values()
        )
        print(f"{row['task']:28s} adam {row['adam_test']:.3f} (lr {row['adam_lr']:.2g}) | "
              f"{cells}  {time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
        if args.curves:
            for path, v in row["learned"].items():
                steps = " ".join(f"{s}:{x:.1f}" for s, x in v["log_step_curve"])
                print(f"    {path}: log step {steps}")
    for path in cks:
        ratios = [r["learned"][path]["log10_ratio"] for r in rows]
        wins = sum(x <= 0 for x in ratios)
        print(f"{path}: <= tuned Adam on {wins}/{len(rows)}, mean log10 ratio "
              f"{sum(ratios) / len(ratios):+.3f}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"steps": args.steps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
