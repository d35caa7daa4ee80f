"""Round 36: compose K36 from its kept members' exported optimizers, as the ensemble command
composes them (``selfref.commands.meta_train_ensemble.run_ensemble``: the ``ensemble`` core
over the members in seed order, then the recipe's config edit ``heldout_step_rate = 0.3``).

The round trained only the members it lacked (``experiments/rounds/round36.md``), so the kept
pair is composed here instead of by one command.

Run (from the repository root)::

    python -m experiments.rounds.round36_compose OUT.pt MEMBER_A/optimizer.pt MEMBER_B/optimizer.pt
"""

from __future__ import annotations

import argparse

from selfref import checkpoints
from selfref.meta.ensemble import ensemble_checkpoint
from selfref.net.optimizer import edited_checkpoint

EDIT = {"heldout_step_rate": 0.3}  # the lopt-ensemble preset's [ensemble] core_options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("members", nargs="+", help="the kept members' optimizer.pt, in seed order")
    args = ap.parse_args()
    composed = ensemble_checkpoint(args.members, parallel=2)
    composed = edited_checkpoint(composed, EDIT, "[ensemble] core_options")
    checkpoints.save(composed, args.out)
    print(args.out, [(m["seed"], m["best_step"], m["best_score"]) for m in composed["members"]])


if __name__ == "__main__":
    main()
