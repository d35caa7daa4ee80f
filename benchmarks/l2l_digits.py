"""Quality of the L2L LSTM on the digits MLP (Andrychowicz et al. 2016, section 3.2).

Metrics: mean full-train-split loss after 100 steps on held-out instances (initializations
and minibatch orders) for the learned LSTM and for each baseline at its grid-tuned learning
rate (grid 10^-4 … 10^2, ``experiments.l2l_digits.LR_GRID``), and beside it the val- and
test-split loss of the same final weights (``learned_over_best_baseline_<split>_100``: over
the baseline that is best on that split); the learned optimizer's loss at step 200 over its
loss at step 100; the generalization checks (40 hidden, two layers, ReLU).

Targets: the learned optimizer's training loss at step 100 at or below the *best* tuned
baseline's (``learned_over_best_baseline_100 <= 1``; the ratio to Adam is reported beside
it); no divergence past the meta-training horizon (``learned_200_over_100 <= 1``); no
baseline's tuned learning rate on an end of its grid (``baseline_lrs_on_grid_edge <= 0``;
the default setting also raises after writing the JSON if one is — a best on an edge means
the grid was too narrow to tune it). Val and test loss are reported without a target: the
paper's criterion is training loss.

The learned optimizer is the packaged checkpoint ``selfref/net/pretrained/lstm_digits-mlp.pt``
(made by ``python -m experiments.l2l_digits --export``) unless ``--meta-train`` is given,
which meta-trains here with experiments/configs/l2l_digits.json (slow on a CPU).

Usage: python -m benchmarks.l2l_digits [--quick] [--meta-train] [--device cuda]
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from benchmarks.common import (
    RESULTS_DIR,
    base_parser,
    check_not_on_edge,
    grid_edge,
    target,
    write_result,
)
from experiments.l2l_digits import load_config, run
from selfref.net.optimizer import PRETRAINED_DIR


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--meta-train", action="store_true", help="meta-train instead of loading")
    p.add_argument("--checkpoint", default=None, help="checkpoint to evaluate")
    p.add_argument("--export", action="store_true", help="also write the packaged checkpoint")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if device == "auto":
        device = "cpu"
    ck = None
    if not args.meta_train:
        ck = Path(args.checkpoint) if args.checkpoint else PRETRAINED_DIR / "lstm_digits-mlp.pt"
        if not ck.is_file():
            raise SystemExit(f"no checkpoint {ck}; pass --meta-train or --checkpoint")
    export = PRETRAINED_DIR / "lstm_digits-mlp.pt" if args.export else None
    res = run(args.quick, device, checkpoint=ck, export=export)
    adam = res["baselines"]["adam"]["train_loss"]
    best_name = res["best_baseline"]
    best = res["baselines"][best_name]
    learned = res["learned"]
    g200 = res["generalization"]["steps_200"]
    metrics: dict[str, float] = {}
    best_on_split: dict[str, str] = {}
    for split in ("train", "val", "test"):
        metrics[f"learned_{split}_loss_100"] = learned[f"{split}_loss"]
        for k, v in res["baselines"].items():
            metrics[f"{k}_{split}_loss_100"] = v[f"{split}_loss"]
        # against the baseline that is best on this split (by train loss: ``best_name``)
        split_best = min(res["baselines"], key=lambda k: res["baselines"][k][f"{split}_loss"])
        best_on_split[split] = split_best
        metrics[f"learned_over_best_baseline_{split}_100"] = (
            learned[f"{split}_loss"] / res["baselines"][split_best][f"{split}_loss"]
        )
    metrics["learned_train_loss_100"] = learned["train_loss"]
    metrics["learned_over_best_baseline_100"] = learned["train_loss"] / best["train_loss"]
    metrics["learned_over_adam_100"] = learned["train_loss"] / adam
    metrics["learned_train_loss_200"] = g200["learned_train_loss"]
    metrics["adam_train_loss_200"] = g200["adam_train_loss"]
    metrics["best_baseline_train_loss_200"] = g200["best_baseline_train_loss"]
    metrics["learned_200_over_100"] = g200["learned_train_loss"] / learned["train_loss"]
    edges = {}
    for k, v in res["baselines"].items():
        metrics[f"{k}_lr"] = v["lr"]
        edges[k] = grid_edge(res["lr_grid"], v["lr"])
    metrics["baseline_lrs_on_grid_edge"] = float(sum(e is not None for e in edges.values()))
    for gname, g in res["generalization"].items():
        if gname == "steps_200":
            continue
        metrics[f"{gname}_learned_train_loss"] = g["learned_train_loss"]
        metrics[f"{gname}_adam_train_loss"] = g["adam_train_loss"]
        metrics[f"{gname}_best_baseline_train_loss"] = g["best_baseline_train_loss"]
    cfg = load_config(args.quick)
    config = {
        "device": device,
        "quick": args.quick,
        "steps": cfg["steps"],
        "test_instances": cfg["test_seeds"],
        "tune_instances": cfg["tune_seeds"],
        "checkpoint": str(ck) if ck else None,
        "meta": res.get("meta_config"),
        "meta_train_grad_evals": res.get("meta_train_grad_evals"),
        "checkpoint_best_step": res.get("best_step"),
        "best_baseline": best_name,
        "best_baseline_is": "the tuned baseline with the lowest train loss at step 100",
        "best_baseline_on_split": best_on_split,
        "lr_grid": res["lr_grid"],
        "lr_on_grid_edge": edges,
        "tuning_log10_train_loss": {
            k: {f"{lr:.4g}": sc for lr, sc in v["scores"].items()} for k, v in res["tuning"].items()
        },
    }
    diverged = g200["learned_diverged"] or not math.isfinite(g200["learned_train_loss"])
    targets = {
        "learned_over_best_baseline_100": target(
            metrics["learned_over_best_baseline_100"], "<= 1.0"
        ),
        "learned_200_over_100": target(
            math.inf if diverged else metrics["learned_200_over_100"], "<= 1.0"
        ),
        "baseline_lrs_on_grid_edge": target(metrics["baseline_lrs_on_grid_edge"], "<= 0"),
    }
    out = args.out or (RESULTS_DIR / "l2l_digits.quick.json" if args.quick else None)
    write_result("l2l_digits", config, metrics, targets, out=out)
    if not args.quick:  # after writing, so the numbers are kept
        for k, v in res["baselines"].items():
            check_not_on_edge(res["lr_grid"], v["lr"], f"{k} lr")


if __name__ == "__main__":
    main()
