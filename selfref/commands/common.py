"""Helpers shared by CLI sub-commands: argument types, device/log options, overrides, and
the checks every command runs before it writes anything (a folder name, a resumed run's
stored configuration)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = [
    "UsageError",
    "positive_int",
    "positive_float",
    "nonneg_int",
    "add_device_arg",
    "add_logdir_arg",
    "parse_task_options",
    "check_folder_name",
    "read_run_config",
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


def check_folder_name(flag: str, name: str) -> str:
    """A name used as one folder under ``--logdir`` (e.g. ``--experiment``): a single plain
    path component, so the run directory stays inside the log root."""
    p = Path(name)
    if not name or name in (".", "..") or p.is_absolute() or len(p.parts) != 1 or "\\" in name:
        raise UsageError(
            f"{flag} {name!r} must be one folder name (no '/', '..' or absolute path), "
            "e.g. my-experiment"
        )
    return name


def read_run_config(path: str | Path, command: str, key: str) -> tuple[Path, dict[str, Any]]:
    """Open the run directory ``path`` given to ``--resume`` and read its config.json.

    Returns the directory and the config; checks that it is a run of ``command`` (its
    config.json holds ``key``) before anything is written.

    Raises:
        UsageError: the directory or its config.json is missing, not JSON, or the config of
            another command (the message names what it holds).
    """
    d = Path(path)
    if not d.is_dir():
        raise UsageError(
            f"--resume {str(d)!r} does not exist or is not a directory (give a {command} run "
            "directory)"
        )
    f = d / "config.json"
    if not f.is_file():
        raise UsageError(
            f"--resume {str(d)!r} has no config.json; is it a {command} run directory?"
        )
    try:
        config = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"--resume {str(d)!r}: config.json is not readable JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get(key), dict):
        held = ", ".join(sorted(map(str, config))) if isinstance(config, dict) else "no mapping"
        raise UsageError(
            f"--resume {str(d)!r} is not a {command} run directory (its config.json has no "
            f"{key!r} section; it holds: {held or 'nothing'})"
        )
    return d, config
