"""Speed of one exact RMAD hypergradient against the plain forward training run it reverses.

Side by side in one process, alternating, median of ``--reps`` timings after a warm-up:

- ``forward``: the plain float training run of T steps (:func:`selfref.hypergrad.sgd_momentum`,
  same schedules and minibatches);
- ``rmad``: one exact hypergradient (forward in fixed point + reverse with HVPs);
- ``unrolled``: autograd through the stored unrolled loop (for reference).

Target (issue 5): rmad / forward ≤ 4. Model: the paper's schedule experiment, digits MLP
64→50→50→10, batch 100, T = 100 (quick: T = 20, 2 repetitions). One intra-op thread.

Run: ``.venv/bin/python -m benchmarks.rmad_speed [--quick] [--device cuda]``
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import RESULTS_DIR, base_parser, target, write_result
from selfref.hypergrad import hypergradient, init_meta, sgd_momentum
from selfref.tasks import make
from selfref.tasks.base import resolve_device


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    return run


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="inner steps T (default 100; quick 20)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5; quick 2)")
    p.add_argument("--hidden", type=int, nargs="+", default=[50, 50], help="MLP hidden sizes")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    steps = args.steps or (20 if args.quick else 100)
    reps = args.reps or (2 if args.quick else 5)
    task = make("digits-mlp", hidden=tuple(args.hidden), batch_size=args.batch_size, device=device)
    groups = len(args.hidden) + 1
    meta = init_meta(steps, groups, alpha=1.0, gamma=0.9, device=device)
    timeit = _timer(device)
    runs = {
        "forward": lambda: sgd_momentum(task, meta, seed=0),
        "rmad": lambda: hypergradient(task, meta, seed=0, method="rmad"),
        "unrolled": lambda: hypergradient(task, meta, seed=0, method="unrolled"),
    }
    for fn in runs.values():  # warm-up (first double-backward, allocator, caches)
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    ratios: list[float] = []
    for _ in range(reps):
        for k, fn in runs.items():
            times[k].append(timeit(fn))
        ratios.append(times["rmad"][-1] / times["forward"][-1])
    med = {k: statistics.median(v) for k, v in times.items()}
    metrics = {
        "forward_s": med["forward"],
        "rmad_s": med["rmad"],
        "unrolled_s": med["unrolled"],
        "rmad_over_forward": statistics.median(ratios),
        "unrolled_over_forward": med["unrolled"] / med["forward"],
        "rmad_over_unrolled": med["rmad"] / med["unrolled"],
        "forward_ms_per_step": 1e3 * med["forward"] / steps,
    }
    config = {
        "task": "digits-mlp",
        "hidden": args.hidden,
        "batch_size": args.batch_size,
        "steps": steps,
        "reps": reps,
        "threads": args.threads,
        "device": str(device),
        "quick": args.quick,
    }
    targets = {"rmad_over_forward": target(metrics["rmad_over_forward"], "<= 4")}
    out = args.out or (RESULTS_DIR / "rmad_speed.quick.json" if args.quick else None)
    return write_result("rmad_speed", config, metrics, targets, out=out)


if __name__ == "__main__":
    main()
