"""Learned-optimizer quality: the hypernetwork core against the LSTM core (quadratic, digits-mlp).

Every core is meta-trained by the same loop (``selfref.meta.MetaTrainer``: truncated BPTT,
Adam on φ, the held-out selection of the best φ) on the same task family with the same
budget, then rolls out on held-out *test* instances never used in meta-training; the metric
is the mean over instances of log10 of the final training loss after ``inner_steps``
learned-optimizer steps (lower is better). Cores (name: core, core options, analyzer):

- ``lstm``: Andrychowicz et al. 2016, their log/sign gradient features (the reference);
- ``hypernet``: Ha et al. 2016 / VeLO (Metz et al. 2022) with VeLO's step constants
  exp_mult = step_mult = 0.001 — the faithful setting, on the same features;
- ``hypernet_s0.1``: the same with step_mult = 0.1, an option beside the paper's setting,
  since VeLO's 0.001 assumes far longer meta-training than a CPU budget allows;
- ``hypernet_mom``: step_mult = 0.1 and, as VeLO's per-parameter MLP reads momentum
  accumulators, the analyzer's log/sign features of momentum averages of g at decays
  (0.5, 0.9, 0.99) beside those of g (``AnalyzerConfig.momentum_decays``, F = 8); an option
  beside the paper's setting;
- ``lstm_mom``: a control — the LSTM core on those same momentum features, so a gain of
  ``hypernet_mom`` is not just the features;
- ``srwm``: the self-referential weight matrix of Irie et al. 2022 as the modifier (it
  rewrites its own fast weights W = W_0 + shift while it modifies θ; the meta-gradient
  reaches W_0 through the recurrence), reading its own |W − W_0| statistics (the same
  numbers as the analyzer's ``core_stats=4``). Reported (``<task>/srwm_minus_lstm_log10``)
  without a target of its own.

Beside them, for scale: Adam with its learning rate tuned on train instances
(``selfref.meta.evaluate.tune_baseline``). Targets: each hypernet setting at least as good
as ``lstm`` (``<task>/<core>_minus_lstm_log10 <= 0``) for ``hypernet`` and ``hypernet_mom``.

Meta-training is deterministic for a given seed and config; only the ``*_meta_train_s``
timings depend on the machine's load. ``--tasks`` and ``--cores`` run a subset (a partial
result file: write it with ``--out`` elsewhere); ``--device cuda --meta-steps ...`` for
longer runs.

Run: ``python -m benchmarks.cores_quality`` (``--quick``: < 1 minute).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any

import torch

from benchmarks.common import base_parser, target, write_result
from selfref.logging import NullLogger
from selfref.meta import MetaTrainConfig, MetaTrainer
from selfref.meta.evaluate import rollout_baseline, rollout_learned, tune_baseline
from selfref.meta.family import TaskFamily
from selfref.net import SelfReferentialNet
from selfref.net.analyzing import AnalyzerConfig
from selfref.tasks import make
from selfref.tasks.base import resolve_device

_MOMENTUM = AnalyzerConfig(momentum_decays=(0.5, 0.9, 0.99))

# name -> (core, core options, analyzer config)
CORES: dict[str, tuple[str, dict[str, Any], AnalyzerConfig]] = {
    "lstm": ("lstm", {}, AnalyzerConfig()),
    "hypernet": ("hypernet", {}, AnalyzerConfig()),
    "hypernet_s0.1": ("hypernet", {"step_mult": 0.1}, AnalyzerConfig()),
    "hypernet_mom": ("hypernet", {"step_mult": 0.1}, _MOMENTUM),
    "lstm_mom": ("lstm", {}, _MOMENTUM),
    "srwm": ("srwm", {}, AnalyzerConfig()),
}
TARGET_CORES: tuple[str, ...] = ("hypernet", "hypernet_mom")  # each must match or beat lstm


def settings(task: str, quick: bool, meta_steps: int | None) -> dict[str, int]:
    if task == "quadratic":
        s = {"meta_steps": 200, "unroll": 20, "inner_steps": 100, "meta_batch": 32, "tasks": 64}
    else:
        s = {"meta_steps": 60, "unroll": 10, "inner_steps": 50, "meta_batch": 8, "tasks": 16}
    if quick:
        s = {**s, "meta_steps": 3, "inner_steps": 20, "meta_batch": 4, "tasks": 4}
    if meta_steps:
        s["meta_steps"] = meta_steps
    return s


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", default="quadratic,digits-mlp")
    p.add_argument("--cores", default=",".join(CORES))
    p.add_argument("--meta-steps", type=int, default=0, help="override per-task meta-steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    tasks = [t for t in args.tasks.split(",") if t]
    cores = [c for c in args.cores.split(",") if c]
    bad = [c for c in cores if c not in CORES]
    if bad:
        raise SystemExit(f"unknown core(s) {bad}; valid: {', '.join(CORES)}")
    metrics: dict[str, float] = {}
    config: dict[str, Any] = {"device": str(device), "quick": args.quick, "seed": args.seed}
    config["threads"] = args.threads
    config["cores"] = {
        c: {"core": CORES[c][0], "core_options": CORES[c][1], "analyzer": asdict(CORES[c][2])}
        for c in cores
    }
    targets = {}
    for tname in tasks:
        s = settings(tname, args.quick, args.meta_steps or None)
        config[tname] = s
        task = make(tname, device=str(device))
        family = TaskFamily(task)
        test_seeds = [3 * 2**30 + i for i in range(s["tasks"])]
        train_seeds = [2**29 + i for i in range(s["tasks"])]
        lr, _ = tune_baseline(family, "adam", train_seeds, s["inner_steps"])
        adam = rollout_baseline(family, "adam", {"lr": lr}, test_seeds, s["inner_steps"], "test")
        metrics[f"{tname}/adam_tuned_final_log10_loss"] = adam.final_log10
        metrics[f"{tname}/adam_lr"] = lr
        for cname in cores:
            core, opts, analyzer = CORES[cname]
            net = SelfReferentialNet.from_task(task, core=core, analyzer=analyzer, **opts)
            cfg = MetaTrainConfig(
                meta_steps=s["meta_steps"],
                unroll=s["unroll"],
                inner_steps=s["inner_steps"],
                meta_batch=s["meta_batch"],
                eval_every=max(1, s["meta_steps"] // 4),
                eval_tasks=s["tasks"],
                checkpoint_every=0,
                seed=args.seed,
            )
            t0 = time.perf_counter()
            res = MetaTrainer(net, cfg, NullLogger()).train()
            train_s = time.perf_counter() - t0
            r = rollout_learned(
                net, res.best_meta_params, family, test_seeds, s["inner_steps"], "test"
            )
            score = r.final_log10 if not r.diverged else math.inf
            metrics[f"{tname}/{cname}_final_log10_loss"] = score
            metrics[f"{tname}/{cname}_meta_train_s"] = train_s
        for cname in ("srwm",):
            if "lstm" in cores and cname in cores:
                metrics[f"{tname}/{cname}_minus_lstm_log10"] = (
                    metrics[f"{tname}/{cname}_final_log10_loss"]
                    - metrics[f"{tname}/lstm_final_log10_loss"]
                )
        for cname in TARGET_CORES:
            if "lstm" in cores and cname in cores:
                d = (
                    metrics[f"{tname}/{cname}_final_log10_loss"]
                    - metrics[f"{tname}/lstm_final_log10_loss"]
                )
                metrics[f"{tname}/{cname}_minus_lstm_log10"] = d
                targets[f"{tname}/{cname}_minus_lstm_log10"] = target(d, "<= 0")
    name = "cores_quality"
    out = args.out or (f"benchmarks/results/{name}.quick.json" if args.quick else None)
    return write_result(name, config, metrics, targets, out=out)


if __name__ == "__main__":
    main()
