"""Meta-gradient estimators against the true gradient on a problem with a known truncation bias.

The problem is influence balancing (Vicol, Metz & Sohl-Dickstein 2021, §5.1, after Tallec &
Ollivier 2018; :class:`~selfref.meta.problems.toy.InfluenceBalancing`): θ drives the first 10
of 23 coupled states up and the other 13 down, so its short-run effect on the loss
½(s[0] − 1)² has the opposite sign of its long-run effect. The meta-objective is the mean loss
over a horizon of T = 1,000 steps from s = 1, cut into truncations of K = 10 steps; θ starts
at the paper's 0.5.

1. Gradient quality at θ = 0.5. The true gradient is float64 autograd through all T steps.
   Each truncated estimator (tbptt, truncated_es, pes) is summed over the T/K truncations of
   one trajectory at the fixed θ — the gradient of the full horizon it stands for — and each
   full-horizon estimator (es, full_bptt) gives one estimate. Reported per estimator and
   number of particles P (antithetic, on one instance): the mean over R independent
   trajectories of the cosine similarity with the true gradient, and the relative error of
   their mean with its standard error. θ is a scalar, so the cosine of one estimate is its
   sign agreement (±1) and the mean cosine is 2·P(right sign) − 1. tbptt is also reported at
   K = 1 (the paper's setting) and K = 100.
2. Meta-optimization. Each of tbptt, es, truncated_es and pes meta-trains θ through the one
   trainer (:class:`~selfref.meta.trainer.MetaTrainer`: Adam, cosine-decayed meta learning
   rate, the same number of meta-steps and particles for all; seeds 0, 1, 2), and the loss of
   the final θ is compared with the true optimum's (L-BFGS on the exact objective). ES makes
   one full-horizon estimate per meta-step, so it spends T/K times the inner steps of the
   truncated estimators for the same number of updates (``grad_evals``).

Targets: PES cosine >= 0.9 at P = ``--particles`` where truncated BPTT's is <= 0.5 (it points
the wrong way: -1); PES ends within 5 % of the optimum's loss (ratio <= 1.05) where
truncated BPTT does not (> 1.05) — on every seed (the worst PES run, the best truncated-BPTT
run). Costs are in gradient evaluations (:mod:`selfref.budget`).

Run: ``.venv/bin/python -m benchmarks.estimators [--quick]``
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, base_parser, target, write_result
from selfref.meta.estimators import estimator_options, make_estimator
from selfref.meta.problems.toy import InfluenceBalancing
from selfref.meta.trainer import MetaTrainConfig, MetaTrainer
from selfref.params import Params
from selfref.tasks.base import resolve_device

TRUNCATED = ("tbptt", "truncated_es", "pes")
META_OPT = ("tbptt", "es", "truncated_es", "pes")


def true_gradient(problem: InfluenceBalancing, phi: Params, horizon: int) -> torch.Tensor:
    theta = phi["theta"].detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(problem.full_loss({"theta": theta}, horizon), [theta])
    return g


def true_optimum(problem: InfluenceBalancing, horizon: int) -> tuple[float, float]:
    """θ* and L(θ*) by L-BFGS on the exact objective (it is quadratic in θ)."""
    theta = torch.zeros(1, dtype=problem.dtype, device=problem.device, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=200, tolerance_grad=1e-14, tolerance_change=0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = problem.full_loss({"theta": theta}, horizon)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(theta), float(problem.full_loss({"theta": theta}, horizon))


def options(name: str, unroll: int, particles: int, sigma: float) -> dict[str, Any]:
    wanted = {"unroll": unroll, "meta_batch": 1, "particles": particles, "sigma": sigma}
    return {k: v for k, v in wanted.items() if k in estimator_options(name)}


def trajectory_estimate(
    name: str,
    problem: InfluenceBalancing,
    phi: Params,
    horizon: int,
    opts: dict[str, Any],
    seed: int,
) -> tuple[torch.Tensor, float]:
    """One trajectory's estimate at fixed φ (summed over its truncations) and its cost."""
    est = make_estimator(name, **opts)
    state = est.init(problem, phi, torch.Generator().manual_seed(seed), 0)
    steps = math.ceil(horizon / opts["unroll"]) if name in TRUNCATED else 1
    total, cost = torch.zeros_like(phi["theta"]), 0.0
    for s in range(steps):
        gen = torch.Generator().manual_seed(seed * 100_003 + s)
        e = est.estimate(problem, phi, state, gen, horizon, s)
        state, total, cost = e.state, total + e.grads["theta"], cost + e.grad_evals
    return total, cost


