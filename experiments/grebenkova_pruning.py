"""Grebenkova, Bakhteev, Strijov 2021, pruning experiment on digits with the MLP 64→50→10.

One hypernetwork λ → (μ, log σ) per family (``linear`` and ``piecewise`` over K = 5
pivots), each trained once with S = 5 log-uniform draws of λ ∈ [1e-3, 1e2] per minibatch,
against separately trained variational networks at λ ∈ {1e-3, 1e-2, 1e-1, 1, 10, 100}; every
model is pruned by the signal-to-noise ratio μ²/σ² (0%, 10%, …, 90% of the weights, biases
kept) and its test accuracy recorded. ``--prune-scope global`` ranks all weights at once (the
paper's text), ``layer`` ranks each layer on its own (the authors' code, VarHyperNet
``code/src/mnist_utils.py``); ``both`` (the default) runs each family once per ranking. This
is a thin wrapper over ``selfref complexity``: one run directory per family and ranking under
``<logdir>/complexity/`` with config.json (its ``prune_scope``), results.json, results.md
(the table), accuracy_vs_pruning.png and TensorBoard scalars.

Run:
    .venv/bin/python experiments/grebenkova_pruning.py            # paper setting, ~minutes
    .venv/bin/python experiments/grebenkova_pruning.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import sys

from selfref.cli import main as selfref_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=100, help="epochs of each separate network")
    p.add_argument(
        "--families", nargs="+", default=["linear", "piecewise"], choices=["linear", "piecewise"]
    )
    p.add_argument("--pivots", type=int, default=5, help="K of the piecewise family")
    p.add_argument(
        "--prune-scope",
        default="both",
        choices=["global", "layer", "both"],
        help="SNR ranking over all weights, per layer (the authors' code), or both",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--logdir", default="logs")
    p.add_argument("--quick", action="store_true", help="5 epochs (a smoke run)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    epochs = 5 if args.quick else args.epochs
    scopes = ["global", "layer"] if args.prune_scope == "both" else [args.prune_scope]
    for family, scope in ((f, s) for f in args.families for s in scopes):
        code = selfref_main(
            [
                "complexity",
                "--task",
                "digits-mlp",
                "--hidden",
                "50",
                "--epochs",
                str(epochs),
                "--family",
                family,
                "--pivots",
                str(args.pivots),
                "--prune-scope",
                scope,
                "--seed",
                str(args.seed),
                "--device",
                args.device,
                "--logdir",
                args.logdir,
            ]
        )
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
