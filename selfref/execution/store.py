"""Where a study's finished trials persist: the store (journal) interface and its JSONL file.

The study loop (:mod:`selfref.methods.study`) writes each finished trial's record through a
:class:`StudyStore` the moment it finishes, and on resume reads them back instead of running
them again. The interface is two calls, so another backend can sit behind it (an Optuna RDB
storage keeps each record as a trial of an Optuna study named after ``study``, its fields
as user attributes):

- ``load()``: this study's finished records, oldest first, each index once;
- ``append(record)``: persist one finished record before returning (crash safety).

:class:`TrialStore` is the default: lines of the run directory's ``trials.jsonl``
(:meth:`selfref.runs.RunDir.append_trial`, fsync'd), tagged with the study name so several
studies share one file.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from selfref.runs import RunDir

__all__ = ["StudyStore", "TrialStore"]

Record = dict[str, Any]


@runtime_checkable
class StudyStore(Protocol):
    """One study's finished trial records (see the module docstring)."""

    study: str  # the study's name, e.g. "random-s0"

    def load(self) -> list[Record]:
        """This study's finished records in the order they finished, each index once."""
        ...

    def append(self, record: Mapping[str, Any]) -> None:
        """Persist one finished record (durable when this returns)."""
        ...


class TrialStore:
    """One study's records in a run directory's ``trials.jsonl`` (shared by several studies).

    Args:
        run: the run directory.
        study: the study's name, e.g. ``"random-s0"``; each record carries it.
    """

    def __init__(self, run: RunDir, study: str) -> None:
        self.run = run
        self.study = study

    def load(self) -> list[Record]:
        """This study's finished records in file order (a torn last line is skipped)."""
        out: list[Record] = []
        seen: set[int] = set()
        for rec in self.run.iter_trials():
            if rec.get("study") != self.study:
                continue
            idx = int(rec["index"])
            if idx in seen:
                warnings.warn(
                    f"trials.jsonl holds trial {idx} of study {self.study!r} twice; "
                    "keeping the first",
                    stacklevel=2,
                )
                continue
            seen.add(idx)
            out.append(rec)
        return out

    def append(self, record: Mapping[str, Any]) -> None:
        self.run.append_trial({**record, "study": self.study})
