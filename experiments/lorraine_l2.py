"""Lorraine & Duvenaud 2018, L2 experiment on digits: hyper-training one λ and per-layer λs.

Three parts, one run directory (``<logdir>/lorraine_l2/<stamp>-hypernet-s<seed>/``):

1. **Best-response curve** (the paper's figure of the global hypernetwork): a global MLP
   hypernetwork is fit on p(λ) over the whole L2 range, then λ is optimized through it. For
   each λ of a grid, the validation loss *predicted* by the hypernetwork, L_val(w_φ(λ)), is
   put beside the *true* validation loss of a model trained from scratch at that fixed λ
   (``selfref.train.train`` with Adam, ``l2 = 2·e^λ``, as many steps as the hypernetwork's
   φ steps). Plotted in ``best_response.png`` and logged as TensorBoard scalars
   (``best_response/predicted_val_loss``, ``best_response/trained_val_loss`` and
   ``best_response/log10_l2`` against the grid index).
2. **One λ**, local variant (Algorithm 2): λ̂'s trajectory and the final losses.
3. **Per-layer λ** (one L2 weight per layer of the MLP), local variant.

For 2 and 3, λ̂ is also evaluated as a search method would evaluate it: a model trained from
scratch at λ̂ (the same Adam and steps as the best-response curve's trained models); its
val and test loss are reported beside those of w_φ(λ̂) (``retrained`` in results.json).
Lorraine & Duvenaud's claim is about the hyperparameter, so the retrained numbers are the
ones to compare with a grid.

Task: digits-mlp 64→50→10 by default (``--task digits-logreg`` for the convex case, where
per-layer is the same as one λ). Each hyper-training run spends ``--budget`` gradient
evaluations.

Run:
    .venv/bin/python experiments/lorraine_l2.py                 # the full experiment (~minutes)
    .venv/bin/python experiments/lorraine_l2.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from selfref.budget import Budget
from selfref.logging import MultiLogger, TensorBoardLogger
from selfref.methods.hypernet import HypernetHPO, best_response_val_loss
from selfref.runs import RunDir, json_default
from selfref.tasks import make
from selfref.train import train


def _train_l2(best_hparams: dict[str, float], params: dict) -> float | dict[str, float]:
    """``best_hparams`` of a hyper-training run as :func:`selfref.train.train`'s ``l2``.

    One λ (``l2``) applies to every weight; per-layer λs (``l2/<layer>``) become a mapping
    onto that layer's weight tensor (biases are not penalized, as in hyper-training).
    """
    if set(best_hparams) == {"l2"}:
        return best_hparams["l2"]
    out = {}
    for label, value in best_hparams.items():
        layer = label.split("/", 1)[1]
        out.update({k: value for k in params if k.startswith(layer + ".") and k.endswith("weight")})
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits-mlp", choices=["digits-mlp", "digits-logreg"])
    p.add_argument("--hidden", type=int, default=50, help="hidden units of digits-mlp")
    p.add_argument("--budget", type=int, default=3000, help="grad evals per hyper-training run")
    p.add_argument("--points", type=int, default=9, help="λ grid of the best-response curve")
    p.add_argument("--l2-low", type=float, default=1e-6, help="lower end of e^λ")
    p.add_argument("--l2-high", type=float, default=1.0, help="upper end of e^λ")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--logdir", default="logs", help="root of run directories")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--quick", action="store_true", help="small budget and grid (a smoke run)")
    return p.parse_args(argv)


def plot(
    path: Path,
    l2s: list[float],
    predicted: list[float],
    trained: list[float],
    found: float,
    found_loss: float,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(l2s, predicted, "-o", ms=3, label="hypernetwork  L_val(w_φ(λ))")
    ax.plot(l2s, trained, "--s", ms=3, label="trained at fixed λ")
    ax.plot([found], [found_loss], "r*", ms=12, label="λ found by hyper-training")
    ax.set_xscale("log")
    ax.set_xlabel("L2 weight e^λ")
    ax.set_ylabel("validation loss")
    ax.set_title("Best-response: predicted vs true validation loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    budget_n = 600 if args.quick else args.budget
    points = 5 if args.quick else args.points
    options: dict = {"device": args.device}
    if args.task == "digits-mlp":
        options["hidden"] = (args.hidden,)
    task = make(args.task, **options)
    run = RunDir.create(
        args.logdir,
        "lorraine_l2",
        "hypernet",
        args.seed,
        argv=[sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
    )
    config = {
        "experiment": "lorraine_l2",
        **vars(args),
        "budget": budget_n,
        "points": points,
        "task_options": options,
    }
    run.write_config(config)
    tb = TensorBoardLogger(run.path)
    results: dict = {}
    try:
        common = {"l2_low": args.l2_low, "l2_high": args.l2_high}
        # 1. global MLP hypernetwork and its best-response curve
        glob = HypernetHPO(variant="global", family="mlp", **common).fit(
            task, Budget(budget_n), logger=MultiLogger([tb]), seed=args.seed
        )
        phi_steps = int(glob.result.extra["phi_steps"])
        log_lams = torch.linspace(math.log(args.l2_low), math.log(args.l2_high), points)
        predicted = best_response_val_loss(glob, task, log_lams)
        trained = []
        for i, lam in enumerate(log_lams.tolist()):
            fixed = train(
                task,
                "adam",
                {"lr": glob.result.extra["config"]["phi_lr"]},
                phi_steps,
                args.seed,
                l2=2 * math.exp(lam),
            )
            trained.append(task.evaluate(fixed.params, "val")["loss"])
            tb.scalar("best_response/predicted_val_loss", predicted[i], i)
            tb.scalar("best_response/trained_val_loss", trained[i], i)
            tb.scalar("best_response/log10_l2", lam / math.log(10), i)
        found = math.exp(float(glob.lam[0]))
        plot(
            run.path / "best_response.png",
            [math.exp(v) for v in log_lams.tolist()],
            predicted,
            trained,
            found,
            glob.result.val_loss,
        )
        results["best_response"] = {
            "l2_weight": [math.exp(v) for v in log_lams.tolist()],
            "predicted_val_loss": predicted,
            "trained_val_loss": trained,
            "trained_steps": phi_steps,
            "mean_abs_gap": sum(abs(a - b) for a, b in zip(predicted, trained)) / points,
            "argmin_predicted_l2": math.exp(log_lams[predicted.index(min(predicted))]),
            "argmin_trained_l2": math.exp(log_lams[trained.index(min(trained))]),
            "global": glob.result.to_dict(),
        }
        # 2./3. local hyper-training with one λ and with one λ per layer
        for scope in ("single", "layer"):
            fit = HypernetHPO(variant="local", family="linear", scope=scope, **common).fit(
                task, Budget(budget_n), seed=args.seed
            )
            for g, lam_mean in zip(fit.history["grad_evals"], fit.history["lam"]):
                tb.scalar(f"local_{scope}/log10_l2_mean", lam_mean / math.log(10), g)
            for g, v in zip(fit.history["grad_evals"], fit.history["val_loss"]):
                tb.scalar(f"local_{scope}/val_loss", v, g)
            results[f"local_{scope}"] = fit.result.to_dict()
            l2 = _train_l2(fit.result.best_hparams, task.init_params(torch.Generator()))
            lr = fit.result.extra["config"]["phi_lr"]
            again = train(task, "adam", {"lr": lr}, phi_steps, args.seed, l2=l2)
            results[f"local_{scope}"]["retrained"] = {
                "steps": phi_steps,
                "l2": l2,
                "val_loss": task.evaluate(again.params, "val")["loss"],
                "test_loss": task.evaluate(again.params, "test")["loss"],
                "test_accuracy": task.evaluate(again.params, "test").get("accuracy"),
            }
        run.write_results(results)
    finally:
        tb.close()
    br = results["best_response"]
    print(
        f"best-response ({args.task}, {points} λ): mean |predicted − trained| val loss "
        f"{br['mean_abs_gap']:.4f}; argmin predicted l2 {br['argmin_predicted_l2']:.2e}, "
        f"trained {br['argmin_trained_l2']:.2e}"
    )
    for key in ("local_single", "local_layer"):
        r = results[key]
        hp = ", ".join(f"{k}={v:.2e}" for k, v in r["best_hparams"].items())
        rt = r["retrained"]
        print(
            f"{key}: val {r['val_loss']:.4f} test {r['test_loss']:.4f} "
            f"acc {r['test_accuracy']:.3f}  ({hp}); retrained at λ̂: val {rt['val_loss']:.4f} "
            f"test {rt['test_loss']:.4f}"
        )
    print(f"run directory: {run.path}")
    print(f"tensorboard --logdir {run.path}")
    return json.loads(json.dumps(results, default=json_default))


if __name__ == "__main__":
    main()
