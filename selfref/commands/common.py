"""Helpers shared by CLI sub-commands: argument types, device/log options, overrides."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = [
    "UsageError",
    "positive_int",
    "positive_float",
    "nonneg_int",
    "add_device_arg",
    "add_logdir_arg",
    "parse_task_options",
]


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where to run: auto picks CUDA when present (default: auto)",
    )


def add_logdir_arg(p: argparse.ArgumentParser, default: str = "logs") -> None:
    p.add_argument(
        "--logdir", default=default, help=f"root of run directories (default: {default})"
    )


def _parse_value(v: str) -> Any:
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if "," in v:
        return [_parse_value(x) for x in v.split(",") if x]
    return v


def parse_task_options(items: list[str] | None) -> dict[str, Any]:
    """``["hidden=40", "activation=relu"]`` -> {"hidden": 40, "activation": "relu"}."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"task option {item!r} must look like key=value")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = _parse_value(v.strip())
    return out
