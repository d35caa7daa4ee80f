"""Run directories: config.json, argv.txt, results.json, trials.jsonl, checkpoints/, resume.

Layout (../shared/DESIGN.md, "Runs")::

    logs/<experiment>/<YYYYmmdd-HHMMSS>-<method>-s<seed>/
        events.out.tfevents.*   TensorBoard
        config.json             the full configuration
        argv.txt                the command line that made the run
        results.json            Result.to_dict() (or a list/dict of them)
        trials.jsonl            append-only, one line per finished trial, fsync'd
        checkpoints/            torch.save files, written atomically

A run directory is never overwritten: a name collision gets a ``-1``, ``-2`` suffix.
Every write of a whole file goes to a temporary file first and is renamed into place, so a
crash never leaves a half-written config, result or checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfref import checkpoints

__all__ = [
    "RunDir",
    "atomic_write_text",
    "atomic_torch_save",
    "json_default",
    "json_safe",
    "check_logdir",
]


def json_default(o: Any) -> Any:
    """JSON encoder fallback for tensors, dtypes, devices, paths and dataclasses."""
    if isinstance(o, torch.Tensor):
        return o.detach().cpu().tolist()
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    return str(o)


def json_safe(x: Any) -> Any:
    """Non-finite floats -> None, recursively through dicts, lists and tuples (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + fsync + rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` via a temp file + rename (:func:`selfref.checkpoints.save`)."""
    checkpoints.save(obj, path)


def check_logdir(logdir: str | Path) -> Path:
    """Validate a log root: it may not exist yet, but must not be a file."""
    p = Path(logdir)
    if p.exists() and not p.is_dir():
        raise ValueError(
            f"--logdir {str(p)!r} is a file; give a directory (it is created if missing)"
        )
    return p


@dataclass(frozen=True)
class RunDir:
    """A run directory and its files. Create with :meth:`create`, reopen with :meth:`open`."""

    path: Path

    @classmethod
    def create(
        cls,
        root: str | Path,
        experiment: str,
        method: str,
        seed: int | None = None,
        argv: Sequence[str] | None = None,
    ) -> RunDir:
        """Make ``root/experiment/<YYYYmmdd-HHMMSS>-<method>[-s<seed>]`` (never reusing one)."""
        base = check_logdir(root) / experiment
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{stamp}-{method}" + (f"-s{seed}" if seed is not None else "")
        base.mkdir(parents=True, exist_ok=True)
        path = base / name
        k = 0
        while True:
            try:
                path.mkdir(parents=False, exist_ok=False)
                break
            except FileExistsError:
                k += 1
                path = base / f"{name}-{k}"
        run = cls(path)
        atomic_write_text(
            path / "argv.txt", " ".join(sys.argv if argv is None else list(argv)) + "\n"
        )
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """Reopen an existing run directory (for ``--resume``)."""
        p = Path(path)
        if not p.is_dir():
            raise ValueError(f"run directory {str(p)!r} does not exist")
        return cls(p)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def write_config(self, config: Mapping[str, Any]) -> None:
        atomic_write_text(
            self.path / "config.json", json.dumps(config, indent=2, default=json_default) + "\n"
        )

    def read_config(self) -> dict[str, Any]:
        """config.json as a dict; a missing or unreadable file is a ValueError naming it."""
        p = self.path / "config.json"
        if not p.is_file():
            raise ValueError(f"{str(self.path)!r} has no config.json; is it a run directory?")
        try:
            out = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{str(p)!r} is not valid JSON ({e})") from None
        if not isinstance(out, dict):
            raise ValueError(f"{str(p)!r} holds a {type(out).__name__}, not a configuration")
        return out

    def write_results(self, results: Any) -> None:
        atomic_write_text(
            self.path / "results.json",
            json.dumps(results, indent=2, default=json_default, allow_nan=False) + "\n",
        )

    def read_results(self) -> Any:
        return json.loads((self.path / "results.json").read_text())

    def append_trial(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line to trials.jsonl and fsync before returning."""
        line = json.dumps(record, default=json_default) + "\n"
        with open(self.path / "trials.jsonl", "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read_trials(self) -> list[dict[str, Any]]:
        """Every complete line of trials.jsonl (a torn last line from a crash is skipped)."""
        return list(self.iter_trials())

    def iter_trials(self) -> Iterator[dict[str, Any]]:
        p = self.path / "trials.jsonl"
        if not p.exists():
            return
        with open(p) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue

    def save_checkpoint(self, state: Any, name: str = "last.pt") -> Path:
        p = self.checkpoints / name
        atomic_torch_save(state, p)
        return p

    def load_checkpoint(self, name: str = "last.pt", map_location: Any = "cpu") -> Any:
        """Read ``checkpoints/<name>`` safely (``weights_only``; see :mod:`selfref.checkpoints`)."""
        p = self.checkpoints / name
        if not p.is_file():
            raise ValueError(f"no checkpoint {str(p)!r} to resume from")
        return checkpoints.load(p, map_location=map_location)

    def subdir(self, name: str) -> Path:
        """A sub-directory (e.g. one TensorBoard run per method and seed)."""
        p = self.path / name
        p.mkdir(parents=True, exist_ok=True)
        return p
