"""Held-out evaluation of the learned optimizer: tasks it never saw, against tuned baselines.

Every task of :data:`SUITE` lies outside the meta-training distribution
(``TaskDistribution().contains(spec)`` is False, checked at start against the preset's
distribution and the checkpoint's own, :func:`training_distributions`): data sets and
generators never sampled (wine, iris, moons, circles, Gaussian quantiles, Hastie's 10-d problem,
diabetes and Friedman #1 regression), widths and depths outside the sampled range (4, 128,
256 units; 3–4 hidden layers), activations never sampled (gelu, elu, softplus) and batch
sizes never sampled (8, 48, 100, 256). Each task runs at its own horizon of 2× or 5× the
meta-training horizon T_meta (the preset's ``inner_steps``, the longest horizon meta-training
ever ran) and again at 10×.

On each (task, horizon), over the same 3 instance seeds (initialization and minibatch
order), against the learned optimizer (reading a val minibatch's loss every
``heldout_every`` steps, as meta-trained):

- Adam, AdamW (decoupled weight decay) and SGD with momentum 0.9, each with its learning rate
  (and AdamW's weight decay) tuned per task on the mean final **val** loss over the seeds,
  on log grids (13 learning rates, 10⁻⁴ … 1, a third of a decade apart; decoupled weight
  decay 10⁻⁴ … 1, a decade apart); a best learning rate on a grid edge widens the grid by
  three points on that side, a best decay on the top edge by one decade, until they are
  inside (``lr_on_edge`` and ``wd_on_top_edge`` record whether any stayed on an edge; a
  decay on the low edge means decay does not help);
- reported per task: the mean ± sd over seeds of the final **test** loss of each, the ratio
  learned / tuned Adam, and — as VeLO (Metz et al. 2022, section 5) reports — the steps tuned
  Adam needs to reach the learned optimizer's final test loss (its mean test-loss curve on
  50 points; null when it never does), and for an ``lopt`` core its mean log step size
  ln |α·exp(a_T + s_i)| at 10 points of the run (``log_step_curve``: what schedule it chose),
  and at the same points its mean training-minibatch loss since the point before
  (``train_loss_curve``: where it stalled, e.g. on a plateau while its step shrinks);
- and the final loss on the whole **train** split of the learned optimizer and of each tuned
  baseline's chosen setting, so that a loss or a win can be read: ``learned_fits_less`` when
  the learned train loss is above tuned Adam's; over tasks, ``underfit_losses`` (lost, train
  loss above Adam's too: the optimizer did not fit), ``overfit_losses`` (lost with a train
  loss at or below Adam's) and ``regularized_wins`` (won with a train loss above Adam's).
  Rows reused from a result written before this column rerun the baselines' chosen
  settings (not their grids) to measure it.

Wide MLPs on the two smallest bundled sets (wine: 107 training and 36 val examples; iris:
90 and 30) are left out: there a whole range of large learning rates fits the val
examples to a float32 cross-entropy of exactly 0 while the test loss explodes, so tuning on
val degenerates (the tuned "Adam" then loses to anything). Each baseline's chosen setting
records ``val_degenerate`` (mean val loss below 10⁻⁴) so such a case would show.

A run *diverges* when a seed's final test loss is not finite or exceeds twice its value at
initialization. Targets: learned ≤ tuned Adam on ≥ 80 % of the tasks at their horizon;
median ratio ≤ 0.9; no divergence; at 10× T_meta, learned ≤ tuned Adam on ≥ 60 %; the
checkpoint's meta-training took ≤ 90 minutes (:func:`meta_train_minutes`: the command's
wall-clock where the checkpoint records it, else its recorded ``wall_s``).

Run: ``python -m benchmarks.lopt_heldout`` (``--quick``: three tasks, short horizons, small
grids, < 1 minute; ``--checkpoint PATH`` evaluates another learned optimizer; ``--tasks A,B
--out PART.json`` runs part of the suite, ``--merge PART.json ...`` joins the parts;
``--baselines RESULT.json`` reuses an earlier result's tuned baselines — they do not depend
on the learned optimizer — and runs only the learned one, about a fifth of the time).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.func import vmap

from benchmarks.common import base_parser, machine_info, target, write_result
from selfref import checkpoints
from selfref.commands.common import positive_int
from selfref.meta.baselines import GridRun, best_setting, early_stopped, log_grid, run_grid
from selfref.meta.family import TaskFamily
from selfref.net import SelfReferentialNet
from selfref.net.optimizer import default_checkpoint
from selfref.tasks.distribution import DistributionConfig, TaskDistribution, TaskSpec, build_task

SEEDS = (0, 1, 2)
CURVE_POINTS = 50
LOG_STEP_POINTS = 10  # the learned optimizer's mean log step size, recorded this many times
LR_GRID = log_grid(1e-4, 1.0, 13)
WD_GRID = log_grid(1e-4, 1.0, 5)
BASELINES = ("adam", "adamw", "sgd_momentum")  # the tuned optimizers of every row
GRID_NAME = {"adam": "adam", "adamw": "adamw", "sgd_momentum": "momentum"}  # run_grid's names


@dataclass(frozen=True)
class HeldoutTask:
    """One task of the suite and its horizon as a multiple of T_meta."""

    name: str
    spec: TaskSpec
    horizon_mult: int  # 2 or 5; every task also runs at 10


def _t(name: str, data: str, mult: int, **kw: Any) -> HeldoutTask:
    return HeldoutTask(name, TaskSpec(data, data_seed=kw.pop("data_seed", 11), **kw), mult)


SUITE: tuple[HeldoutTask, ...] = (
    _t("diabetes-mlp128-gelu", "diabetes", 2, hidden=(128,), activation="gelu", batch_size=32),
    _t("hastie-mlp32x3-relu", "hastie", 5, hidden=(32, 32, 32), activation="relu",
       batch_size=16, n_samples=1000),
    _t("moons-mlp4-sigmoid", "moons", 2, hidden=(4,), activation="sigmoid", batch_size=48,
       n_samples=1000, difficulty=0.25),
    _t("circles-mlp256-relu", "circles", 5, hidden=(256,), activation="relu", batch_size=64,
       n_samples=1000, difficulty=0.15),
    _t("quantiles-mlp32x2-gelu", "gaussian_quantiles", 2, hidden=(32, 32), activation="gelu",
       batch_size=100, n_samples=1200, n_features=6, n_classes=3),
    _t("hastie-mlp16x4-tanh", "hastie", 5, hidden=(16, 16, 16, 16), activation="tanh",
       batch_size=128, n_samples=1500),
    _t("diabetes-mlp64-elu", "diabetes", 2, hidden=(64,), activation="elu", batch_size=32),
    _t("friedman1-mlp128-tanh", "friedman1", 5, hidden=(128,), activation="tanh",
       batch_size=256, n_samples=1500, n_features=10, difficulty=1.0),
    _t("wine-logreg", "wine", 2, hidden=(), batch_size=8),
    _t("hastie-logreg", "hastie", 5, hidden=(), batch_size=64, n_samples=1000),
    _t("moons-mlp64x3-softplus", "moons", 5, hidden=(64, 64, 64), activation="softplus",
       batch_size=32, n_samples=600, difficulty=0.3),
    _t("iris-mlp4-tanh", "iris", 2, hidden=(4,), activation="tanh", batch_size=8),
)  # fmt: skip


def task_table(suite: list[HeldoutTask]) -> dict[str, dict[str, Any]]:
    """Each task's spec and horizon multiple, by name, as results record them."""
    return {t.name: {**t.spec.to_dict(), "horizon_mult": t.horizon_mult} for t in suite}