def gradient_quality(
    name: str,
    problem: InfluenceBalancing,
    phi: Params,
    g: torch.Tensor,
    horizon: int,
    opts: dict[str, Any],
    repeats: int,
) -> dict[str, float]:
    deterministic = name in ("tbptt", "full_bptt")
    ests, cost = [], 0.0
    for r in range(1 if deterministic else repeats):
        e, cost = trajectory_estimate(name, problem, phi, horizon, opts, seed=r)
        ests.append(e)
    x = torch.stack(ests)  # (R, 1)
    cos = torch.nn.functional.cosine_similarity(x, g.expand_as(x), dim=1)  # (R,)
    mean = x.mean(0)
    se = x.std(0) / math.sqrt(len(ests)) if len(ests) > 1 else torch.zeros_like(mean)
    return {
        "cosine": float(cos.mean()),
        "rel_error": float((mean - g).norm() / g.norm()),
        "rel_se": float(se.norm() / g.norm()),
        "grad_evals_per_trajectory": cost,
    }


def meta_optimize(name: str, problem: InfluenceBalancing, args: Any, seed: int) -> dict[str, float]:
    cfg = MetaTrainConfig(
        meta_steps=args.meta_steps,
        estimator=name,
        estimator_options={
            k: v
            for k, v in {"particles": args.particles, "sigma": args.sigma}.items()
            if k in estimator_options(name)
        },
        unroll=args.unroll,
        inner_steps=args.horizon,
        meta_batch=1,
        meta_lr=args.meta_lr,
        lr_schedule="cosine",
        eval_every=0,
        checkpoint_every=0,
        seed=seed,
    )
    t0 = time.perf_counter()
    res = MetaTrainer(problem, cfg).train()
    wall = time.perf_counter() - t0
    ev = problem.evaluate(res.meta_params)
    return {
        "theta": float(res.meta_params["theta"].reshape(-1)[0]),
        "loss": ev["loss"],
        "grad_evals": res.meta_train_grad_evals,
        "skipped": float(res.skipped),
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--horizon", type=int, default=1000, help="T, inner steps per trajectory")
    p.add_argument("--unroll", type=int, default=10, help="K, steps per truncation")
    p.add_argument("--particles", type=int, default=100, help="P, ES/PES particles (even)")
    p.add_argument(
        "--particle-grid", default="2,10,100,1000", help="P values of the gradient section"
    )
    p.add_argument("--sigma", type=float, default=0.1, help="ES/PES σ (Vicol et al.: 0.1)")
    p.add_argument("--repeats", type=int, default=None, help="R trajectories (default 20; quick 5)")
    p.add_argument(
        "--meta-steps", type=int, default=None, help="meta-steps each (default 1000; quick 300)"
    )
    p.add_argument(
        "--meta-lr", type=float, default=None, help="Adam meta learning rate (0.01; quick 0.02)"
    )
    p.add_argument("--seeds", default=None, help="meta-optimization seeds (default 0,1,2; quick 0)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (5 if args.quick else 20)
    args.meta_steps = args.meta_steps or (300 if args.quick else 1000)
    args.meta_lr = args.meta_lr or (0.02 if args.quick else 0.01)  # quick: fewer, larger steps
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    grid = [int(x) for x in args.particle_grid.split(",")]
    if args.quick:
        grid = [x for x in grid if x <= args.particles]
    device = resolve_device(args.device)
    problem = InfluenceBalancing(eval_steps=args.horizon, device=device)
    phi = problem.init_meta_params(torch.Generator().manual_seed(0))  # θ0 = 0.5, no draw
    g = true_gradient(problem, phi, args.horizon)
    theta_star, loss_star = true_optimum(problem, args.horizon)
    metrics: dict[str, float] = {
        "true_grad": float(g),
        "theta_star": theta_star,
        "loss_star": loss_star,
        "loss_init": problem.evaluate(phi)["loss"],
    }

    # 1. gradient quality at θ0
    for name in ("full_bptt", "tbptt"):
        q = gradient_quality(
            name, problem, phi, g, args.horizon, options(name, args.unroll, 2, args.sigma), 1
        )
        metrics.update({f"grad/{name}/{k}": v for k, v in q.items()})
    for k in (1, 100):
        if k != args.unroll and not args.quick:
            q = gradient_quality(
                "tbptt", problem, phi, g, args.horizon, options("tbptt", k, 2, args.sigma), 1
            )
            metrics[f"grad/tbptt_k{k}/cosine"] = q["cosine"]
            metrics[f"grad/tbptt_k{k}/rel_error"] = q["rel_error"]
    for name in ("es", "truncated_es", "pes"):
        for n_p in grid:
            opts = options(name, args.unroll, n_p, args.sigma)
            q = gradient_quality(name, problem, phi, g, args.horizon, opts, args.repeats)
            metrics.update({f"grad/{name}/p{n_p}/{k}": v for k, v in q.items()})
    if args.particles not in grid:
        opts = options("pes", args.unroll, args.particles, args.sigma)
        q = gradient_quality("pes", problem, phi, g, args.horizon, opts, args.repeats)
        metrics.update({f"grad/pes/p{args.particles}/{k}": v for k, v in q.items()})

    # 2. meta-optimization through the one trainer
    for name in META_OPT:
        ratios = []
        for seed in seeds:
            m = meta_optimize(name, problem, args, seed)
            metrics.update({f"meta/{name}/s{seed}/{k}": v for k, v in m.items()})
            ratios.append(m["loss"] / loss_star)
            metrics[f"meta/{name}/s{seed}/loss_ratio"] = ratios[-1]
        metrics[f"meta/{name}/loss_ratio_mean"] = sum(ratios) / len(ratios)
        metrics[f"meta/{name}/loss_ratio_max"] = max(ratios)
        metrics[f"meta/{name}/loss_ratio_min"] = min(ratios)

    pes_cos = metrics[f"grad/pes/p{args.particles}/cosine"]
    targets = {
        f"pes_cosine_p{args.particles}": target(pes_cos, ">= 0.9"),
        "tbptt_cosine": target(metrics["grad/tbptt/cosine"], "<= 0.5"),
        # every seed: the worst PES run, the best truncated-BPTT run
        "pes_loss_ratio_max": target(metrics["meta/pes/loss_ratio_max"], "<= 1.05"),
        "tbptt_loss_ratio_min": target(metrics["meta/tbptt/loss_ratio_min"], "> 1.05"),
    }
    config = {
        "problem": problem.describe(),
        "horizon": args.horizon,
        "unroll": args.unroll,
        "particles": args.particles,
        "particle_grid": grid,
        "sigma": args.sigma,
        "repeats": args.repeats,
        "meta_steps": args.meta_steps,
        "meta_lr": args.meta_lr,
        "lr_schedule": "cosine",
        "meta_batch": 1,
        "seeds": seeds,
        "threads": args.threads,
        "quick": args.quick,
        "device": str(device),
    }
    out = args.out or (RESULTS_DIR / "estimators.quick.json" if args.quick else None)
    return write_result("estimators", config, metrics, targets, out=out)


if __name__ == "__main__":
    main()
