"""``selfref methods``: every registered meta-optimizer, installed or missing (and why)."""

from __future__ import annotations

import argparse
import inspect
from typing import Any

__all__ = ["add_parser", "run", "method_table"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "methods",
        help="list the meta-optimizers (installed or missing, and why)",
        description="List every registered method: installed ones with a one-line description, "
        "missing ones with what to install.",
    )
    p.set_defaults(func=run)
    return p


def method_table() -> list[tuple[str, str, str]]:
    """``(name, "installed" | "missing", description or why)`` in registry order."""
    from selfref import methods

    gone = methods.missing()
    rows = []
    for name in methods.REGISTRY:
        if name in gone:
            rows.append((name, "missing", gone[name]))
            continue
        doc = inspect.getdoc(methods.method_class(name)) or ""
        rows.append((name, "installed", doc.splitlines()[0] if doc else ""))
    return rows


def run(args: argparse.Namespace) -> int:
    rows = method_table()
    width = max(len(n) for n, _, _ in rows)
    for name, state, text in rows:
        print(f"{name:<{width}}  {state:<9}  {text}")
    print()
    print("`selfref compare` runs every installed method by default (`--methods a,b` to choose).")
    return 0