def _stats(x: torch.Tensor) -> dict[str, float]:
    v = [float(a) for a in x]
    return {"mean": statistics.fmean(v), "sd": statistics.pstdev(v) if len(v) > 1 else 0.0}


def tuned(
    family: TaskFamily,
    optimizer: str,
    steps: int,
    lrs: list[float],
    wds: list[float] | None,
    schedule: str = "constant",
    seeds: tuple[int, ...] = SEEDS,
    widen_early_stop: bool = False,
) -> dict[str, Any]:
    """Tune ``optimizer`` on val over the lr (× weight-decay) grid, widening it off its edges:
    three more learning rates beyond an edge lr, one more decay (×10) above a top-edge one.
    A best decay on the low edge means decay does not help (it tends to plain Adam there).
    ``schedule``: the lr schedule of every setting (:data:`selfref.meta.baselines.SCHEDULES`);
    ``seeds``: the instances every setting runs (the suite's by default).
    ``test_oracle`` records the setting with the lowest mean *test* loss — a bound on what
    any choice of setting could give, never the tuned baseline. ``early_stop``: the same grid
    with early stopping on val at the curve points, chosen on val (:func:`early_stopped`);
    with ``widen_early_stop`` the grid is also widened off an edge the early-stopped choice
    lies on (lopt_headroom reports that column; the suite's own rows do not use it)."""
    lr_ratio, wd_ratio = lrs[1] / lrs[0], (wds[1] / wds[0] if wds else 1.0)
    runs: list[GridRun] = []
    tried_lr, tried_wd = list(lrs), list(wds or [])

    def grid(lr_values: list[float], wd_values: list[float]) -> list[dict[str, float]]:
        if not wds:
            return [{"lr": lr} for lr in lr_values]
        return [{"lr": lr, "weight_decay": w} for lr in lr_values for w in wd_values]

    pending = grid(tried_lr, tried_wd)
    for _ in range(5):  # the grid, then at most four widenings
        runs.append(run_grid(family, optimizer, pending, seeds, steps, CURVE_POINTS, schedule))
        run = GridRun(
            [s for r in runs for s in r.settings],
            torch.cat([r.val for r in runs]),
            torch.cat([r.test for r in runs]),
            runs[0].curve_steps,
            torch.cat([r.curve for r in runs]),
            torch.cat([r.val_curve for r in runs]),
            torch.cat([r.train for r in runs]),
        )
        best = run.settings[best_setting(run)]
        chosen_lr = {best["lr"]}
        if widen_early_stop:
            chosen_lr.add(run.settings[early_stopped(run).setting]["lr"])
        lo, hi = min(tried_lr), max(tried_lr)
        new_lr = []
        if lo in chosen_lr:
            new_lr += [lo / lr_ratio**k for k in (3, 2, 1)]
        if hi in chosen_lr:
            new_lr += [hi * lr_ratio**k for k in (1, 2, 3)]
        new_wd = [max(tried_wd) * wd_ratio] if wds and best["weight_decay"] == max(tried_wd) else []
        if not new_lr and not new_wd:
            break
        pending = grid(new_lr, tried_wd) + grid(tried_lr + new_lr, new_wd)
        tried_lr, tried_wd = sorted(tried_lr + new_lr), sorted(tried_wd + new_wd)
    b = best_setting(run)
    best = run.settings[b]

    def on_edge(setting: dict[str, float]) -> bool:
        return setting["lr"] in (min(tried_lr), max(tried_lr))

    out = {
        "setting": best,
        "lr_on_edge": on_edge(best),
        "lr_grid": [min(tried_lr), max(tried_lr), len(tried_lr)],
        "train": _stats(run.train[b]),
        "val": _stats(run.val[b]),
        "test": _stats(run.test[b]),
        "curve_steps": run.curve_steps,
        "curve": run.curve[b].mean(0).tolist(),
        "test_per_seed": run.test[b].tolist(),
    }
    test_mean = torch.where(torch.isfinite(run.test).all(1), run.test.mean(1), math.inf)
    o = int(torch.argmin(test_mean))
    out["test_oracle"] = {"setting": run.settings[o], "test_mean": _stats(run.test[o])["mean"]}
    es = early_stopped(run)
    out["early_stop"] = {
        "setting": run.settings[es.setting],
        "val": _stats(es.val),
        "test": _stats(es.test),
        "stop_steps": es.stop_steps,
        "lr_on_edge": on_edge(run.settings[es.setting]),
    }
    out["val_degenerate"] = out["val"]["mean"] < 1e-4
    if wds:
        out["wd_grid"] = [min(tried_wd), max(tried_wd), len(tried_wd)]
        out["wd_on_top_edge"] = best["weight_decay"] == max(tried_wd)
        out["wd_on_low_edge"] = best["weight_decay"] == min(tried_wd)  # ≈ no decay
    return out


