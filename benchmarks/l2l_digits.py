"""Quality of the L2L LSTM on the digits MLP (Andrychowicz et al. 2016, section 3.2).

Metrics: mean full-train-split loss after 100 steps on held-out instances (initializations
and minibatch orders) for the learned LSTM and for each baseline at its grid-tuned learning
rate; the learned/Adam ratio (target <= 1: at or below tuned Adam); the learned optimizer's
loss at step 200 over its loss at step 100 (target <= 1: no divergence past the
meta-training horizon); the generalization checks (40 hidden, two layers, ReLU).

The learned optimizer is the packaged checkpoint ``selfref/net/pretrained/lstm_digits-mlp.pt``
(made by ``python -m experiments.l2l_digits --export``) unless ``--meta-train`` is given,
which meta-trains here with experiments/configs/l2l_digits.json (slow on a CPU).

Usage: python -m benchmarks.l2l_digits [--quick] [--meta-train] [--device cuda]
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, base_parser, target, write_result
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
    best_name = min(res["baselines"], key=lambda k: res["baselines"][k]["train_loss"])
    learned = res["learned"]["train_loss"]
    g200 = res["generalization"]["steps_200"]
    metrics = {
        "learned_train_loss_100": learned,
        **{f"{k}_train_loss_100": v["train_loss"] for k, v in res["baselines"].items()},
        **{f"{k}_lr": v["lr"] for k, v in res["baselines"].items()},
        "learned_over_adam_100": learned / adam,
        "learned_over_best_baseline_100": learned / res["baselines"][best_name]["train_loss"],
        "learned_train_loss_200": g200["learned_train_loss"],
        "adam_train_loss_200": g200["adam_train_loss"],
        "learned_200_over_100": g200["learned_train_loss"] / learned,
    }
    for gname, g in res["generalization"].items():
        if gname == "steps_200":
            continue
        metrics[f"{gname}_learned_train_loss"] = g["learned_train_loss"]
        metrics[f"{gname}_adam_train_loss"] = g["adam_train_loss"]
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
    }
    diverged = g200["learned_diverged"] or not math.isfinite(g200["learned_train_loss"])
    targets = {
        "learned_over_adam_100": target(metrics["learned_over_adam_100"], "<= 1.0"),
        "learned_200_over_100": target(
            math.inf if diverged else metrics["learned_200_over_100"], "<= 1.0"
        ),
    }
    out = args.out or (RESULTS_DIR / "l2l_digits.quick.json" if args.quick else None)
    write_result("l2l_digits", config, metrics, targets, out=out)


if __name__ == "__main__":
    main()
