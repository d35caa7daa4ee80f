"""How much of the learned optimizer's gap to tuned Adam one tuned step multiplier closes.

The held-out suite (:mod:`benchmarks.lopt_heldout`) gives tuned Adam a learning rate chosen
per task on val from a 13-point grid, and the learned optimizer none: it must find its step
size during the run. This diagnostic gives the learned optimizer the same one knob. Its whole
update (step and decoupled decay) is multiplied by a factor s, applied as a shift of every
member's learned base step ``log_lr`` by ln s. s is chosen per task on the mean final **val**
loss over the suite's seeds, from s = 2^k, k = −3 … 3. A choice on an edge widens the grid by
two points on that side, up to five times. Ties go to the smaller s, as tuned Adam's go to the
smaller learning rate.

Per task and horizon it reports, each as a ratio to tuned Adam's mean test loss (read from a
``lopt_heldout`` result, ``--heldout``; the baselines do not depend on the learned optimizer):

- ``learned``: s = 1, the optimizer as shipped. It is run here again, and its test loss must
  match the result's learned column, which checks that the runs are the suite's.
- ``tuned_scale``: s chosen on val, a method with one tuned knob, as tuned Adam has.
- ``oracle_scale``: the s with the lowest mean **test** loss. This is a bound on what choosing
  s could give, not a method.

Over tasks it reports the suite's summaries: the fraction at or below tuned Adam, the median
and the geometric mean.

No targets. If the tuned multiplier closes the gap, the learned update's shape is sound and its
size is what the optimizer fails to infer online. If not, the direction and schedule are what
lose.

Run: ``python -m benchmarks.lopt_scale`` (``--x10``: also at 10× the meta-training horizon;
``--workers N``: processes of one thread each; ``--quick``: three tasks at short horizons,
s ∈ {1/2, 1, 2}, Adam tuned here on a 4-point grid).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.common import RESULTS_DIR, base_parser, write_result
from benchmarks.lopt_heldout import (
    SUITE,
    ratio_summary,
    result_test_losses,
    run_learned,
    task_table,
    tuned,
)
from selfref import checkpoints
from selfref.meta.baselines import log_grid
from selfref.meta.family import TaskFamily
from selfref.net.optimizer import default_checkpoint
from selfref.tasks.distribution import build_task

T_META = 200  # the shipped preset's inner_steps: the horizons of the held-out suite
EXPONENTS = tuple(range(-3, 4))  # s = 2^k
WIDEN, MAX_WIDEN = 2, 5  # points added beyond an edge, and how many times
COLUMNS = ("learned", "tuned_scale", "oracle_scale")

_CK: dict[str, Any] = {}  # the checkpoint, loaded once per worker process


def scaled(ck: dict[str, Any], scale: float) -> dict[str, Any]:
    """A copy of ``ck`` whose every ``log_lr`` meta-parameter (in "best" and "last") is
    shifted by ln ``scale``: the learned update, step and decay, times ``scale``.

    Raises:
        ValueError: the checkpoint's core has no ``log_lr`` (not an ``lopt`` core or an
            ensemble of them).
    """
    out = dict(ck)
    for key in ("meta_params", "best_meta_params"):
        if ck.get(key) is None:
            continue
        phi = dict(ck[key])
        names = [k for k in phi if k.split(".")[-1] == "log_lr"]
        if not names:
            raise ValueError("the checkpoint's core has no log_lr: not an lopt optimizer")
        for k in names:
            phi[k] = phi[k] + math.log(scale)
        out[key] = phi
    return out


def _init(path: str, threads: int) -> None:
    torch.set_num_threads(threads)
    _CK["ck"] = checkpoints.load_meta(path)


def _run(job: tuple[str, int, int]) -> dict[str, Any]:
    """One (task, steps, exponent k) run of the learned optimizer at s = 2^k."""
    name, steps, k = job
    spec = {t.name: t for t in SUITE}[name].spec
    family = TaskFamily(build_task(spec))
    out = run_learned(scaled(_CK["ck"], 2.0**k), family, steps)
    finite = all(math.isfinite(v) for v in out["val_per_seed"] + out["test_per_seed"])
    return {
        "k": k,
        "val": out["val"]["mean"] if finite else math.inf,
        "test": out["test"]["mean"] if finite else math.inf,
        "train": out["train"]["mean"],
        "diverged": out["diverged"],
    }


def choose(runs: dict[int, dict[str, Any]], key: str, tol: float = 1e-7) -> int:
    """The exponent with the lowest ``key`` loss; within ``tol`` of it, the smallest."""
    best = min(r[key] for r in runs.values())
    return min(k for k, r in runs.items() if r[key] <= best + tol)


def _quick_adam(name: str, steps: int) -> float:
    """``--quick``: tuned Adam's mean test loss on a 4-point grid, tuned here."""
    family = TaskFamily(build_task({t.name: t for t in SUITE}[name].spec))
    return float(tuned(family, "adam", steps, log_grid(1e-3, 1.0, 4), None)["test"]["mean"])


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="an lopt checkpoint (default: shipped)")
    p.add_argument(
        "--heldout",
        default=str(RESULTS_DIR / "lopt_heldout.json"),
        help="lopt_heldout result of the same checkpoint: tuned Adam and the learned column",
    )
    p.add_argument("--x10", action="store_true", help="also at 10x the meta-training horizon")
    p.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    args = p.parse_args()
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    path = str(args.checkpoint or default_checkpoint())
    suite, t_meta, exps = list(SUITE), T_META, EXPONENTS
    mults: list[int | None] = [None] + ([10] if args.x10 else [])
    if args.quick:
        suite, t_meta, exps, mults = suite[:3], 25, (-1, 0, 1), [None]
    ref = {} if args.quick else result_test_losses(args.heldout)
    cells = [(ht.name, t_meta * (m or ht.horizon_mult), m or ht.horizon_mult) for ht in suite
             for m in mults]  # fmt: skip
    for name, steps, _ in cells:
        if not args.quick and (name, steps) not in ref:
            p.error(f"{args.heldout} has no row for {name} at {steps} steps")
    t0 = time.perf_counter()
    runs: dict[tuple[str, int], dict[int, dict[str, Any]]] = {(n, s): {} for n, s, _ in cells}
    todo = sorted(((n, s, k) for n, s, _ in cells for k in exps), key=lambda j: -j[1])
    with ProcessPoolExecutor(args.workers, initializer=_init, initargs=(path, 1)) as pool:
        for widening in range(MAX_WIDEN + 1):
            done = tqdm(pool.map(_run, todo), total=len(todo), desc=f"lopt_scale {widening}")
            for (n, s, _), r in zip(todo, done):
                runs[(n, s)][r["k"]] = r
            todo = []
            if widening == MAX_WIDEN:
                break
            for cell, by_k in runs.items():  # widen off an edge the val choice lies on
                k, lo, hi = choose(by_k, "val"), min(by_k), max(by_k)
                if k == lo:
                    todo += [(*cell, lo - i) for i in range(1, WIDEN + 1)]
                elif k == hi:
                    todo += [(*cell, hi + i) for i in range(1, WIDEN + 1)]
            if not todo:
                break
    rows = []
    for name, steps, mult in cells:
        by_k = runs[(name, steps)]
        k_val, k_test = choose(by_k, "val"), choose(by_k, "test")
        adam = ref[(name, steps)]["adam"] if ref else _quick_adam(name, steps)
        row: dict[str, Any] = {
            "task": name,
            "steps": steps,
            "horizon_mult": mult,
            "adam_test": adam,
            "committed_learned_test": ref.get((name, steps), {}).get("learned"),
            "learned": {"scale": 1.0, **by_k[0]},
            "tuned_scale": {"scale": 2.0**k_val, **by_k[k_val]},
            "oracle_scale": {"scale": 2.0**k_test, **by_k[k_test]},
            "scale_on_edge": k_val in (min(by_k), max(by_k)),
            "grid": {str(2.0**k): {"val": r["val"], "test": r["test"]}
                     for k, r in sorted(by_k.items())},
        }  # fmt: skip
        for col in COLUMNS:
            row[col]["ratio"] = row[col]["test"] / adam
        rows.append(row)
        print(
            f"{name} x{mult}: adam {adam:.4f} "
            + " ".join(f"{c} {row[c]['ratio']:.3f}" for c in COLUMNS)
            + f" (s val {row['tuned_scale']['scale']:g}, test {row['oracle_scale']['scale']:g})",
            flush=True,
        )
    metrics: dict[str, Any] = {"wall_s": time.perf_counter() - t0}
    for group in ("main", "x10"):
        group_rows = [r for r in rows if (group == "x10") == (r["horizon_mult"] == 10)]
        if not group_rows:
            continue
        for col in COLUMNS:
            ratios = [r[col]["ratio"] for r in group_rows]
            if all(math.isfinite(x) and x > 0 for x in ratios):
                metrics.update({f"{group}/{col}/{k}": v for k, v in ratio_summary(ratios).items()})
        metrics[f"{group}/scale_on_edge"] = sum(r["scale_on_edge"] for r in group_rows)
        metrics[f"{group}/learned_matches_committed"] = all(
            r["committed_learned_test"] is None
            or math.isclose(r["learned"]["test"], r["committed_learned_test"], rel_tol=1e-4)
            for r in group_rows
        )
    config = {
        "checkpoint": path,
        "t_meta": t_meta,
        "scale_grid": [2.0 ** min(exps), 2.0 ** max(exps), len(exps)],
        "widen": [WIDEN, MAX_WIDEN],
        "quick": args.quick,
        "heldout": None if args.quick else args.heldout,
        "tasks": task_table(suite),
        "per_task": rows,
    }
    out = args.out or (None if not args.quick else "benchmarks/results/lopt_scale.quick.json")
    write_result("lopt_scale", config, metrics, {}, out)


if __name__ == "__main__":
    main()
