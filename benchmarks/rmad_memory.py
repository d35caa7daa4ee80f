"""Memory of exact RMAD: information-buffer bits per step, and peak memory against T.

1. **Bits per parameter per step** held by the information buffer after T steps, for
   γ ∈ {0.5, 0.9, 0.99}, against the information the multiplications destroy, log2(1/γ)
   (γ as the rational n/2^16 actually used). Target: within 1 bit.
2. **Peak memory** of one hypergradient for T = 100, 1,000, 10,000 (quick: 100, 1,000):
   exact RMAD against autograd through the unrolled loop. Each measurement runs in a fresh
   subprocess: on the CPU it is the growth of the peak resident set size (``ru_maxrss``) over
   its value after a warm-up run, on CUDA ``torch.cuda.max_memory_allocated`` over the memory
   allocated before the run. RMAD should stay nearly flat in T; the unrolled hypergradient
   grows linearly. Target: RMAD's growth from the smallest to the largest T is at most 5% of
   the unrolled one's. When the unrolled run at the largest T would not fit
   (``--max-unrolled-T``), it is extrapolated linearly from the two largest measured T and
   marked so in the metrics.

Model: tiny on purpose so that T = 10,000 runs in a few minutes on 2 CPU cores:
digits-logreg (650 parameters), batch 10, float32, one thread.

Run: ``.venv/bin/python -m benchmarks.rmad_memory [--quick] [--device cuda]``
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time

import torch

from benchmarks.common import RESULTS_DIR, base_parser, target, write_result
from selfref.hypergrad import hypergradient, init_meta, rational_gamma
from selfref.tasks import make
from selfref.tasks.base import resolve_device

GAMMAS = (0.5, 0.9, 0.99)


def _task(device: torch.device, batch_size: int):
    return make("digits-logreg", batch_size=batch_size, init_scale=0.5, device=device)


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(method: str, steps: int, device_name: str, batch_size: int) -> dict:
    """Peak memory growth of one hypergradient (runs in its own process)."""
    torch.set_num_threads(1)
    device = resolve_device(device_name)
    task = _task(device, batch_size)
    hypergradient(task, init_meta(5, 1, alpha=0.2, gamma=0.9, device=device), method=method)
    meta = init_meta(steps, 1, alpha=0.2, gamma=0.9, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _rss_peak_bytes()
    t0 = time.perf_counter()
    hg = hypergradient(task, meta, seed=0, method=method)
    wall = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = _rss_peak_bytes() - before
    return {
        "peak_bytes": max(0, int(peak)),
        "wall_s": wall,
        "buffer_bytes": hg.stats.get("buffer_bytes", 0.0),
    }


def _measure(method: str, steps: int, device: str, batch_size: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.rmad_memory",
        "--child",
        method,
        str(steps),
        "--device",
        device,
        "--batch-size",
        str(batch_size),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict | None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--child", nargs=2, metavar=("METHOD", "T"), help=argparse_suppress())
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--bits-steps", type=int, default=None, help="T for the bits (default 1000)")
    p.add_argument(
        "--max-unrolled-T",
        type=int,
        default=10_000,
        help="largest T to run the unrolled hypergradient at (larger: extrapolated)",
    )
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.device, args.batch_size)))
        return None
    torch.set_num_threads(1)
    device = resolve_device(args.device)
    metrics: dict[str, float] = {}
    targets: dict[str, dict] = {}

    # 1. bits per parameter per step
    bits_steps = args.bits_steps or (200 if args.quick else 1000)
    task = _task(device, 32)
    for gamma in GAMMAS:
        hg = hypergradient(task, init_meta(bits_steps, 1, alpha=0.2, gamma=gamma, device=device))
        ideal = -math.log2(float(rational_gamma(torch.tensor(gamma))) / 2**16)
        bits = hg.stats["buffer_bits_per_param_step"]
        metrics[f"bits_per_param_step_gamma_{gamma}"] = bits
        metrics[f"log2_inv_gamma_{gamma}"] = ideal
        metrics[f"excess_bits_gamma_{gamma}"] = bits - ideal
        targets[f"excess_bits_gamma_{gamma}"] = target(abs(bits - ideal), "<= 1")

    # 2. peak memory against T
    ts = (100, 1000) if args.quick else (100, 1000, 10_000)
    peaks: dict[str, dict[int, float]] = {"rmad": {}, "unrolled": {}}
    for steps in ts:
        for method in ("rmad", "unrolled"):
            if method == "unrolled" and steps > args.max_unrolled_T:
                continue
            r = _measure(method, steps, str(device), args.batch_size)
            peaks[method][steps] = r["peak_bytes"]
            metrics[f"{method}_peak_mb_T{steps}"] = r["peak_bytes"] / 2**20
            metrics[f"{method}_wall_s_T{steps}"] = r["wall_s"]
            if method == "rmad":
                metrics[f"rmad_buffer_kb_T{steps}"] = r["buffer_bytes"] / 1024
    extrapolated = 0.0
    t_lo, t_hi = ts[0], ts[-1]
    if t_hi not in peaks["unrolled"]:
        measured = sorted(peaks["unrolled"])
        a, b = measured[-2], measured[-1]
        slope = (peaks["unrolled"][b] - peaks["unrolled"][a]) / (b - a)
        peaks["unrolled"][t_hi] = peaks["unrolled"][b] + slope * (t_hi - b)
        metrics[f"unrolled_peak_mb_T{t_hi}"] = peaks["unrolled"][t_hi] / 2**20
        extrapolated = 1.0
    metrics["unrolled_largest_T_extrapolated"] = extrapolated
    grow_u = peaks["unrolled"][t_hi] - peaks["unrolled"][t_lo]
    grow_r = peaks["rmad"][t_hi] - peaks["rmad"][t_lo]
    metrics["unrolled_bytes_per_step"] = grow_u / (t_hi - t_lo)
    metrics["rmad_bytes_per_step"] = grow_r / (t_hi - t_lo)
    metrics["rmad_growth_over_unrolled_growth"] = grow_r / grow_u if grow_u > 0 else math.nan
    targets["rmad_growth_over_unrolled_growth"] = target(
        metrics["rmad_growth_over_unrolled_growth"], "<= 0.05"
    )
    config = {
        "task": "digits-logreg",
        "params": 650,
        "batch_size": args.batch_size,
        "bits_task_batch_size": 32,
        "bits_steps": bits_steps,
        "gammas": list(GAMMAS),
        "T": list(ts),
        "device": str(device),
        "measure": "cuda max_memory_allocated" if device.type == "cuda" else "ru_maxrss growth",
        "quick": args.quick,
    }
    out = args.out or (RESULTS_DIR / "rmad_memory.quick.json" if args.quick else None)
    return write_result("rmad_memory", config, metrics, targets, out=out)


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
