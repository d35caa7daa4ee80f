"""Reproduce Andrychowicz et al. 2016, section 3.1: the LSTM optimizer on 10-d quadratics.

f(θ) = ‖Wθ − y‖², W (10×10) and y (10) Gaussian, θ0 = 0, 100 steps. The LSTM core
(2 layers × 20, coordinatewise, output × 0.1, gradient preprocessing p = 10) is
meta-trained with truncated BPTT (unroll 20 over 100 steps, Adam 1e-3, 128 functions per
meta-batch). Baselines SGD, NAG (nesterov), RMSprop and Adam get their learning rate from a
grid on *training* functions. Everything is then measured on 100 held-out *test* functions:
mean log10 f(θ_100). The meta-training checkpoint is chosen on *val* functions.

Variants (experiments/configs/l2l_quadratic.json): ``paper`` (the paper's settings; no
meta-gradient clipping, which neither the paper nor its code uses — MetaTrainConfig clips at
global norm 1 unless ``clip_grad_norm`` is 0) and ``recipe`` (log meta-loss, cosine meta-lr
with warmup, a horizon curriculum, meta-gradient clipping at norm 1, three meta-training
seeds). A variant with restarts keeps the restart with the best *val* score;
the mean over its restarts is reported beside it, since the best of three is an optimistic
draw (2-core CPU, this version: kept restart −2.26, mean over the three −2.20).

How the recipe was chosen. It was fixed once, at the project's second stop (commit 2f8f1f7),
from a 12-run sweep of MetaTrainConfig settings around the paper's (``--set`` overrides;
log meta-loss and gradient clipping mattered most), run on the CPUs of a GPU host; the seed
restarts were added later (commit 4bef44a). The sweep's outputs were not kept and the
criterion it was judged by was not recorded. At that time this script's summary printed the
test-function score beside the val score, so it cannot be shown that test functions took no
part in choosing the recipe; treat the recipe's test numbers with that caveat. What the code
guarantees: the checkpoint and the restart are chosen on val functions, and from this
version on a sweep (any ``--set``) is scored on *val* functions only — the rollouts run on
the val split and no test number is computed or printed — so a recipe chosen from it never
sees a test function.

Usage:
    python -m experiments.l2l_quadratic [--variant paper|recipe|all] [--quick] [--logdir logs]
    python -m experiments.l2l_quadratic --set meta_lr=0.003   # a sweep point: val only
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from selfref.logging import Logger, MultiLogger, NullLogger, TensorBoardLogger
from selfref.meta import (
    DEFAULT_LR_GRID,
    MetaTrainConfig,
    MetaTrainer,
    TaskFamily,
    rollout_baseline,
    rollout_learned,
    tune_baseline,
)
from selfref.net import SelfReferentialNet
from selfref.tasks import make

CONFIG = Path(__file__).resolve().parent / "configs" / "l2l_quadratic.json"
# Learning rates each baseline is tuned over (10^-4 … 10^0.5); the benchmark checks that no
# baseline's best is an end of it.
LR_GRID: tuple[float, ...] = tuple(DEFAULT_LR_GRID)
EVAL_SPLITS = ("test", "val")  # where the final rollouts run: test (report) or val (sweeps)


def load_config(quick: bool = False) -> dict[str, Any]:
    cfg = json.loads(CONFIG.read_text())
    if quick:
        q = cfg["quick"]
        for v in cfg["variants"].values():
            v.update(
                {
                    k: q[k]
                    for k in ("meta_steps", "meta_batch", "meta_lr", "eval_every", "eval_tasks")
                }
            )
            v["curriculum"] = []
            v["warmup_steps"] = 0
            v.pop("restarts", None)
        cfg["tune_seeds"], cfg["test_seeds"] = q["tune_seeds"], q["test_seeds"]
    return cfg


def tune_baselines(task: Any, cfg: dict[str, Any], logger: Logger) -> dict[str, Any]:
    """Learning rate of each baseline from the grid, on training functions."""
    fam = TaskFamily(task)
    seeds = list(range(cfg["tune_seeds"]))
    out = {}
    for name in cfg["baselines"]:
        extra = {"momentum": 0.9} if name == "nesterov" else None
        lr, scores = tune_baseline(fam, name, seeds, cfg["steps"], LR_GRID, "train", extra)
        out[name] = {
            "lr": lr,
            "hparams": {"lr": lr, **(extra or {})},
            "train_score": scores[lr],
            "scores": scores,
        }
        logger.text(f"tuning/{name}", json.dumps({str(k): v for k, v in scores.items()}), 0)
    return out


def meta_train(task: Any, meta: dict[str, Any], logger: Logger, device: str) -> Any:
    meta = dict(meta)
    meta.pop("restarts", None)
    meta["curriculum"] = tuple(tuple(x) for x in meta.get("curriculum", ()))
    cfg = MetaTrainConfig(**meta)
    net = SelfReferentialNet.from_task(task, core="lstm")
    trainer = MetaTrainer(net, cfg, logger)
    t0 = time.perf_counter()
    res = trainer.train()
    return net, res, time.perf_counter() - t0


def _train_and_test(
    task_cfg: dict[str, Any],
    meta: dict[str, Any],
    device: str,
    test: list[int],
    steps: int,
    logger: Logger | None = None,
    threads: int = 1,
    split: str = "test",
) -> dict[str, Any]:
    """Meta-train one setting and measure its chosen φ on ``split``'s functions (picklable)."""
    torch.set_num_threads(threads)
    task = make(task_cfg["name"], device=device, **task_cfg["options"])
    fam = TaskFamily(task)
    net, res, secs = meta_train(task, meta, logger or NullLogger(), device)
    r = rollout_learned(net, res.best_meta_params, fam, test, steps, split)
    r200 = rollout_learned(net, res.best_meta_params, fam, test, 2 * steps, split)
    return {
        "seed": meta.get("seed", 0),
        "eval_log10": r.final_log10,
        "eval_log10_at_200": r200.final_log10,
        "best_step": res.best_step,
        "val_log10": res.best_score,
        "meta_train_s": secs,
        "meta_train_grad_evals": res.meta_train_grad_evals,
        "skipped": res.skipped,
        "history": res.history,
        "curve": torch.log10(r.curve).tolist(),
        "meta_params": res.best_meta_params,
        "net": net.describe(),
    }


