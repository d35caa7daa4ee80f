"""Round 40's question, offline: can the first steps of a run tell the step size a task needs?

Every learned optimizer so far carries one compromise step (``benchmarks/lopt_steptrack.py``:
slope 0.12-0.21 of its log step on tuned Adam's log learning rate). Before building a modifier
that infers the step per task (or a supervised step target for meta-training), this asks
whether the information is there at all. For tasks of the meta-training distribution (the
``lopt`` preset's, at seeds of its training range), it records

- the target: tuned Adam's log learning rate at the meta-training horizon (200 steps; the
  held-out suite's 13-point grid, widened off an edge, 3 seeds, chosen on val);
- features an optimizer could compute from its own first ``k`` steps, with no extra gradient
  evaluation, here from Adam at E22's starting step (e^−3.3): the log ratio of the last to the
  first minibatch losses, the mean cosine of successive gradients, the mean cosine of each
  gradient with the last step, the log ratio of the last to the first gradient norm, the
  initial loss, log10 RMS of the initial weights, log parameter count, depth, log batch size
  and whether it is a regression;

and reports the leave-one-out R² of a ridge regression and of a random forest
(scikit-learn) predicting the target from the features, against the R² of the features a
learned optimizer cannot change during a run (the static ones alone).

Run (from the repository root)::

    python -m experiments.rounds.round40_learnability --tasks 100 --workers 2
"""

from __future__ import annotations

import argparse
import json
import math
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.lopt_heldout import LR_GRID, tuned
from selfref.meta.family import TaskFamily
from selfref.tasks.distribution import DistributionConfig, TaskDistribution, build_task

SEED_BASE = 3_000_000  # inside the meta-training range [0, 2^30), far from its first draws
START_LR = math.exp(-3.3)  # E22's starting step (round 35's decomposition)
DYNAMIC = ("loss_ratio", "grad_cos", "step_cos", "grad_norm_ratio")
STATIC = ("init_loss", "log10_rms", "log_params", "depth", "log_batch", "regression")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm() + 1e-30))


def probe(family: TaskFamily, k: int) -> dict[str, float]:
    """The features of ``k`` Adam steps at :data:`START_LR` from the suite's first seed."""
    task = family.task
    params = {n: p.clone().requires_grad_(True) for n, p in task.init_params(
        torch.Generator().manual_seed(0)).items()}  # fmt: skip
    opt = torch.optim.Adam(params.values(), lr=START_LR)
    losses, grads, steps = [], [], []
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    for t in range(k):
        before = flat([p.detach() for p in params.values()]).clone()
        loss = task.loss(params, task.batch("train", t, 0))
        opt.zero_grad()
        loss.backward()
        grads.append(flat([p.grad for p in params.values()]).clone())
        losses.append(float(loss.detach()))
        opt.step()
        steps.append(flat([p.detach() for p in params.values()]) - before)
    w = [p.detach() for n, p in params.items() if n.endswith("weight")]
    n = sum(p.numel() for p in params.values())
    head, tail = float(np.mean(losses[:3])), float(np.mean(losses[-3:]))
    return {
        "loss_ratio": math.log(max(tail, 1e-8) / max(head, 1e-8)),
        "grad_cos": float(np.mean([_cos(a, b) for a, b in zip(grads[1:], grads[:-1])])),
        "step_cos": float(np.mean([_cos(g, s) for g, s in zip(grads[1:], steps[:-1])])),
        "grad_norm_ratio": math.log(float(grads[-1].norm()) / (float(grads[0].norm()) + 1e-30)),
        "init_loss": math.log(max(losses[0], 1e-8)),
        "log10_rms": float(
            np.mean([math.log10(float(x.pow(2).mean().sqrt()) + 1e-12) for x in w])
        ),  # fmt: skip
        "log_params": math.log(n),
        "depth": float(len(getattr(task.spec, "hidden", ()))),
        "log_batch": math.log(task.batch_size),
        "regression": float(task.regression),
    }


def _job(job: tuple[int, int, int]) -> dict[str, Any]:
    seed, steps, k = job
    torch.set_num_threads(1)
    spec = TaskDistribution(DistributionConfig(label_noise_prob=0.6)).sample(seed)
    family = TaskFamily(build_task(spec))
    adam = tuned(family, "adam", steps, LR_GRID, None)
    return {"seed": seed, "task": spec.label(), "log_lr": math.log(adam["setting"]["lr"]),
            "lr_on_edge": adam["lr_on_edge"], "features": probe(family, k)}  # fmt: skip


def loo_r2(x: np.ndarray, y: np.ndarray, model: str) -> float:
    """Leave-one-out R² of ``model`` ("ridge" or "forest") predicting y from x."""
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import LeaveOneOut, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    est = (
        make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
        if model == "ridge"
        else RandomForestRegressor(n_estimators=200, min_samples_leaf=3, random_state=0)
    )
    pred = cross_val_predict(est, x, y, cv=LeaveOneOut())
    return float(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--steps", type=int, default=200, help="tuned Adam's horizon")
    ap.add_argument("--probe-steps", type=int, default=20, help="k: the probe's steps")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON of the rows and the R² values")
    args = ap.parse_args()
    jobs = [(SEED_BASE + i, args.steps, args.probe_steps) for i in range(args.tasks)]
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(tqdm(pool.map(_job, jobs), total=len(jobs), desc="round40"))
    y = np.array([r["log_lr"] for r in rows])
    result: dict[str, Any] = {"tasks": len(rows), "log_lr_sd": float(y.std()),
                              "lr_on_edge": sum(r["lr_on_edge"] for r in rows)}  # fmt: skip
    for name, cols in (("all", DYNAMIC + STATIC), ("static", STATIC), ("dynamic", DYNAMIC)):
        x = np.array([[r["features"][c] for c in cols] for r in rows])
        for model in ("ridge", "forest"):
            result[f"{name}/{model}_loo_r2"] = loo_r2(x, y, model)
    for c in DYNAMIC + STATIC:
        v = np.array([r["features"][c] for r in rows])
        result[f"corr/{c}"] = float(np.corrcoef(v, y)[0, 1]) if v.std() > 0 else 0.0
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"result": result, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
