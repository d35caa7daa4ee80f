"""Which output of the learned optimizer makes its wins: the ``lopt`` core with one output off.

The ``lopt`` core (:mod:`selfref.net.cores.lopt`) has four learned outputs. Each is the
bounded image of one row of a last layer, so zeroing that row's weights and bias in φ turns
exactly that output off (to 0, its untrained value) and leaves the rest as meta-trained:

- ``no_dir``: the per-coordinate direction correction d_i (``mlp.w_out`` row 0); the step is
  then along Adam's direction only;
- ``no_mag``: the per-coordinate log-magnitude s_i (``mlp.w_out`` row 1);
- ``no_offset``: the controller's immediate per-tensor log step offset (``ctrl.w_out`` row 0);
- ``no_adapt``: the rate at which the accumulated per-tensor offset A_T moves
  (``ctrl.w_out`` row 1), so A_T stays 0 (for a core without the hypergradient and backoff
  rules, as shipped).

A checkpoint with the held-out decay (``decay_index``) has two more variants, its two
meta-parameters set instead of a row zeroed:

- ``fixed_decay``: the decay's rate κ set to 0 (``decay.log_rate`` → −∞), so λ_T stays at
  its meta-learned start λ₀ and never follows the held-out gradient;
- ``no_decay``: λ₀ at the floor ``decay_min`` and κ = 0 — a decay of ``decay_min`` times the
  step, 10⁻⁴ in the shipped configuration, which is none in effect.

On every task of the held-out suite at its horizon, over the suite's 3 seeds, each variant's
mean final test loss is divided by tuned Adam's from a ``lopt_heldout`` result (``--heldout``,
by default the committed one: the baselines do not depend on the learned optimizer), and
summarized as that suite does (fraction ≤ tuned Adam, median and geometric mean ratio). Each
variant's final train loss is kept beside its test loss, and with a ``--heldout`` result that
has the train column, ``underfit_losses`` counts the tasks it loses to tuned Adam while also
fitting the train split less (as lopt_heldout does). No targets: a diagnostic of what the
checkpoint relies on.

Run: ``python -m benchmarks.lopt_ablation`` (``--checkpoint PATH`` for another ``lopt``
checkpoint meta-trained at the same horizon; ``--quick``: two tasks at a quarter horizon).
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, base_parser, write_result
from benchmarks.lopt_heldout import SUITE, ratio_summary, run_learned, task_table
from selfref import checkpoints
from selfref.meta.family import TaskFamily
from selfref.net.optimizer import default_checkpoint
from selfref.tasks.distribution import build_task

# variant -> (last layer, row) whose weights and bias are zeroed; "full" changes nothing
VARIANTS: dict[str, tuple[str, int] | None] = {
    "full": None,
    "no_dir": ("mlp", 0),
    "no_mag": ("mlp", 1),
    "no_offset": ("ctrl", 0),
    "no_adapt": ("ctrl", 1),
}
DECAY_VARIANTS: tuple[str, ...] = ("fixed_decay", "no_decay")  # checkpoints with the decay


def _lopt_options(ck: dict[str, Any]) -> dict[str, Any]:
    """The lopt core options of ``ck`` (an ensemble's: its members')."""
    opts = ck["net"].get("core_options", {})
    return opts.get("member_options", {}) if ck["net"].get("core") == "ensemble" else opts


def _prefixes(ck: dict[str, Any]) -> list[str]:
    """Where the lopt φ lies: ``core.`` (or, in an ensemble, each member's ``core.m<i>.``:
    a variant turns the same output off in every member)."""
    net = ck["net"]
    if net.get("core") == "ensemble":
        return [f"core.m{i}." for i in range(int(net["core_options"]["members"]))]
    return ["core."]


def variants_of(ck: dict[str, Any]) -> list[str]:
    """The variants that apply to checkpoint ``ck``."""
    has_decay = int(_lopt_options(ck).get("decay_index", -1)) >= 0
    return list(VARIANTS) + (list(DECAY_VARIANTS) if has_decay else [])


def ablated(ck: dict[str, Any], variant: str) -> dict[str, Any]:
    """A copy of checkpoint ``ck`` whose φ (best and last) has ``variant``'s output off."""
    if variant not in variants_of(ck):
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(variants_of(ck))}")
    out = copy.deepcopy(ck)
    if variant in DECAY_VARIANTS:
        floor = math.log(float(_lopt_options(ck)["decay_min"]))
        for key in ("best_meta_params", "meta_params"):
            phi = out.get(key)
            if phi is None:
                continue
            for pre in _prefixes(ck):
                rate, init = f"{pre}decay.log_rate", f"{pre}decay.log_init"
                phi[rate] = torch.full_like(phi[rate], -math.inf)
                if variant == "no_decay":
                    phi[init] = torch.full_like(phi[init], floor)
        return out
    where = VARIANTS[variant]
    if where is None:
        return out
    part, row = where
    for key in ("best_meta_params", "meta_params"):
        phi = out.get(key)
        if phi is None:
            continue
        for pre in _prefixes(ck):
            w, b = f"{pre}{part}.w_out", f"{pre}{part}.b_out"
            if w not in phi:
                raise SystemExit(f"the checkpoint's φ has no {w}: not an lopt core")
            phi[w] = phi[w].clone()
            phi[b] = phi[b].clone()
            phi[w][row] = 0.0
            phi[b][row] = 0.0
    return out


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="an lopt checkpoint (default: shipped)")
    p.add_argument(
        "--heldout",
        default=str(RESULTS_DIR / "lopt_heldout.json"),
        help="lopt_heldout result whose tuned Adam rows are the reference (default: committed)",
    )
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = args.checkpoint or str(default_checkpoint())
    ck = checkpoints.load_meta(path)
    net = ck["net"]
    if net.get("core") != "lopt" and net.get("core_options", {}).get("member") != "lopt":
        raise SystemExit(f"{path} is not an lopt checkpoint (core {net.get('core')!r})")
    t_meta = int(ck["config"]["inner_steps"])
    suite = list(SUITE)
    adam: dict[str, float] = {}
    adam_train: dict[str, float] = {}  # tuned Adam's final train loss (results with the column)
    if args.quick:
        suite, t_meta = suite[:2], t_meta // 4
    else:
        held = json.loads(Path(args.heldout).read_text())["config"]
        if int(held["t_meta"]) != t_meta:
            raise SystemExit(f"{args.heldout} ran at T_meta {held['t_meta']}, not {t_meta}")
        adam = {r["task"]: float(r["adam"]["test"]["mean"]) for r in held["per_task"]}
        adam_train = {r["task"]: float(r["adam"]["train"]["mean"]) for r in held["per_task"]
                      if r["adam"].get("train")}  # fmt: skip
    t0 = time.perf_counter()
    rows = []
    names = variants_of(ck)
    for ht in suite:
        family = TaskFamily(build_task(ht.spec))
        steps = t_meta * ht.horizon_mult
        row: dict[str, Any] = {"task": ht.name, "steps": steps, "adam_test": adam.get(ht.name),
                               "adam_train": adam_train.get(ht.name)}  # fmt: skip
        for v in names:
            out = run_learned(ablated(ck, v), family, steps)
            row[v] = {"test": out["test"]["mean"], "train": out["train"]["mean"],
                      "diverged": out["diverged"]}  # fmt: skip
            if row["adam_test"]:
                row[v]["ratio"] = out["test"]["mean"] / row["adam_test"]
        rows.append(row)
        print(
            f"{ht.name}: "
            + " ".join(f"{v} {row[v].get('ratio', row[v]['test']):.3f}" for v in names),
            flush=True,
        )
    metrics: dict[str, Any] = {"wall_s": time.perf_counter() - t0}
    for v in names:
        ratios = [r[v]["ratio"] for r in rows if "ratio" in r[v]]
        if ratios and all(math.isfinite(x) and x > 0 for x in ratios):
            metrics.update({f"{v}/{k}": x for k, x in ratio_summary(ratios).items()})
        metrics[f"{v}/diverged_tasks"] = sum(r[v]["diverged"] for r in rows)
        if rows and all(r["adam_train"] and r["adam_test"] for r in rows):  # lopt_heldout's
            metrics[f"{v}/underfit_losses"] = sum(
                r[v]["test"] > r["adam_test"] and r[v]["train"] > r["adam_train"] for r in rows
            )
    config = {
        "checkpoint": path,
        "t_meta": t_meta,
        "heldout": None if args.quick else args.heldout,
        "quick": args.quick,
        "tasks": task_table(suite),
        "per_task": rows,
    }
    out = args.out or (None if not args.quick else "benchmarks/results/lopt_ablation.quick.json")
    write_result("lopt_ablation", config, metrics, {}, out)


if __name__ == "__main__":
    main()
