"""Round 31's digits diagnostic: does a candidate adapt to the half of val it reads?

The selection score's digits part (``lopt_select --digits-unread``) splits digits-mlp's val
split into two fixed halves (:func:`benchmarks.lopt_select.unread_val_task`): the optimizer reads
half A during its run and is scored on half B. This script runs each candidate both ways (read
A, score B, as the score does; then read B, score A) at the score's budget and seeds, and
records the mean loss on the half it read and on the half it did not. A candidate that adapts
to what it reads is better on whichever half it reads; one that is merely worse on some images
is worse on the same half both ways. Nothing here enters a decision (``round31.md``).

Run (from the repository root)::

    python -m experiments.rounds.round31_halves --candidates selfref/net/pretrained/lopt.pt \
        R31.pt --out experiments/rounds/round31_halves.json
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.lopt_select import unread_val_task
from selfref.budget import Budget
from selfref.methods.learned import SelfRefMethod
from selfref.tasks import make


def both_ways(task):
    """The two unread-val tasks of ``task``: (read A, score B) as the score draws them, and the
    same halves swapped (read B, score A). ``lopt_select --digits-folds 2`` scores both."""
    return {
        "read A, score B": unread_val_task(task),
        "read B, score A": unread_val_task(task, swap=True),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--candidates", nargs="+", required=True, metavar="CHECKPOINT.pt")
    p.add_argument("--seeds", type=int, default=12, help="seeds 0..N-1 (the score's: 12)")
    p.add_argument("--budget", type=int, default=2000, help="gradient evaluations (2,000)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the JSON here as well as to stdout")
    args = p.parse_args()
    if args.seeds < 1 or args.budget < 1:
        raise SystemExit(f"--seeds and --budget must be >= 1, got {args.seeds}, {args.budget}")
    torch.set_num_threads(args.threads)
    out: dict = {"seeds": list(range(args.seeds)), "budget": args.budget, "runs": {}}
    for direction, task in both_ways(make("digits-mlp")).items():
        for ck in args.candidates:
            res = [SelfRefMethod(checkpoint=ck).run(task, Budget(args.budget, 100), seed=s)
                   for s in range(args.seeds)]  # fmt: skip
            row = {
                "read": sum(r.val_loss for r in res) / len(res),
                "scored": sum(r.test_loss for r in res) / len(res),
                "scored_per_seed": [float(r.test_loss) for r in res],
            }
            out["runs"][f"{direction} | {ck}"] = row
            print(f"{direction} | {ck}: read {row['read']:.4f} scored {row['scored']:.4f}",
                  flush=True)  # fmt: skip
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
