"""Shared plumbing for benchmarks: machine facts, targets, and the JSON result file.

Every ``benchmarks/<name>.py`` ends with :func:`write_result`, which writes
``benchmarks/results/<name>.json`` in the format of ../shared/DESIGN.md::

    {"benchmark", "date", "machine": {cpu, cores, gpu, torch}, "config", "metrics", "targets"}

and prints the same JSON to stdout. A target is ``{"value": x, "target": "<= 0.5", "met": b}``
and is computed from the measured value, never written by hand.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

from selfref.runs import json_safe

__all__ = ["machine_info", "target", "write_result", "base_parser", "RESULTS_DIR"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": _cpu_name(),
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
    }


def target(value: float, spec: str) -> dict[str, Any]:
    """``target(0.3, ">= 0.25")`` -> {"value": 0.3, "target": ">= 0.25", "met": True}."""
    op, num = spec.split()
    bound = float(num)
    ok = {"<=": value <= bound, ">=": value >= bound, "<": value < bound, ">": value > bound}[op]
    if isinstance(value, float) and not math.isfinite(value):
        ok = False
    return {"value": value, "target": spec, "met": bool(ok)}


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a setting that runs in under a minute")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument(
        "--out", default=None, help="result file (default benchmarks/results/<name>.json)"
    )
    return p


def write_result(
    name: str,
    config: dict[str, Any],
    metrics: dict[str, float],
    targets: dict[str, dict[str, Any]],
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Write and print the benchmark's JSON; returns the dict.

    A ``--quick`` run should pass ``out`` (or the caller's ``--out``) so it does not overwrite
    the default-setting numbers that the README quotes; by convention quick results go to
    ``benchmarks/results/<name>.quick.json``.
    """
    record = {
        "benchmark": name,
        "date": _dt.date.today().isoformat(),
        "machine": machine_info(),
        "config": config,
        "metrics": metrics,
        "targets": targets,
    }
    record = json_safe(record)
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return record
