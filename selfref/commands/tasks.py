"""``selfref tasks``: list every registered task with its one-line description."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tasks",
        help="list the tasks with a one-line description each",
        description="List every task that `selfref train --task NAME` accepts.",
        epilog="example: selfref tasks",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from selfref import tasks

    table = tasks.available()
    width = max((len(n) for n in table), default=0)
    for name, description in table.items():
        print(f"{name:<{width}}  {description}")
    return 0
