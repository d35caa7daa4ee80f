"""A figure of a ``lopt_heldout`` result: where the learned optimizer wins, and its step size.

Three panels, drawn from the result's JSON alone (nothing is rerun):

- left: per task, the learned optimizer's mean final test loss over tuned Adam's (log
  scale) at the suite's horizon and at 10× the meta-training horizon, with tuned AdamW's
  and SGD-with-momentum's ratios as markers; the lines at 1 (tuned Adam) and 0.9 (the
  suite's median target);
- right: per task, the learned optimizer's mean log step size over its run (the time
  average of ``log_step_curve``: log α + a_T + s_i, the scale of its step on Adam's
  normalized direction) against tuned Adam's learning rate, both in log10; a point below
  the diagonal takes smaller steps than the rate tuning chose. Colour: the task's ratio;
- third (results with the train column): per task, the learned optimizer's final train loss
  over tuned Adam's against its test-loss ratio, both log10, at the suite horizon (filled)
  and at 10× (hollow). The quadrants read: right and up, it fit less and lost (underfit);
  right and down, it fit less and won (regularized); left and up, it fit more and lost
  (overfit); left and down, it fit more and won.

Run: ``python -m benchmarks.heldout_plot`` (``--result``: another lopt_heldout JSON;
``--out``: the PNG, by default beside the result with the suffix ``.png``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR

__all__ = ["fit_points", "plot_heldout", "step_points"]


def step_points(rows: list[dict[str, Any]]) -> list[tuple[str, float, float, float]]:
    """(task, log10 tuned-Adam lr, log10 mean learned step, ratio) per row with a step curve."""
    out = []
    for r in rows:
        curve = r["learned"].get("log_step_curve") or []
        if not curve:
            continue
        mean_log = sum(v for _, v in curve) / len(curve)  # natural log
        out.append(
            (r["task"], math.log10(r["adam"]["setting"]["lr"]), mean_log / math.log(10),
             float(r["ratio_vs_adam"]))
        )  # fmt: skip
    return out


def fit_points(rows: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """(task, log10 learned/Adam train loss, log10 learned/Adam test loss) per row that has
    the train column (and positive losses)."""
    out = []
    for r in rows:
        lt, at = (r["learned"].get("train") or {}), (r["adam"].get("train") or {})
        if not lt or not at or min(lt["mean"], at["mean"], r["ratio_vs_adam"]) <= 0:
            continue
        out.append((r["task"], math.log10(lt["mean"] / at["mean"]), math.log10(r["ratio_vs_adam"])))
    return out


def plot_heldout(result: dict[str, Any], path: str | Path) -> Path:
    """Draw ``result`` (a lopt_heldout JSON, loaded) to the PNG ``path``; return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    config = result["config"]
    main_rows = config["per_task"]
    x10 = {r["task"]: r for r in config.get("per_task_x10", [])}
    names = [r["task"] for r in main_rows]
    fits = fit_points(main_rows)
    if fits:
        fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(18, 5), dpi=110, width_ratios=(1.6, 1, 1))
    else:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), dpi=110, width_ratios=(1.6, 1))

    width = 0.38
    xs = list(range(len(names)))
    ax.bar([x - width / 2 for x in xs], [r["ratio_vs_adam"] for r in main_rows], width,
           label="learned, suite horizon", color="tab:blue")  # fmt: skip
    if x10:
        ax.bar([x + width / 2 for x, n in zip(xs, names) if n in x10],
               [x10[n]["ratio_vs_adam"] for n in names if n in x10], width,
               label="learned, 10× horizon", color="tab:cyan")  # fmt: skip
    for key, marker, label in (("adamw", "^", "tuned AdamW"), ("sgd_momentum", "s", "tuned SGD")):
        ys = [r[key]["test"]["mean"] / r["adam"]["test"]["mean"] for r in main_rows]
        ax.scatter([x - width / 2 for x in xs], ys, marker=marker, color="k", s=18,
                   zorder=3, label=f"{label}, suite horizon")  # fmt: skip
    ax.axhline(1.0, color="tab:red", lw=1, label="tuned Adam")
    ax.axhline(0.9, color="tab:red", lw=1, ls="--", label="median target 0.9")
    ax.set_yscale("log")
    ax.set_xticks(xs, names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("final test loss / tuned Adam's")
    name = Path(str(config.get("checkpoint", "learned optimizer"))).name
    ax.set_title(f"held-out suite: {name} against optimizers tuned per task", fontsize=9)
    ax.legend(fontsize=7, ncol=2)

    points = step_points(main_rows)
    if points:
        lr = [p[1] for p in points]
        step = [p[2] for p in points]
        ratio = [p[3] for p in points]
        sc = bx.scatter(lr, step, c=ratio, cmap="coolwarm", norm=LogNorm(0.25, 4.0), s=40,
                        zorder=3)  # fmt: skip
        for name, a, b, _ in points:
            bx.annotate(name, (a, b), fontsize=6, xytext=(3, 3), textcoords="offset points")
        lo, hi = min(lr + step) - 0.3, max(lr + step) + 0.3
        bx.plot([lo, hi], [lo, hi], color="gray", lw=1, ls=":")
        fig.colorbar(sc, ax=bx, label="learned / tuned Adam (suite horizon)")
    bx.set_xlabel("log10 tuned Adam learning rate")
    bx.set_ylabel("log10 learned step size (mean over the run)")
    bx.set_title("step size: learned vs the rate tuning chose", fontsize=9)
    if fits:
        long_fits = fit_points(list(x10.values()))
        cx.scatter([p[1] for p in fits], [p[2] for p in fits], color="tab:blue", s=36,
                   zorder=3, label="suite horizon")  # fmt: skip
        if long_fits:
            cx.scatter([p[1] for p in long_fits], [p[2] for p in long_fits], s=36, zorder=3,
                       facecolors="none", edgecolors="tab:cyan", label="10× horizon")  # fmt: skip
        for name, a, b in fits:
            cx.annotate(name, (a, b), fontsize=6, xytext=(3, 3), textcoords="offset points")
        cx.axhline(0.0, color="tab:red", lw=1)
        cx.axvline(0.0, color="gray", lw=1, ls=":")
        for (hx, hy, text) in ((0.98, 0.98, "fit less, lost\n(underfit)"),
                               (0.98, 0.02, "fit less, won\n(regularized)"),
                               (0.02, 0.98, "fit more, lost\n(overfit)"),
                               (0.02, 0.02, "fit more, won")):  # fmt: skip
            ha, va = ("right" if hx > 0.5 else "left"), ("top" if hy > 0.5 else "bottom")
            cx.text(hx, hy, text, transform=cx.transAxes, fontsize=7, color="dimgray",
                    ha=ha, va=va)  # fmt: skip
        cx.set_xlabel("log10 final train loss, learned / tuned Adam")
        cx.set_ylabel("log10 final test loss, learned / tuned Adam")
        cx.set_title("fit against generalization", fontsize=9)
        cx.legend(fontsize=7, loc="center left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--result", default=str(RESULTS_DIR / "lopt_heldout.json"))
    p.add_argument("--out", default=None, help="the PNG (default: the result's path, .png)")
    args = p.parse_args()
    src = Path(args.result)
    if not src.is_file():
        raise SystemExit(f"no lopt_heldout result at {src}: run python -m benchmarks.lopt_heldout")
    result = json.loads(src.read_text())
    if result.get("benchmark") != "lopt_heldout":
        raise SystemExit(f"{src} is a {result.get('benchmark')!r} result, not lopt_heldout")
    print(plot_heldout(result, args.out or src.with_suffix(".png")))


if __name__ == "__main__":
    main()
