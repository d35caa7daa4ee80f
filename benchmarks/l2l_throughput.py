"""Meta-training throughput and memory of the L2L loop on 128 quadratics.

Throughput: meta-steps per second (one meta-step = one truncation of ``unroll`` steps on 128
functions, its backward pass and the Adam update's gradient) with ``torch.func.vmap`` over
the 128 task instances against a Python loop over the same instances running the same
code one at a time, side by side in one process. Target: vmap at least 10× faster.

Memory: for one meta-step at unroll lengths 20, 50 and 100 — the bytes of tensors the
autograd graph saves for backward (counted by ``torch.autograd.graph.saved_tensors_hooks``,
unique storages; device-independent), and on CUDA the peak allocated memory.

Usage: python -m benchmarks.l2l_throughput [--quick] [--device cuda]
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import RESULTS_DIR, base_parser, target, write_result
from selfref.meta import LearnedOptimizerProblem
from selfref.meta.estimators.tbptt import TruncatedBPTT
from selfref.net import SelfReferentialNet
from selfref.tasks import make

Est = tuple[LearnedOptimizerProblem, TruncatedBPTT]


def _meta_step(est: Est, phi: dict, horizon: int) -> None:
    problem, tbptt = est
    g = torch.Generator().manual_seed(0)
    e = tbptt.estimate(problem, phi, {"inner": None}, g, horizon, 0)
    if e.grads["core.out.w"].is_cuda:
        torch.cuda.synchronize()


def _rate(est: Est, phi: dict, horizon: int, repeats: int) -> float:
    _meta_step(est, phi, horizon)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        _meta_step(est, phi, horizon)
    return repeats / (time.perf_counter() - t0)


def _saved_bytes(est: Est, phi: dict, horizon: int) -> int:
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            seen[(st.data_ptr(), t.device.index or 0)] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            seen[(id(t), -1)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _meta_step(est, phi, horizon)
    return sum(seen.values())


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    m, unroll = 128, (5 if args.quick else 20)
    task = make("quadratic", device=device)
    net = SelfReferentialNet.from_task(task)
    phi = {
        k: v.to(device).requires_grad_(True)
        for k, v in net.init_meta_params(torch.Generator().manual_seed(0)).items()
    }
    vm = (LearnedOptimizerProblem(net, mode="vmap"), TruncatedBPTT(unroll=unroll, meta_batch=m))
    lp = (LearnedOptimizerProblem(net, mode="loop"), TruncatedBPTT(unroll=unroll, meta_batch=m))
    vmap_rate = _rate(vm, phi, 100, 2 if args.quick else 10)
    loop_rate = _rate(lp, phi, 100, 1)
    metrics = {
        "vmap_meta_steps_per_s": vmap_rate,
        "loop_meta_steps_per_s": loop_rate,
        "speedup_vmap_over_loop": vmap_rate / loop_rate,
        "vmap_inner_steps_per_s": vmap_rate * m * unroll,
    }
    lengths = (5, 10, 20) if args.quick else (20, 50, 100)
    for n in lengths:
        est = (vm[0], TruncatedBPTT(unroll=n, meta_batch=m))
        metrics[f"saved_tensor_bytes_unroll_{n}"] = _saved_bytes(est, phi, n)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            _meta_step(est, phi, n)
            metrics[f"cuda_peak_bytes_unroll_{n}"] = torch.cuda.max_memory_allocated()
    config = {
        "device": device,
        "quick": args.quick,
        "functions": m,
        "unroll": unroll,
        "horizon": 100,
        "memory_unrolls": list(lengths),
        "threads": args.threads,
    }
    targets = {"speedup_vmap_over_loop": target(metrics["speedup_vmap_over_loop"], ">= 10")}
    out = args.out or (RESULTS_DIR / "l2l_throughput.quick.json" if args.quick else None)
    write_result("l2l_throughput", config, metrics, targets, out=out)


if __name__ == "__main__":
    main()
