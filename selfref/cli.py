"""The ``selfref`` command: a thin dispatcher over one module per sub-command.

Each sub-command lives in ``selfref/commands/<name>.py`` and exposes
``add_parser(subparsers)``, which registers its parser and sets ``func`` to a function
``(args) -> int``. Modules are imported when the command table is built; a command whose
module is absent (an optional part) is simply not listed.

Errors: a ``ValueError``/``UsageError`` raised by a command becomes one line on stderr,
``selfref: error: ...``, and exit code 2, with no traceback; so does an argument argparse
rejects (an unknown flag, a wrong type, a value outside the choices): one line
``selfref <command>: error: ...``, without the usage block (``--help`` prints it). Commands
validate every option, file and resumed configuration before they create a run directory.
Everything else propagates.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["main", "build_parser", "COMMANDS", "OneLineParser"]

# Order of `selfref --help`. Each entry is a module in selfref.commands.
COMMANDS: tuple[str, ...] = (
    "compare",
    "train",
    "tasks",
    "methods",
    "meta_train",
    "complexity",
)


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="selfref",
        description="Self-referential networks and meta-optimization: train, meta-train, compare.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"selfref.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"selfref.commands.{name}":
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from selfref.commands.common import UsageError

    parser = build_parser()
    args = parser.parse_args(argv)
    # The command line as typed, for a run's argv.txt (also when called as main([...])).
    args.argv = ["selfref", *(sys.argv[1:] if argv is None else argv)]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        print(f"selfref: error: {' '.join(lines) or type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selfref: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
