"""SRWM speed: sequence steps per second against an LSTM of the same parameter count.

One SRWM layer (Irie et al. 2022; width d, h heads, output projection, LayerNorm residual)
runs the fused recurrence and the step-by-step reference; beside it, in the same run, an
LSTM whose hidden size H is chosen so that its parameter count (4H(d + H) + 4H) is the
nearest to the SRWM layer's, run by the same kind of Python time loop
(``selfref.net.sequence.lstm_scan``) and by ``torch.nn.LSTM`` (fused library kernel). The
metric is sequence steps per second, b·n / seconds, for the forward pass and for forward +
backward, median over repeats. Ratios are what to read; absolute numbers depend on the
machine (and on its load: this 2-core machine was shared while it ran).

Run: ``python -m benchmarks.srwm_speed`` (``--quick``; ``--device cuda``).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch

from benchmarks.common import base_parser, target, write_result
from selfref.net.cores.srwm import SRWMLayerConfig, srwm_init, srwm_layer
from selfref.net.sequence import lstm_scan
from selfref.tasks.base import resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_interleaved(fns: dict[str, Any], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call; the functions take turns, so load bursts hit all alike."""
    for _ in range(2):  # warm-up (first calls pay one-time library initialization)
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def lstm_hidden_for(params: int, d: int) -> int:
    """H with 4H(d + H) + 4H closest to ``params``."""
    # 4H^2 + 4H(d + 1) - params = 0
    h = (-4 * (d + 1) + math.sqrt(16 * (d + 1) ** 2 + 16 * params)) / 8
    return max(1, round(h))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=128, help="SRWM width d")
    p.add_argument("--heads", type=int, default=8, help="SRWM heads h")
    p.add_argument("--batch", type=int, default=32, help="sequences b")
    p.add_argument("--length", type=int, default=64, help="sequence length n")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if args.quick:
        args.length, args.repeats = 16, 3
    device = resolve_device(args.device)
    torch.manual_seed(0)
    b, n, d = args.batch, args.length, args.dim
    cfg = SRWMLayerConfig(dim=d, heads=args.heads)
    ref_cfg = SRWMLayerConfig(dim=d, heads=args.heads, fused=False)
    sp = {
        k: v.requires_grad_(True)
        for k, v in srwm_init(cfg, torch.Generator().manual_seed(0), device=device).items()
    }
    n_srwm = sum(v.numel() for v in sp.values())
    H = lstm_hidden_for(n_srwm, d)
    g = torch.Generator().manual_seed(1)
    bound = 1 / math.sqrt(H)
    lp = {
        "w_ih": ((torch.rand(4 * H, d, generator=g) * 2 - 1) * bound).to(device),
        "w_hh": ((torch.rand(4 * H, H, generator=g) * 2 - 1) * bound).to(device),
        "b": ((torch.rand(4 * H, generator=g) * 2 - 1) * bound).to(device),
    }
    lp = {k: v.requires_grad_(True) for k, v in lp.items()}
    n_lstm = sum(v.numel() for v in lp.values())
    torch_lstm = torch.nn.LSTM(d, H, batch_first=True).to(device)
    x = torch.randn(b, n, d, generator=torch.Generator().manual_seed(2)).to(device)

    def srwm_fwd(c: SRWMLayerConfig) -> Any:
        def f() -> None:
            with torch.no_grad():
                srwm_layer(sp, x, c)

        return f

    def srwm_bwd(c: SRWMLayerConfig) -> Any:
        def f() -> None:
            out, _, _ = srwm_layer(sp, x, c)
            out.square().mean().backward()

        return f

    def lstm_run(backward: bool) -> Any:
        def f() -> None:
            with torch.set_grad_enabled(backward):
                gx = x @ lp["w_ih"].T + lp["b"]
                h0 = x.new_zeros(b, H)
                hs, _, _ = lstm_scan(gx, lp["w_hh"], h0, h0)
                if backward:
                    hs.square().mean().backward()

        return f

    def torch_lstm_run(backward: bool) -> Any:
        def f() -> None:
            with torch.set_grad_enabled(backward):
                hs, _ = torch_lstm(x)
                if backward:
                    hs.square().mean().backward()

        return f

    steps = b * n
    r = args.repeats
    fns = {
        "srwm_fused_fwd": srwm_fwd(cfg),
        "srwm_reference_fwd": srwm_fwd(ref_cfg),
        "lstm_scan_fwd": lstm_run(False),
        "torch_lstm_fwd": torch_lstm_run(False),
        "srwm_fused_fwdbwd": srwm_bwd(cfg),
        "srwm_reference_fwdbwd": srwm_bwd(ref_cfg),
        "lstm_scan_fwdbwd": lstm_run(True),
        "torch_lstm_fwdbwd": torch_lstm_run(True),
    }
    times = _time_interleaved(fns, r, device)
    m: dict[str, float] = {f"{k}_steps_per_s": steps / v for k, v in times.items()}
    m["srwm_params"] = n_srwm
    m["lstm_params"] = n_lstm
    m["fused_over_reference_fwdbwd"] = (
        m["srwm_fused_fwdbwd_steps_per_s"] / m["srwm_reference_fwdbwd_steps_per_s"]
    )
    m["srwm_over_lstm_scan_fwdbwd"] = (
        m["srwm_fused_fwdbwd_steps_per_s"] / m["lstm_scan_fwdbwd_steps_per_s"]
    )
    m["srwm_over_torch_lstm_fwdbwd"] = (
        m["srwm_fused_fwdbwd_steps_per_s"] / m["torch_lstm_fwdbwd_steps_per_s"]
    )
    config = {
        "dim": d,
        "heads": args.heads,
        "batch": b,
        "length": n,
        "lstm_hidden": H,
        "repeats": r,
        "device": str(device),
        "quick": args.quick,
    }
    targets = {
        "fused_over_reference_fwdbwd": target(m["fused_over_reference_fwdbwd"], ">= 1.5"),
        "params_matched": target(abs(n_lstm - n_srwm) / n_srwm, "<= 0.02"),
    }
    name = "srwm_speed"
    out = args.out or (f"benchmarks/results/{name}.quick.json" if args.quick else None)
    return write_result(name, config, m, targets, out=out)


if __name__ == "__main__":
    main()
