"""Shared plumbing for benchmarks: machine facts, targets, and the JSON result file.

Every ``benchmarks/<name>.py`` ends with :func:`write_result`, which writes
``benchmarks/results/<name>.json`` in the format of ../shared/DESIGN.md::

    {"benchmark", "date", "machine": {cpu, cores, gpu, torch}, "config", "metrics", "targets"}

and prints the same JSON to stdout. A target is ``{"value": x, "target": "<= 0.5", "met": b}``
and is computed from the measured value, never written by hand.

A baseline tuned on a grid is only as good as its grid: :func:`grid_edge` says whether the
chosen value sits on the grid's first or last point, and :func:`check_not_on_edge` raises
when it does (the grid must then be widened, never the result reported as tuned).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from selfref.runs import json_safe

__all__ = [
    "machine_info",
    "target",
    "write_result",
    "base_parser",
    "grid_edge",
    "check_not_on_edge",
    "RESULTS_DIR",
]

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


def grid_edge(grid: Sequence[float], best: float, rel_tol: float = 1e-9) -> str | None:
    """Which end of ``grid`` the tuned value ``best`` lies on: ``"low"``, ``"high"`` or None.

    The ends are the grid's smallest and largest values (its order does not matter). A value
    within ``rel_tol`` (relative) of an end counts as on it.

    Raises:
        ValueError: an empty grid, fewer than three points (every point is an edge), or a
            ``best`` that is not one of the grid's values.
    """
    values = sorted(float(g) for g in grid)
    if len(values) < 3:
        raise ValueError(f"a grid needs at least 3 points to have an interior, got {values}")
    if not any(math.isclose(best, g, rel_tol=rel_tol, abs_tol=0.0) for g in values):
        raise ValueError(f"tuned value {best!r} is not a point of the grid {values}")
    if math.isclose(best, values[0], rel_tol=rel_tol, abs_tol=0.0):
        return "low"
    if math.isclose(best, values[-1], rel_tol=rel_tol, abs_tol=0.0):
        return "high"
    return None


def check_not_on_edge(grid: Sequence[float], best: float, name: str = "value") -> None:
    """Raise ValueError when ``best`` lies on an end of ``grid`` (see :func:`grid_edge`).

    A baseline whose best setting is the grid's first or last point was not tuned: the grid
    must be widened until the best is an interior point.
    """
    edge = grid_edge(grid, best)
    if edge is not None:
        lo, hi = min(grid), max(grid)
        raise ValueError(
            f"{name} = {best:g} lies on the {edge} edge of its grid [{lo:g}, {hi:g}]; widen "
            "the grid so that the best value is an interior point"
        )


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