def run_learned(
    ck: dict[str, Any],
    family: TaskFamily,
    steps: int,
    seeds: tuple[int, ...] = SEEDS,
    packed: bool = False,
) -> dict[str, Any]:
    """The learned optimizer on ``seeds`` (the suite's by default) for ``steps`` steps
    (reading val as meta-trained); ``packed``: with packed steps (the same to float
    rounding, faster; not how the recorded results ran)."""
    task = family.task
    net = SelfReferentialNet.from_description(task, ck["net"], packed=packed)
    phi = {k: v.to(task.dtype) for k, v in checkpoints.meta_params_of(ck, "best").items()}
    seeds = list(seeds)
    params = family.init_params(seeds)
    init_test = family.final_loss(params, "test", 0, seeds)
    state = vmap(lambda p: net.init_state(phi, p, horizon=steps))(params)
    every = max(1, steps // LOG_STEP_POINTS)
    log_steps: list[list[float]] = []  # [step, mean log step size] of an lopt core
    train_curve: list[list[float]] = []  # [step, mean minibatch loss since the last point]
    window: list[torch.Tensor] = []
    with torch.no_grad():
        for t in range(steps):
            b: Any = family.batch("train", t, seeds)
            if net.evaluation.reads_heldout(t):
                b = {**b, "heldout": family.batch("val", t, seeds)}
            params, state, m = net.step_many(phi, params, state, b)
            window.append(m["loss"].mean())
            if t % every == 0 or t == steps - 1:
                train_curve.append([t, float(torch.stack(window).mean())])
                window = []
                if "lopt/log_step_mean" in m:
                    log_steps.append([t, float(m["lopt/log_step_mean"].mean())])
    test = family.final_loss(params, "test", steps, seeds)
    test = torch.where(torch.isfinite(test), test, torch.full_like(test, math.inf))
    diverged = bool((~torch.isfinite(test)).any() or (test > 2 * init_test).any())
    val = family.final_loss(params, "val", steps, seeds)
    return {
        "test": _stats(test),
        "val": _stats(val),
        "train": _stats(family.final_loss(params, "train", steps, seeds)),
        "test_per_seed": test.tolist(),
        "val_per_seed": val.tolist(),
        "diverged": diverged,
        "log_step_curve": log_steps,
        "train_loss_curve": train_curve,
    }


def steps_to_reach(adam: dict[str, Any], level: float) -> int | None:
    """First curve step where tuned Adam's mean test loss is <= ``level`` (None: never)."""
    for s, v in zip(adam["curve_steps"], adam["curve"]):
        if v <= level:
            return int(s)
    return None


def evaluate_task(
    ck: dict[str, Any],
    ht: HeldoutTask,
    steps: int,
    lrs: list[float],
    wds: list[float],
    cached: dict[str, Any] | None = None,
    packed: bool = False,
) -> dict[str, Any]:
    """One (task, horizon) row; ``cached``: its tuned baselines from an earlier result (they
    do not depend on the learned optimizer), else they are tuned here; ``packed``: the
    learned optimizer with packed steps."""
    family = TaskFamily(build_task(ht.spec))
    t0 = time.perf_counter()
    learned = run_learned(ck, family, steps, packed=packed)
    t1 = time.perf_counter()
    out: dict[str, Any] = {"task": ht.name, "steps": steps, "learned": learned}
    if cached is not None:
        out.update({k: dict(cached[k]) for k in BASELINES})
        for k in BASELINES:  # a result written before the train column: rerun the chosen setting
            if out[k].get("train") is None:
                run = run_grid(family, GRID_NAME[k], [out[k]["setting"]], SEEDS, steps)
                out[k]["train"] = _stats(run.train[0])
    else:
        for k in BASELINES:  # weight decay is AdamW's alone
            out[k] = tuned(family, GRID_NAME[k], steps, lrs, wds if k == "adamw" else None)
    lt, at = learned["test"]["mean"], out["adam"]["test"]["mean"]
    out["ratio_vs_adam"] = lt / at if at > 0 and math.isfinite(lt) else math.inf
    out["learned_le_adam"] = lt <= at
    out["learned_le_all"] = all(lt <= out[k]["test"]["mean"] for k in BASELINES)
    out["adam_steps_to_learned_final"] = steps_to_reach(out["adam"], lt)
    # fits less: the learned final train loss is above tuned Adam's (with test above too, an
    # underfit loss; with test at or below, a win by regularization)
    out["learned_fits_less"] = learned["train"]["mean"] > out["adam"]["train"]["mean"]
    out["learned_wall_s"] = t1 - t0
    return out


def cached_baselines(path: str, config: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """The tuned baselines of an earlier result, by (task, steps), for ``--baselines``.

    Tuning is deterministic (the same seeds, grids and minibatch order) on one kind of CPU,
    so a row can be reused when its task's spec, the seeds and both grids are the ones of this
    run (on another CPU the float kernels differ, and a chaotic run can move by a percent: the
    caller records the result's machine beside this one's); a result
    written before the curves were kept (no ``curve``) cannot give steps-to-reach, so it is
    refused."""
    old = json.loads(Path(path).read_text())["config"]
    for key in ("seeds", "lr_grid", "adamw_wd_grid", "quick"):
        if old[key] != config[key]:
            raise SystemExit(f"--baselines {path}: its {key} {old[key]} is not {config[key]}")
    out = {}
    for row in old["per_task"] + old["per_task_x10"]:
        name = row["task"]
        if old["tasks"].get(name) != config["tasks"].get(name):
            continue  # a task changed (or left the suite): tune it again
        if any("curve" not in row[k] for k in BASELINES):
            raise SystemExit(f"--baselines {path}: written without the baselines' curves")
        out[(name, int(row["steps"]))] = row
    return out


def training_distributions(cks: list[dict[str, Any]]) -> list[TaskDistribution]:
    """The meta-training distributions a suite must lie outside: the shipped preset's and
    each checkpoint's own (recorded in its ``problem``; a recipe may widen the preset's)."""
    dists = [TaskDistribution()]
    for ck in cks:
        d = (ck.get("problem") or {}).get("distribution")
        if d:
            dists.append(TaskDistribution(DistributionConfig.from_dict(d)))
    return dists


def result_test_losses(path: str | Path) -> dict[tuple[str, int], dict[str, float]]:
    """Tuned Adam's and the learned optimizer's mean final test loss by (task, steps) in a
    result of this suite, both horizons (what the diagnostics beside it compare with)."""
    config = json.loads(Path(path).read_text())["config"]
    return {
        (r["task"], int(r["steps"])): {
            "adam": float(r["adam"]["test"]["mean"]),
            "learned": float(r["learned"]["test"]["mean"]),
        }
        for r in config["per_task"] + config["per_task_x10"]
    }


def ratio_summary(ratios: list[float]) -> dict[str, float]:
    """The suite's summaries of per-task ratios to tuned Adam (all finite and > 0): the
    fraction at or below 1, the median and the geometric mean."""
    return {
        "le_adam_frac": sum(r <= 1.0 for r in ratios) / len(ratios),
        "median_ratio": statistics.median(ratios),
        "geomean_ratio": math.exp(statistics.fmean(math.log(r) for r in ratios)),
    }


def _summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    ratios = [r["ratio_vs_adam"] for r in rows]
    finite = all(math.isfinite(r) and r > 0 for r in ratios)
    return {
        "tasks": len(rows),
        "learned_le_adam_frac": sum(r["learned_le_adam"] for r in rows) / len(rows),
        "learned_le_all_baselines_frac": sum(r["learned_le_all"] for r in rows) / len(rows),
        "median_ratio_vs_adam": statistics.median(ratios),
        "geomean_ratio_vs_adam": math.exp(statistics.fmean(math.log(r) for r in ratios))
        if finite
        else math.inf,
        "diverged_tasks": sum(r["learned"]["diverged"] for r in rows),
        "baseline_lr_on_edge": sum(r[k]["lr_on_edge"] for r in rows for k in BASELINES),
        "baseline_val_degenerate": sum(r[k]["val_degenerate"] for r in rows for k in BASELINES),
        "adamw_wd_on_top_edge": sum(r["adamw"]["wd_on_top_edge"] for r in rows),
        **_fit_summary(rows),
    }


def _fit_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Where the learned optimizer wins and loses, by its final train loss against tuned
    Adam's: losses with the train loss above Adam's too (``underfit_losses``) and wins with it
    above (``regularized_wins``); empty for rows written before the train column."""
    if any("learned_fits_less" not in r for r in rows):
        return {}
    lost = [r for r in rows if not r["learned_le_adam"]]
    won = [r for r in rows if r["learned_le_adam"]]
    return {
        "learned_train_le_adam_frac": sum(not r["learned_fits_less"] for r in rows) / len(rows),
        "underfit_losses": sum(r["learned_fits_less"] for r in lost),
        "overfit_losses": sum(not r["learned_fits_less"] for r in lost),
        "regularized_wins": sum(r["learned_fits_less"] for r in won),
    }


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="learned optimizer (default: shipped)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the suite")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--t-meta", type=positive_int, default=None,
                   help="the suite's horizon unit (default: the checkpoint's)")  # fmt: skip
    p.add_argument("--packed", action="store_true",
                   help="packed learned steps (faster, equal to rounding)")  # fmt: skip
    p.add_argument("--merge", nargs="+", default=None, metavar="PART.json",
                   help="write one result from parts run apart with --tasks")  # fmt: skip
    p.add_argument(
        "--baselines",
        default=None,
        metavar="RESULT.json",
        help="reuse the tuned baselines of an earlier result (same suite and grids)",
    )
    args = p.parse_args()
    if args.merge:
        merge(args.merge, args.out, args.checkpoint)
        return
    torch.set_num_threads(args.threads)
    path = args.checkpoint or default_checkpoint()
    ck = checkpoints.load_meta(path)
    t_meta = args.t_meta or int(ck["config"]["inner_steps"])
    suite = list(SUITE)
    if args.tasks:
        want = set(args.tasks.split(","))
        suite = [t for t in suite if t.name in want]
    lrs, wds, mults = LR_GRID, WD_GRID, (None, 10)
    if args.quick:
        suite = suite[:3]
        lrs, wds = log_grid(1e-3, 1.0, 4), [1e-4, 1e-2]
        t_meta, mults = 25, (None,)
    dists = training_distributions([ck])
    inside = [t.name for t in suite if any(d.contains(t.spec) for d in dists)]
    if inside:
        raise SystemExit(f"held-out tasks inside the meta-training distribution: {inside}")
    t0 = time.perf_counter()
    run_config = {
        "seeds": list(SEEDS),
        "lr_grid": [lrs[0], lrs[-1], len(lrs)],
        "adamw_wd_grid": wds,
        "quick": args.quick,
        "tasks": task_table(suite),
    }
    if args.packed:  # recorded only when on, so earlier results' configs still match
        run_config["packed"] = True
    cache = cached_baselines(args.baselines, run_config) if args.baselines else {}
    main_rows, long_rows = [], []
    for ht in suite:
        for mult in mults:
            steps = t_meta * (mult or ht.horizon_mult)
            row = evaluate_task(
                ck, ht, steps, lrs, wds, cache.get((ht.name, steps)), packed=args.packed
            )
            row["horizon_mult"] = mult or ht.horizon_mult
            (long_rows if mult else main_rows).append(row)
            print(
                f"{ht.name} x{row['horizon_mult']}: learned {row['learned']['test']['mean']:.4f}"
                f" adam {row['adam']['test']['mean']:.4f} ratio {row['ratio_vs_adam']:.3f}"
                f" (train: learned {row['learned']['train']['mean']:.4f}"
                f" adam {row['adam']['train']['mean']:.4f})",
                flush=True,
            )
    config = {
        "checkpoint": str(path),
        "t_meta": t_meta,
        **run_config,
        "per_task": main_rows,
        "per_task_x10": long_rows,
    }
    if args.baselines:
        config["baselines_from"] = args.baselines
        there, here = json.loads(Path(args.baselines).read_text()).get("machine"), machine_info()
        config["baselines_machine"] = there
        if there != here:
            print(
                f"note: the reused baselines ran on {there}, this run on {here}; float kernels "
                "differ between CPUs",
                file=sys.stderr,
            )
        config["baselines_reused"] = sum(1 for r in main_rows + long_rows
                                         if (r["task"], r["steps"]) in cache)  # fmt: skip
    out = args.out or (None if not args.quick else "benchmarks/results/lopt_heldout.quick.json")
    report(ck, config, time.perf_counter() - t0, out)


def meta_train_minutes(ck: dict[str, Any]) -> dict[str, Any]:
    """How long the checkpoint's meta-training took, in minutes, and on what basis: for an
    ensemble that records how many members ran at once, its members' clocks on that many
    slots (``parallel_wall_s``: the command's wall-clock); otherwise the checkpoint's
    ``wall_s`` (for an older ensemble, the sum of its members' clocks: an upper bound)."""
    if "parallel_wall_s" in ck:
        return {
            "meta_train_minutes": float(ck["parallel_wall_s"]) / 60,
            "meta_train_minutes_basis": f"members' clocks, {int(ck['parallel'])} at a time",
            "meta_train_member_minutes": float(ck["wall_s"]) / 60,
        }
    basis = "sum of the members' clocks" if ck.get("members") else "the run's clock"
    return {
        "meta_train_minutes": float(ck["wall_s"]) / 60,
        "meta_train_minutes_basis": basis,
    }


def report(ck: dict[str, Any], config: dict[str, Any], wall_s: float, out: Any) -> None:
    """Summaries and targets of the rows in ``config`` (``per_task``, ``per_task_x10``)."""
    main_rows, long_rows = config["per_task"], config["per_task_x10"]
    main_s = _summary(main_rows)
    metrics: dict[str, Any] = {f"main/{k}": v for k, v in main_s.items()}
    targets = {
        "learned_le_adam_frac": target(main_s["learned_le_adam_frac"], ">= 0.8"),
        "median_ratio_vs_adam": target(main_s["median_ratio_vs_adam"], "<= 0.9"),
        "diverged_tasks": target(
            float(main_s["diverged_tasks"] + sum(r["learned"]["diverged"] for r in long_rows)),
            "<= 0",
        ),
    }
    if long_rows:
        long_s = _summary(long_rows)
        metrics.update({f"x10/{k}": v for k, v in long_s.items()})
        targets["x10_learned_le_adam_frac"] = target(long_s["learned_le_adam_frac"], ">= 0.6")
    metrics["wall_s"] = wall_s
    if "wall_s" in ck:  # the meta-training that made the checkpoint (its own clock)
        metrics.update(meta_train_minutes(ck))
        targets["meta_train_minutes"] = target(metrics["meta_train_minutes"], "<= 90")
    write_result("lopt_heldout", config, metrics, targets, out)


def merge(files: list[str], out: Any, checkpoint: str | None = None) -> None:
    """One result from parts of the suite run apart (``--tasks``), for the same checkpoint
    and grids; wall_s is the sum of the parts'. ``checkpoint``: where the checkpoint they
    evaluated is now (when the file at their recorded path has since been replaced)."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    same = ("checkpoint", "t_meta", "seeds", "lr_grid", "adamw_wd_grid", "quick")
    for f, d in zip(files[1:], parts[1:]):
        bad = [k for k in same if d["config"][k] != parts[0]["config"][k]]
        if bad:
            raise SystemExit(f"{f}: {', '.join(bad)} differ from {files[0]}'s")
    config = {k: parts[0]["config"][k] for k in same}
    config["tasks"] = {k: v for d in parts for k, v in d["config"]["tasks"].items()}
    order = [t.name for t in SUITE]
    for key in ("per_task", "per_task_x10"):
        rows = [r for d in parts for r in d["config"][key]]
        config[key] = sorted(rows, key=lambda r: order.index(r["task"]))
    names = [r["task"] for r in config["per_task"]]
    if len(set(names)) != len(names):
        raise SystemExit(f"a task appears in more than one part: {names}")
    config["merged_from"] = [str(f) for f in files]
    sources = {d["config"].get("baselines_from") for d in parts} - {None}
    if sources:
        config["baselines_from"] = sorted(sources)
        config["baselines_reused"] = sum(d["config"].get("baselines_reused", 0) for d in parts)
        machines = [
            d["config"]["baselines_machine"] for d in parts if "baselines_from" in d["config"]
        ]
        config["baselines_machine"] = (
            machines[0] if all(m == machines[0] for m in machines) else machines
        )
    if checkpoint:
        config["checkpoint"] = str(checkpoint)
    ck = checkpoints.load_meta(config["checkpoint"])
    report(ck, config, sum(float(d["metrics"]["wall_s"]) for d in parts), out)


if __name__ == "__main__":
    main()
