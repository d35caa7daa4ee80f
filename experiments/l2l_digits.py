"""Reproduce Andrychowicz et al. 2016, section 3.2 (MNIST) on scikit-learn's digits.

The optimizee is an MLP with one hidden layer of 20 sigmoid units, batch 128, trained for
100 steps (the paper's MNIST setting, on the 8×8 digits that ship with scikit-learn). The
LSTM core is meta-trained on instances of this task — other initializations and minibatch
orders on the train split — with truncated BPTT (unroll 20 over 100 steps, Adam); the
checkpoint is chosen on held-out instances. Baselines SGD, NAG, RMSprop and Adam get their
learning rate from a grid on training instances. Measured on held-out test instances: the
full train-split loss after 100 steps (the paper plots training loss).

Generalization checks (the paper's figure 4–5): 200 steps, 40 hidden units, two hidden
layers, and ReLU activations (the paper reports that ReLU fails); the learned optimizer is
not re-trained, the baselines keep the learning rates tuned on the base task.

Usage:
    python -m experiments.l2l_digits [--quick] [--export] [--device cpu|cuda]

``--export`` writes the chosen φ to ``selfref/net/pretrained/lstm_digits-mlp.pt`` (the
checkpoint ``LearnedOptimizer`` and the ``selfref`` method use by default).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from selfref.checkpoints import meta_params_of
from selfref.logging import Logger, MultiLogger, NullLogger, TensorBoardLogger
from selfref.meta import (
    DEFAULT_LR_GRID,
    MetaTrainConfig,
    MetaTrainer,
    TaskFamily,
    load_checkpoint,
    rollout_baseline,
    rollout_learned,
    tune_baseline,
)
from selfref.net import SelfReferentialNet
from selfref.net.optimizer import PRETRAINED_DIR
from selfref.tasks import make

CONFIG = Path(__file__).resolve().parent / "configs" / "l2l_digits.json"
# Held-out test instances: seeds outside the meta-training stream [0, 2^30) and the
# checkpoint-selection seeds [2^31, ...).
TEST_SEED0 = 2**30 + 1_000_000


def load_config(quick: bool = False) -> dict[str, Any]:
    cfg = json.loads(CONFIG.read_text())
    if quick:
        q = cfg["quick"]
        cfg["meta"].update(
            {k: q[k] for k in ("meta_steps", "meta_batch", "eval_every", "eval_tasks")}
        )
        cfg["tune_seeds"], cfg["test_seeds"] = q["tune_seeds"], q["test_seeds"]
    return cfg


def _train_loss(fam: TaskFamily, r: Any, steps: int, seeds: list[int]) -> float:
    """Mean over instances of the full train-split loss at the end of the rollout."""
    return float(fam.final_loss(r.params, "train", steps, seeds).mean())


def run(
    quick: bool = False,
    device: str = "cpu",
    logger: Logger | None = None,
    export: Path | None = None,
    meta_overrides: dict[str, Any] | None = None,
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    """Tune baselines, meta-train (or load ``checkpoint``), evaluate, generalize."""
    logger = logger or NullLogger()
    cfg = load_config(quick)
    task = make(cfg["task"]["name"], device=device, **cfg["task"]["options"])
    fam = TaskFamily(task)
    steps = cfg["steps"]
    tune = list(range(cfg["tune_seeds"]))
    test = [TEST_SEED0 + i for i in range(cfg["test_seeds"])]
    out: dict[str, Any] = {"baselines": {}, "generalization": {}}

    t0 = time.perf_counter()
    tuned = {}
    for name in cfg["baselines"]:
        extra = {"momentum": 0.9} if name == "nesterov" else {}
        lr, _ = tune_baseline(fam, name, tune, steps, DEFAULT_LR_GRID, "train", extra)
        tuned[name] = {"lr": lr, **extra}
    out["tuning_s"] = time.perf_counter() - t0

    if checkpoint is not None:
        ck = load_checkpoint(checkpoint, map_location=task.device)
        net = SelfReferentialNet.from_description(task, ck["net"])
        phi = {k: v.to(task.device) for k, v in meta_params_of(ck).items()}
        out["checkpoint"] = str(checkpoint)
        out["meta_train_grad_evals"] = ck.get("grad_evals")
        out["best_step"], out["heldout_log10"] = ck.get("best_step"), ck.get("best_score")
        out["meta_config"] = ck.get("config")
    else:
        meta = {**cfg["meta"], **(meta_overrides or {})}
        net = SelfReferentialNet.from_task(task, core="lstm")
        trainer = MetaTrainer(net, MetaTrainConfig.from_dict(meta), logger)
        t0 = time.perf_counter()
        res = trainer.train()
        out["meta_train_s"] = time.perf_counter() - t0
        out["meta_train_grad_evals"] = res.meta_train_grad_evals
        out["best_step"], out["heldout_log10"] = res.best_step, res.best_score
        out["history"] = res.history
        out["meta_config"] = meta
        if export is not None:
            trainer.export(export)
            out["exported"] = str(export)
        phi = res.best_meta_params

    learned = rollout_learned(net, phi, fam, test, steps, "train")
    out["learned"] = {
        "train_loss": _train_loss(fam, learned, steps, test),
        "curve": learned.curve.tolist(),
    }
    for name, hp in tuned.items():
        r = rollout_baseline(fam, name, hp, test, steps, "train")
        out["baselines"][name] = {
            "lr": hp["lr"],
            "train_loss": _train_loss(fam, r, steps, test),
            "curve": r.curve.tolist(),
        }

    for gname, g in cfg["generalization"].items():
        gtask = make(
            cfg["task"]["name"], device=device, **{**cfg["task"]["options"], **g["options"]}
        )
        gfam = TaskFamily(gtask)
        gnet = SelfReferentialNet.from_description(gtask, net.describe())
        lr_ = rollout_learned(gnet, phi, gfam, test, g["steps"], "train")
        ad = rollout_baseline(gfam, "adam", tuned["adam"], test, g["steps"], "train")
        entry = {
            "steps": g["steps"],
            "learned_train_loss": _train_loss(gfam, lr_, g["steps"], test),
            "adam_train_loss": _train_loss(gfam, ad, g["steps"], test),
            "learned_diverged": lr_.diverged,
        }
        if g["steps"] > steps:
            entry["learned_curve"] = lr_.curve.tolist()
        out["generalization"][gname] = entry
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--logdir", default=None, help="TensorBoard directory (default: none)")
    p.add_argument(
        "--export",
        action="store_true",
        help=f"write the chosen checkpoint to {PRETRAINED_DIR}/lstm_digits-mlp.pt",
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loggers: list[Logger] = [TensorBoardLogger(args.logdir)] if args.logdir else []
    export = PRETRAINED_DIR / "lstm_digits-mlp.pt" if args.export else None
    res = run(args.quick, args.device, MultiLogger(loggers), export)
    for k in ("learned",):
        res[k].pop("curve", None)
    for v in res["baselines"].values():
        v.pop("curve", None)
    for v in res["generalization"].values():
        v.pop("learned_curve", None)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
