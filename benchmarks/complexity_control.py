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

Reported (averaged over ``--seeds`` seeds): test accuracy of the mean network at each λ,
unpruned and with 90% of the weights pruned by SNR μ²/σ² (biases kept); the differences
hypernet − separate; compute ratio.
Targets: the hypernet at most 1 point below the separate network at every λ
(``min_acc_diff >= -0.01``), compute ratio ``<= 1/3``, and no worse accuracy at 90% pruning
on average over λ (``mean_prune90_diff >= 0``). ``max_abs_acc_diff`` is reported beside it:
at large λ the separate networks collapse towards the prior, where the hypernetwork —
trained on the whole range at a third of the cost — is not as converged.

Run: ``.venv/bin/python -m benchmarks.complexity_control [--quick] [--device cuda]``
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, base_parser, target, write_result
from selfref.methods.complexity import (
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
    curves: dict[str, dict[str, list[float]]] = {"hypernet": {}, "separate": {}}
    walls = {"hyper": 0.0, "separate": 0.0}
    evals = {"hyper": 0, "separate": 0}
    status: dict[str, str] = {}
    plain_acc, plain90 = [], []
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
                acc = pruning_curve(task, fit, lam)
                prev = curves[model].get(f"{lam:g}", [0.0] * len(acc))
                curves[model][f"{lam:g}"] = [a + b / len(seeds) for a, b in zip(prev, acc)]
        plain = train(task, "adam", {"lr": args.lr}, sep_steps, seed).params
        zeros = {k: torch.zeros_like(v) for k, v in plain.items()}  # log σ = 0: SNR = |w|²
        plain_acc.append(task.evaluate(plain, "test")["accuracy"])
        pruned = apply_mask(plain, snr_prune_mask(plain, zeros, 0.9))
        plain90.append(task.evaluate(pruned, "test")["accuracy"])

    metrics: dict[str, float] = {}
    diffs, diffs90 = [], []
    for lam in LAMBDAS:
        h, s = curves["hypernet"][f"{lam:g}"], curves["separate"][f"{lam:g}"]
        metrics[f"hyper_acc_lambda_{lam:g}"] = h[0]
        metrics[f"separate_acc_lambda_{lam:g}"] = s[0]
        metrics[f"hyper_prune90_lambda_{lam:g}"] = h[9]
        metrics[f"separate_prune90_lambda_{lam:g}"] = s[9]
        diffs.append(h[0] - s[0])
        diffs90.append(h[9] - s[9])
    metrics["min_acc_diff"] = min(diffs)
    metrics["max_abs_acc_diff"] = max(abs(d) for d in diffs)
    metrics["mean_prune90_diff"] = sum(diffs90) / len(diffs90)
    metrics["min_prune90_diff"] = min(diffs90)
    metrics["compute_ratio"] = evals["hyper"] / evals["separate"]
    metrics["hyper_grad_evals"] = evals["hyper"] / len(seeds)
    metrics["separate_grad_evals"] = evals["separate"] / len(seeds)
    metrics["hyper_wall_s"] = walls["hyper"] / len(seeds)
    metrics["separate_wall_s"] = walls["separate"] / len(seeds)
    metrics["plain_acc"] = sum(plain_acc) / len(seeds)
    metrics["plain_prune90_acc"] = sum(plain90) / len(seeds)
    targets = {
        "min_acc_diff": target(metrics["min_acc_diff"], ">= -0.01"),
        "compute_ratio": target(metrics["compute_ratio"], "<= 0.3334"),
        "mean_prune90_diff": target(metrics["mean_prune90_diff"], ">= 0"),
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
        "accuracy_vs_pruned_fraction": curves,
        "status": status,
    }
    out = args.out or (RESULTS_DIR / "complexity_control.quick.json" if args.quick else None)
    return write_result("complexity_control", config, metrics, targets, out=out)


if __name__ == "__main__":
    main()