def run(
    variants: list[str],
    quick: bool = False,
    device: str = "cpu",
    logger: Logger | None = None,
    overrides: dict[str, Any] | None = None,
    workers: int = 1,
    eval_split: str = "test",
) -> dict[str, Any]:
    """Tune baselines, meta-train each variant, evaluate all on held-out functions.

    A variant with ``"restarts": [s0, s1, ...]`` is meta-trained once per seed and keeps the
    run with the best *val* score (test functions never take part in the choice); the mean
    over its restarts is returned beside it (``eval_log10_mean``, ``val_log10_mean``).
    ``overrides`` replaces MetaTrainConfig fields of every variant (for sweeps);
    ``workers`` > 1 runs the meta-trainings in that many processes. ``eval_split`` is where
    the final rollouts of baselines and learned optimizers run (``eval_log10``): ``test`` for
    the reported numbers, ``val`` for sweeps, which must not look at test functions.

    Raises:
        ValueError: an ``eval_split`` other than ``test`` or ``val``.
    """
    if eval_split not in EVAL_SPLITS:
        raise ValueError(f"unknown eval_split {eval_split!r}; valid: {', '.join(EVAL_SPLITS)}")
    logger = logger or NullLogger()
    cfg = load_config(quick)
    for v in cfg["variants"].values():
        v.update(overrides or {})
    task = make(cfg["task"]["name"], device=device, **cfg["task"]["options"])
    fam = TaskFamily(task)
    test = list(range(cfg["test_seeds"]))
    steps = cfg["steps"]
    tuned = tune_baselines(task, cfg, logger)
    results: dict[str, Any] = {
        "baselines": {},
        "learned": {},
        "eval_split": eval_split,
        "lr_grid": list(LR_GRID),
    }
    for name, t in tuned.items():
        r = rollout_baseline(fam, name, t["hparams"], test, steps, eval_split)
        results["baselines"][name] = {
            "lr": t["lr"],
            "eval_log10": r.final_log10,
            "tuning_train_log10": t["scores"],
            "curve": torch.log10(r.curve).tolist(),
        }
    jobs = []
    for v in variants:
        meta = dict(cfg["variants"][v])
        seeds = meta.pop("restarts", None) or [meta.get("seed", 0)]
        jobs += [(v, {**meta, "seed": s}) for s in seeds]
    if workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [
                pool.submit(
                    _train_and_test, cfg["task"], m, device, test, steps, None, 1, eval_split
                )
                for _, m in jobs
            ]
            outs = [f.result() for f in futures]
    else:
        outs = [
            _train_and_test(
                cfg["task"], m, device, test, steps, logger, torch.get_num_threads(), eval_split
            )
            for _, m in jobs
        ]
    for v in variants:
        runs = [o for (jv, _), o in zip(jobs, outs) if jv == v]
        best = min(runs, key=lambda o: o["val_log10"])
        results["learned"][v] = {
            **best,
            "eval_log10_mean": sum(o["eval_log10"] for o in runs) / len(runs),
            "val_log10_mean": sum(o["val_log10"] for o in runs) / len(runs),
            "restarts": [
                {k: o[k] for k in ("seed", "val_log10", "eval_log10", "best_step")} for o in runs
            ],
        }
    best_base = min(results["baselines"], key=lambda k: results["baselines"][k]["eval_log10"])
    results["best_baseline"] = best_base
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="all", choices=["paper", "recipe", "all"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--logdir", default=None, help="TensorBoard directory (default: none)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override a MetaTrainConfig field of the variants, e.g. meta_lr=0.01 (a sweep "
        "point: scored on val functions only, no test number is computed)",
    )
    p.add_argument("--json-out", default=None, help="also write the summary to this file")
    p.add_argument("--workers", type=int, default=1, help="processes for meta-training runs")
    args = p.parse_args()
    overrides = {}
    for item in args.set:
        k, v = item.split("=", 1)
        overrides[k] = json.loads(v)
    split = "val" if overrides else "test"  # a sweep never looks at test functions
    torch.set_num_threads(args.threads)
    loggers: list[Logger] = []
    if args.logdir:
        loggers.append(TensorBoardLogger(args.logdir))
    variants = ["paper", "recipe"] if args.variant == "all" else [args.variant]
    res = run(
        variants, args.quick, args.device, MultiLogger(loggers), overrides, args.workers, split
    )
    # eval_*: the final rollouts on ``eval_split``'s functions (test, or val for a sweep);
    # checkpoint_val_*: the score the checkpoint and restart were chosen by
    summary: dict[str, Any] = {
        "eval_split": split,
        "baselines": {
            k: {"lr": v["lr"], "eval_log10": v["eval_log10"]} for k, v in res["baselines"].items()
        },
        "learned": {
            k: {
                "eval_log10": v["eval_log10"],
                "eval_log10_at_200": v["eval_log10_at_200"],
                "eval_log10_mean_over_restarts": v["eval_log10_mean"],
                "checkpoint_val_log10": v["val_log10"],
                "checkpoint_val_log10_mean_over_restarts": v["val_log10_mean"],
                **{x: v[x] for x in ("best_step", "meta_train_s", "skipped")},
            }
            for k, v in res["learned"].items()
        },
    }
    summary["overrides"] = overrides
    print(json.dumps(summary, indent=1))
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
