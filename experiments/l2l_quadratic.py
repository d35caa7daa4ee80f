"""Reproduce Andrychowicz et al. 2016, section 3.1: the LSTM optimizer on 10-d quadratics.

f(θ) = ‖Wθ − y‖², W (10×10) and y (10) Gaussian, θ0 = 0, 100 steps. The LSTM core
(2 layers × 20, coordinatewise, output × 0.1, gradient preprocessing p = 10) is
meta-trained with truncated BPTT (unroll 20 over 100 steps, Adam 1e-3, 128 functions per
meta-batch). Baselines SGD, NAG (nesterov), RMSprop and Adam get their learning rate from a
grid on *training* functions. Everything is then measured on 100 held-out *test* functions:
mean log10 f(θ_100). The meta-training checkpoint is chosen on *val* functions.

Variants (experiments/configs/l2l_quadratic.json): ``paper`` (the paper's settings) and
``recipe`` (log meta-loss, cosine meta-lr with warmup, a horizon curriculum).

Usage:
    python -m experiments.l2l_quadratic [--variant paper|recipe|all] [--quick] [--logdir logs]
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
        lr, scores = tune_baseline(fam, name, seeds, cfg["steps"], DEFAULT_LR_GRID, "train", extra)
        out[name] = {"lr": lr, "hparams": {"lr": lr, **(extra or {})}, "train_score": scores[lr]}
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
) -> dict[str, Any]:
    """Meta-train one setting and measure its chosen φ on the test functions (picklable)."""
    torch.set_num_threads(threads)
    task = make(task_cfg["name"], device=device, **task_cfg["options"])
    fam = TaskFamily(task)
    net, res, secs = meta_train(task, meta, logger or NullLogger(), device)
    r = rollout_learned(net, res.best_meta_params, fam, test, steps, "test")
    r200 = rollout_learned(net, res.best_meta_params, fam, test, 2 * steps, "test")
    return {
        "seed": meta.get("seed", 0),
        "test_log10": r.final_log10,
        "test_log10_at_200": r200.final_log10,
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
) -> dict[str, Any]:
    """Tune baselines, meta-train each variant, evaluate all on held-out test functions.

    A variant with ``"restarts": [s0, s1, ...]`` is meta-trained once per seed and keeps the
    run with the best *val* score (test functions never take part in the choice).
    ``overrides`` replaces MetaTrainConfig fields of every variant (for sweeps);
    ``workers`` > 1 runs the meta-trainings in that many processes.
    """
    logger = logger or NullLogger()
    cfg = load_config(quick)
    for v in cfg["variants"].values():
        v.update(overrides or {})
    task = make(cfg["task"]["name"], device=device, **cfg["task"]["options"])
    fam = TaskFamily(task)
    test = list(range(cfg["test_seeds"]))
    steps = cfg["steps"]
    tuned = tune_baselines(task, cfg, logger)
    results: dict[str, Any] = {"baselines": {}, "learned": {}}
    for name, t in tuned.items():
        r = rollout_baseline(fam, name, t["hparams"], test, steps, "test")
        results["baselines"][name] = {
            "lr": t["lr"],
            "test_log10": r.final_log10,
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
                pool.submit(_train_and_test, cfg["task"], m, device, test, steps, None, 1)
                for _, m in jobs
            ]
            outs = [f.result() for f in futures]
    else:
        outs = [
            _train_and_test(cfg["task"], m, device, test, steps, logger, torch.get_num_threads())
            for _, m in jobs
        ]
    for v in variants:
        runs = [o for (jv, _), o in zip(jobs, outs) if jv == v]
        best = min(runs, key=lambda o: o["val_log10"])
        results["learned"][v] = {
            **best,
            "restarts": [
                {k: o[k] for k in ("seed", "val_log10", "test_log10", "best_step")} for o in runs
            ],
        }
    best_base = min(results["baselines"], key=lambda k: results["baselines"][k]["test_log10"])
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
        help="override a MetaTrainConfig field of the variants, e.g. meta_lr=0.01",
    )
    p.add_argument("--json-out", default=None, help="also write the summary to this file")
    p.add_argument("--workers", type=int, default=1, help="processes for meta-training runs")
    args = p.parse_args()
    overrides = {}
    for item in args.set:
        k, v = item.split("=", 1)
        overrides[k] = json.loads(v)
    torch.set_num_threads(args.threads)
    loggers: list[Logger] = []
    if args.logdir:
        loggers.append(TensorBoardLogger(args.logdir))
    variants = ["paper", "recipe"] if args.variant == "all" else [args.variant]
    res = run(variants, args.quick, args.device, MultiLogger(loggers), overrides, args.workers)
    summary = {
        "baselines": {
            k: {"lr": v["lr"], "test_log10": v["test_log10"]} for k, v in res["baselines"].items()
        },
        "learned": {
            k: {
                x: v[x]
                for x in (
                    "test_log10",
                    "test_log10_at_200",
                    "val_log10",
                    "best_step",
                    "meta_train_s",
                    "skipped",
                )
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
