"""Round 22's design run: the held-out step rule's rate, chosen on the meta-training distribution.

Draws tasks from the distribution the shipped optimizer was meta-trained on (the ``lopt``
preset's: ``label_noise_prob = 0.6``) at seeds above the meta-validation seeds, so neither the
selection suite nor the held-out suite is read. Each task runs 600 steps (3x the meta-training
horizon); tuned Adam (the held-out suite's 13-point grid, widened off an edge) is the
reference. For each ``heldout_step_rate`` (0 = the shipped ensemble A as it is) it prints the
log10 of the learned test loss over tuned Adam's per task, and the mean over tasks.

Run (from the repository root)::

    python -m experiments.rounds.round22_design --tasks 10 --first 0 --rates 0,0.1,0.3,1
    python -m experiments.rounds.round22_design --tasks 12 --first 10 --rates 0,0.2,0.3,0.5

``--variants`` names other edits instead of rates, separated by ``;`` (``A``: none), e.g.
round 22b's ``--variants "A;heldout_step_rate=0.3;heldout_step_rate=0.3,heldout_step_horizon=200"``
and rounds 23 and 23b's (``experiments/rounds/round23.md``, ``round23b.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from benchmarks.lopt_heldout import LR_GRID, run_learned, tuned
from selfref import checkpoints
from selfref.commands.common import parse_task_options
from selfref.meta.family import TaskFamily
from selfref.meta.problems.task_distribution import DESIGN_TASK_SEED_BASE
from selfref.net.optimizer import default_checkpoint, with_core_options
from selfref.stats import paired_difference
from selfref.tasks.distribution import DistributionConfig, TaskDistribution, build_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--first", type=int, default=0, help="first design task index")
    ap.add_argument("--rates", default="0,0.1,0.3,1")
    ap.add_argument("--variants", default=None, help="edits instead of --rates ('A': none)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON of the per-task rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dist = TaskDistribution(DistributionConfig(label_noise_prob=0.6))
    ck = checkpoints.load_meta(default_checkpoint())
    # A: the shipped φ without the held-out step rule (the shipped file carries it since
    # round 22, so rate 0 and variant "A" turn it off explicitly)
    off = {"heldout_step_rate": 0.0}
    if args.variants:
        edits = {
            v: {**off, **(parse_task_options(v.split(",")) if v != "A" else {})}
            for v in args.variants.split(";")
        }
    else:
        edits = {r: {"heldout_step_rate": float(r)} for r in args.rates.split(",")}
    cks = {r: {**ck, "net": with_core_options(ck["net"], e)} for r, e in edits.items()}
    rows = []
    first = DESIGN_TASK_SEED_BASE + args.first  # above the 12 meta-validation seeds
    for seed in range(first, first + args.tasks):
        spec = dist.sample(seed)
        family = TaskFamily(build_task(spec))
        t0 = time.perf_counter()
        adam = tuned(family, "adam", args.steps, LR_GRID, None)
        row = {"seed": seed, "spec": spec.to_dict(), "adam_test": adam["test"]["mean"],
               "adam_lr": adam["setting"]["lr"], "log10_ratio": {}}  # fmt: skip
        for r in edits:
            test = run_learned(cks[r], family, args.steps)["test"]["mean"]
            row["log10_ratio"][r] = math.log10(test / adam["test"]["mean"])
        rows.append(row)
        ratios = " ".join(f"{r}:{v:+.3f}" for r, v in row["log10_ratio"].items())
        print(f"{seed} {spec.data} {spec.hidden} {spec.activation} lr={row['adam_lr']:.2g} "
              f"{ratios} {time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
    for r in edits:
        print(f"{r}: mean {sum(x['log10_ratio'][r] for x in rows) / len(rows):+.4f}")
    first = next(iter(edits))
    for r in list(edits)[1:]:  # paired against the first variant, task by task
        print(f"{r} - {first}: {_paired(rows, r, first)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


def _paired(rows: list[dict], r: str, first: str, tie: float = 0.005) -> str:
    """The paired summary of variant ``r`` against ``first`` over the tasks: mean difference
    of log10 ratios ± its standard error, how many tasks it lowers or raises by more than
    ``tie``, and the median difference (a mean carried by one task shows here)."""
    a, b = (
        torch.tensor([x["log10_ratio"][v] for x in rows], dtype=torch.float64) for v in (r, first)
    )
    diff = (a - b).tolist()
    if len(diff) < 2:
        return f"{diff[0]:+.4f} (one task)"
    lower, higher = sum(d < -tie for d in diff), sum(d > tie for d in diff)
    mean, se = paired_difference(a, b)
    return (
        f"mean {mean:+.4f} ± {se:.4f}, {lower} lower, {higher} higher, "
        f"median {statistics.median(diff):+.4f}"
    )


if __name__ == "__main__":
    main()
