"""Memory of exact RMAD: information-buffer bits per step, and peak memory against T.

1. **Bits per parameter per step** held by the information buffer after T steps, for
   γ ∈ {0.5, 0.9, 0.99}, against the information the multiplications destroy, log2(1/γ)
   (γ as the rational n/2^16 actually used). Target: within 1 bit.
2. **Peak memory** of one hypergradient for T = 100, 1,000, 10,000 (quick: 100, 1,000):
   exact RMAD against autograd through the unrolled loop, each in a fresh subprocess. On the
   CPU: after a warm-up run, freed heap memory is handed back to the OS (glibc
   ``malloc_trim``) and the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``);
   the growth is the peak RSS (``VmHWM``) during the run over the RSS just before it. Its
   resolution is a page (4 KiB): the buffer's own growth shows. (The peak RSS of the whole
   process, ``ru_maxrss``, which earlier versions used, hid every growth below the warm-up's
   freed memory — tens of MB — and read 0 MB for RMAD; it is the fallback where the counter
   cannot be reset, and the config says which was used.) On CUDA:
   ``torch.cuda.max_memory_allocated`` over the memory allocated before the run.
   Reported per method: peak growth at each T and bytes per step (growth from the smallest
   to the largest T over the steps between); for RMAD also the buffer's own share — its
   information per step (bits per parameter per step × parameters / 8) and its allocated
   capacity at each T — and what grows besides the buffer. Target: RMAD's growth at most 5%
   of the unrolled one's (``rmad_growth_over_unrolled_growth <= 0.05``). When the unrolled
   run at the largest T would not fit (``--max-unrolled-T``), it is extrapolated linearly
   from the two largest measured T and marked so in the metrics.

Model: tiny on purpose so that T = 10,000 runs in a few minutes on 2 CPU cores:
digits-logreg (650 parameters), batch 10, float32, one thread.

Run: ``.venv/bin/python -m benchmarks.rmad_memory [--quick] [--device cuda]``
"""

from __future__ import annotations

import ctypes
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

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


def _proc_status_bytes(key: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status, in bytes (None if absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Give freed heap back to the OS, then reset the kernel's peak RSS to the current RSS.

    Returns False where either is unavailable (not Linux/glibc): the caller then measures
    with ``ru_maxrss``, whose peak includes everything since the process started.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        return False
    return _proc_status_bytes("VmHWM") is not None


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
        measure = "cuda max_memory_allocated"
    elif _reset_peak_rss():
        before = _proc_status_bytes("VmRSS") or 0
        measure = "VmHWM after malloc_trim and clear_refs (page resolution)"
    else:
        before = _rss_peak_bytes()
        measure = "ru_maxrss growth (hides growth below the warm-up's freed memory)"
    t0 = time.perf_counter()
    hg = hypergradient(task, meta, seed=0, method=method)
    wall = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    elif measure.startswith("VmHWM"):
        peak = (_proc_status_bytes("VmHWM") or 0) - before
    else:
        peak = _rss_peak_bytes() - before
    return {
        "peak_bytes": max(0, int(peak)),
        "wall_s": wall,
        "buffer_bytes": hg.stats.get("buffer_bytes", 0.0),
        "buffer_bits_per_param_step": hg.stats.get("buffer_bits_per_param_step", 0.0),
        "measure": measure,
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
    measures: set[str] = set()
    buffer_bits: dict[int, float] = {}
    for steps in ts:
        for method in ("rmad", "unrolled"):
            if method == "unrolled" and steps > args.max_unrolled_T:
                continue
            r = _measure(method, steps, str(device), args.batch_size)
            measures.add(r["measure"])
            peaks[method][steps] = r["peak_bytes"]
            metrics[f"{method}_peak_mb_T{steps}"] = r["peak_bytes"] / 2**20
            metrics[f"{method}_wall_s_T{steps}"] = r["wall_s"]
            if method == "rmad":  # the buffer's allocated capacity (grows by doubling)
                metrics[f"rmad_buffer_alloc_kb_T{steps}"] = r["buffer_bytes"] / 1024
                buffer_bits[steps] = r["buffer_bits_per_param_step"]
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
    # the buffer's information per step (γ = 0.9 in these runs), and the rest of RMAD's growth
    init = _task(device, args.batch_size).init_params(torch.Generator().manual_seed(0))
    params = sum(v.numel() for v in init.values())
    metrics["rmad_buffer_info_bytes_per_step"] = buffer_bits[t_hi] * params / 8
    metrics["rmad_nonbuffer_bytes_per_step"] = (
        metrics["rmad_bytes_per_step"] - metrics["rmad_buffer_info_bytes_per_step"]
    )
    metrics["rmad_growth_over_unrolled_growth"] = grow_r / grow_u if grow_u > 0 else math.nan
    targets["rmad_growth_over_unrolled_growth"] = target(
        metrics["rmad_growth_over_unrolled_growth"], "<= 0.05"
    )
    config = {
        "task": "digits-logreg",
        "params": params,
        "batch_size": args.batch_size,
        "bits_task_batch_size": 32,
        "bits_steps": bits_steps,
        "gammas": list(GAMMAS),
        "T": list(ts),
        "device": str(device),
        "measure": sorted(measures),
        "quick": args.quick,
    }
    out = args.out or (RESULTS_DIR / "rmad_memory.quick.json" if args.quick else None)
    return write_result("rmad_memory", config, metrics, targets, out=out)


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
