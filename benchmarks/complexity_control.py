"""Complexity control (Grebenkova et al. 2021): one hypernetwork vs separate nets on a λ grid.

Task: digits-mlp with the paper's MLP 64→50→10 (sigmoid, batch 128). Side by side in one
run, same seed and optimizer (Adam, lr 0.01, cosine decay):

- ``separate``: one mean-field variational network per λ ∈ {1e-3, 1e-2, 1e-1, 1, 10, 100},
  each ``--epochs`` epochs, one weight sample per minibatch (cost 1 per minibatch);
- ``hypernet``: one linear hypernetwork λ → (μ, log σ) trained with S = 5 log-uniform λ
  draws per minibatch (cost 5 per minibatch) for as many minibatches as keep its cost at a
  third of the separate networks' total;
- ``plain``: a non-variational network (cross-entropy only, same steps as one separate
  net), pruned by weight magnitude, for context (the paper's non-variational baseline).

Reported for every λ (averaged over ``--seeds`` seeds): test accuracy of the mean network,
unpruned and with 90% of the weights pruned by SNR μ²/σ² (biases kept) under both rankings —
``global`` (one ranking over all weights, the paper's text) and ``layer`` (each layer ranked
on its own, as in the authors' code); the differences hypernet − separate, each with its
standard error over seeds; the compute ratio.

Targets (two-sided: the hypernetwork should *be* the family of separately trained models, not
beat or lose to it): at every λ, the hypernetwork's model within 1 point of that λ's
separately trained net, unpruned (``max_abs_acc_diff <= 0.01``), at 90% global pruning
(``max_abs_prune90_diff <= 0.01``) and at 90% per-layer pruning
(``max_abs_prune90_layer_diff <= 0.01``); compute ratio ``<= 1/3``. Means over λ are
reported without a target: one λ where either model collapses (at λ = 100 the separate net
falls to chance) can carry a mean.

Run: ``.venv/bin/python -m benchmarks.complexity_control [--quick] [--device cuda]``
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, base_parser, target, write_result
from selfref.methods.complexity import (
    PRUNE_FRACTIONS,
    PRUNE_SCOPES,
    ComplexityConfig,
    apply_mask,
    pruning_curve,
    snr_prune_mask,
    steps_for_epochs,
    train_hypernet,
    train_separate,
)
from selfref.tasks import make
from selfref.tasks.base import resolve_device
from selfref.train import train

LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
GLOBAL, LAYER = PRUNE_SCOPES  # the two SNR rankings


def _standard_error(xs: list[float]) -> float:
    """Standard error of the mean of ``xs`` (0 for a single value)."""
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="per separate net (100; quick 8)")
    p.add_argument("--family", default="linear", choices=["linear", "piecewise"])
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..n-1 (default 3; quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    task = make("digits-mlp", hidden=(50,), device=device)
    epochs = args.epochs or (8 if args.quick else 100)
    sep_steps = steps_for_epochs(task, epochs)
    cfg = ComplexityConfig(family=args.family, lr=args.lr, lr_schedule="cosine")
    hyper_steps = max(1, sep_steps * len(LAMBDAS) // (3 * cfg.draws))

    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    # per_seed[scope][model][λ] = one accuracy-vs-pruned-fraction curve per seed
    per_seed: dict[str, dict[str, dict[str, list[list[float]]]]] = {
        scope: {"hypernet": {}, "separate": {}} for scope in (GLOBAL, LAYER)
    }
    walls = {"hyper": 0.0, "separate": 0.0}
    evals = {"hyper": 0, "separate": 0}
    status: dict[str, str] = {}
    plain_acc, plain90, plain90_layer = [], [], []
    for seed in seeds:
        t0 = time.perf_counter()
        hyper = train_hypernet(task, cfg, hyper_steps, seed)
        walls["hyper"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        seps = {lam: train_separate(task, lam, sep_steps, seed, config=cfg) for lam in LAMBDAS}
        walls["separate"] += time.perf_counter() - t0
        evals["hyper"] += hyper.grad_evals
        evals["separate"] += sum(f.grad_evals for f in seps.values())
        status[f"hyper/s{seed}"] = hyper.status
        status.update({f"{k:g}/s{seed}": f.status for k, f in seps.items()})
        for lam in LAMBDAS:
            for model, fit in (("hypernet", hyper), ("separate", seps[lam])):
                for scope in (GLOBAL, LAYER):
                    acc = pruning_curve(task, fit, lam, scope=scope)
                    per_seed[scope][model].setdefault(f"{lam:g}", []).append(acc)
        plain = train(task, "adam", {"lr": args.lr}, sep_steps, seed).params
        zeros = {k: torch.zeros_like(v) for k, v in plain.items()}  # log σ = 0: SNR = |w|²
        plain_acc.append(task.evaluate(plain, "test")["accuracy"])
        pruned = apply_mask(plain, snr_prune_mask(plain, zeros, 0.9))
        plain90.append(task.evaluate(pruned, "test")["accuracy"])
        pruned = apply_mask(plain, snr_prune_mask(plain, zeros, 0.9, scope=LAYER))
        plain90_layer.append(task.evaluate(pruned, "test")["accuracy"])

    n = len(seeds)
    metrics: dict[str, float] = {}
    kinds = {"acc": (GLOBAL, 0), "prune90": (GLOBAL, 9), "prune90_layer": (LAYER, 9)}
    diffs: dict[str, list[float]] = {k: [] for k in kinds}
    for lam in LAMBDAS:
        key = f"{lam:g}"
        for kind, (scope, j) in kinds.items():
            h = [c[j] for c in per_seed[scope]["hypernet"][key]]
            sep = [c[j] for c in per_seed[scope]["separate"][key]]
            d = [a - b for a, b in zip(h, sep)]
            metrics[f"hyper_{kind}_lambda_{key}"] = sum(h) / n
            metrics[f"separate_{kind}_lambda_{key}"] = sum(sep) / n
            metrics[f"{kind}_diff_lambda_{key}"] = sum(d) / n
            metrics[f"{kind}_diff_se_lambda_{key}"] = _standard_error(d)
            diffs[kind].append(sum(d) / n)
    for kind, ds in diffs.items():
        metrics[f"min_{kind}_diff"] = min(ds)
        metrics[f"max_{kind}_diff"] = max(ds)
        metrics[f"max_abs_{kind}_diff"] = max(abs(d) for d in ds)
        metrics[f"mean_{kind}_diff"] = sum(ds) / len(ds)
    metrics["compute_ratio"] = evals["hyper"] / evals["separate"]
    metrics["hyper_grad_evals"] = evals["hyper"] / n
    metrics["separate_grad_evals"] = evals["separate"] / n
    metrics["hyper_wall_s"] = walls["hyper"] / n
    metrics["separate_wall_s"] = walls["separate"] / n
    metrics["plain_acc"] = sum(plain_acc) / n
    metrics["plain_prune90_acc"] = sum(plain90) / n
    metrics["plain_prune90_layer_acc"] = sum(plain90_layer) / n
    targets = {
        "max_abs_acc_diff": target(metrics["max_abs_acc_diff"], "<= 0.01"),
        "max_abs_prune90_diff": target(metrics["max_abs_prune90_diff"], "<= 0.01"),
        "max_abs_prune90_layer_diff": target(metrics["max_abs_prune90_layer_diff"], "<= 0.01"),
        "compute_ratio": target(metrics["compute_ratio"], "<= 0.3334"),
    }
    curves = {
        scope: {
            model: {
                key: [sum(c[j] for c in runs) / n for j in range(len(PRUNE_FRACTIONS))]
                for key, runs in by_lam.items()
            }
            for model, by_lam in per_model.items()
        }
        for scope, per_model in per_seed.items()
    }
    config = {
        "task": "digits-mlp 64-50-10 sigmoid, batch 128",
        "lambdas": list(LAMBDAS),
        "epochs_separate": epochs,
        "steps_separate": sep_steps,
        "steps_hyper": hyper_steps,
        "complexity": asdict(cfg),
        "seeds": seeds,
        "metrics_are": "test accuracies averaged over seeds",
        "device": str(device),
        "threads": args.threads,
        "quick": args.quick,
        "split": "test",
        "prune_scopes": {
            GLOBAL: "one SNR ranking over all weights (the paper's text)",
            LAYER: "each layer ranked on its own (the authors' code, VarHyperNet delete_10)",
        },
        "accuracy_vs_pruned_fraction": curves,
        "accuracy_vs_pruned_fraction_per_seed": per_seed,
        "status": status,
    }
    out = args.out or (RESULTS_DIR / "complexity_control.quick.json" if args.quick else None)
    return write_result("complexity_control", config, metrics, targets, out=out)


if __name__ == "__main__":
    main()
