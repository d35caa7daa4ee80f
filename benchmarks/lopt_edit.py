"""A config edit of a meta-trained learned optimizer, written as a checkpoint of its own.

Selection rounds 18 and 20 (README) scored *config edits* of the shipped ensemble: the same
meta-trained φ with a core option changed (``decay_max = 1``, ``decay_gate = "gap"``). This
tool makes such a candidate reproducibly: it reads a checkpoint, changes the options of its
core (an ensemble's: every member's) through :func:`selfref.net.optimizer.edited_checkpoint`,
which refuses an option that would change φ, and writes the result with the edit recorded
under ``ck["edits"]`` (source and options, after any edits the source already held).
Everything else — φ, the meta-training config and provenance — is copied as it is.
``LearnedOptimizer(params, core_options=...)`` applies the same edit without a file, and an
``[ensemble]`` spec's ``core_options`` the same edit to the optimizer it composes (round 22's
shipped edit).

Run: ``python -m benchmarks.lopt_edit SRC.pt OUT.pt --set decay_gate=gap`` (``--set`` may be
repeated; values read as numbers or booleans where they parse as one).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from selfref import checkpoints
from selfref.commands.common import UsageError, parse_task_options
from selfref.net.optimizer import edited_checkpoint


def edit(src: str | Path, out: str | Path, options: dict[str, object]) -> dict[str, object]:
    """Write ``src`` with its core options updated by ``options`` to ``out``; returns the
    written checkpoint. ``out`` may not be ``src``."""
    if Path(out).resolve() == Path(src).resolve():
        raise ValueError("write the edit to a new file, not over its source")
    if not options:
        raise ValueError("no option to change: give --set KEY=VALUE")
    ck = checkpoints.load_meta(src)
    if "net" not in ck:
        raise ValueError(f"{src} holds no learned optimizer")
    ck = edited_checkpoint(ck, options, str(src))
    checkpoints.save(ck, out)
    return ck


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a learned-optimizer checkpoint")
    p.add_argument("out", help="where to write the edited checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a core option")
    args = p.parse_args()
    try:
        options = parse_task_options(args.set)
        edit(args.src, args.out, options)
    except (UsageError, ValueError) as exc:  # CheckpointError is a ValueError
        raise SystemExit(f"lopt_edit: {exc}") from None
    print(f"wrote {args.out}: {args.src} with {options}")


if __name__ == "__main__":
    main()
