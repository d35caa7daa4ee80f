"""Where a study's finished trials persist: the store (journal) interface and its JSONL file.

The study loop (:mod:`selfref.methods.study`) writes each finished trial's record through a
:class:`StudyStore` the moment it finishes, and on resume reads them back instead of running
them again. The interface is a few calls, so another backend can sit behind it
(:class:`~selfref.execution.optuna_storage.OptunaStore` keeps each record as a trial of an
Optuna study named after ``study``, its fields as user attributes):

- ``load()``: this study's finished records, oldest first, each index once;
- ``append(record)``: persist one finished record before returning (crash safety);
- ``sync()``: make every appended record durable on disk (the study calls it at its end);
- ``mark_pruned(trials)``: a multi-fidelity study's configurations that stopped before the
  top rung, told at the study's end (a store whose records already say so does nothing).

:func:`open_store` picks the backend: the run directory's ``trials.jsonl``, or with an
Optuna storage URL the database (mirrored to ``trials.jsonl`` when there is a run directory).

:class:`TrialStore` is the default: lines of the run directory's ``trials.jsonl``, tagged
with the study name so several studies share one file. Each line is written and flushed
before ``append`` returns, so it survives the driver process being killed; it is fsync'd at
once by default (``sync_s=0``), or at most every ``sync_s`` seconds (group commit: a machine
crash then loses at most that window, whose trials run again on resume; a killed process
loses nothing either way).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from selfref.runs import RunDir, json_default
from selfref.search_space import SearchSpace

__all__ = ["StudyStore", "TrialStore", "open_store"]

Record = dict[str, Any]


@runtime_checkable
class StudyStore(Protocol):
    """One study's finished trial records (see the module docstring)."""

    study: str  # the study's name, e.g. "random-s0"

    def load(self) -> list[Record]:
        """This study's finished records in the order they finished, each index once."""
        ...

    def append(self, record: Mapping[str, Any]) -> None:
        """Persist one finished record (it survives the driver's death when this returns)."""
        ...

    def sync(self) -> None:
        """Every appended record is on disk when this returns."""
        ...

    def mark_pruned(self, trials: Sequence[int]) -> None:
        """These configurations of a multi-fidelity study stopped before its top rung."""
        ...


class TrialStore:
    """One study's records in a run directory's ``trials.jsonl`` (shared by several studies).

    Args:
        run: the run directory.
        study: the study's name, e.g. ``"random-s0"``; each record carries it.
        sync_s: fsync at most this often (0: after every record).
    """

    def __init__(self, run: RunDir, study: str, sync_s: float = 0.0) -> None:
        if sync_s < 0:
            raise ValueError(f"sync_s must be >= 0 seconds, got {sync_s}")
        self.run = run
        self.study = study
        self.sync_s = sync_s
        self._synced = -float("inf")  # time.monotonic() of the last fsync
        self._dirty = False

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
        line = json.dumps({**record, "study": self.study}, default=json_default) + "\n"
        with open(self.run.path / "trials.jsonl", "a") as f:
            f.write(line)
            f.flush()
            now = time.monotonic()
            if now - self._synced >= self.sync_s:
                os.fsync(f.fileno())
                self._synced, self._dirty = now, False
            else:
                self._dirty = True

    def sync(self) -> None:
        if self._dirty:
            with open(self.run.path / "trials.jsonl", "a") as f:
                os.fsync(f.fileno())
            self._synced, self._dirty = time.monotonic(), False

    def mark_pruned(self, trials: Sequence[int]) -> None:
        """Nothing to do: each rung's record says where its configuration stopped."""


def open_store(
    run_dir: RunDir | None,
    storage: str | None,
    study: str,
    space: SearchSpace,
    method: str,
    seed: int,
    sync_s: float = 0.0,
) -> StudyStore | None:
    """The store study ``study`` of ``method`` and ``seed`` writes to.

    Args:
        run_dir: the run directory whose ``trials.jsonl`` holds the records (None: none).
        storage: an Optuna RDB URL (``sqlite:///FILE``, ``postgresql://...``): the records go
            to the Optuna study ``<run name>/<study>`` there too, and resume reads the
            database (:class:`~selfref.execution.optuna_storage.OptunaStore`).
        space: the search space (the Optuna trials' parameter distributions).
        sync_s: fsync ``trials.jsonl`` at most this often (0: after every record).

    Returns:
        None when there is neither a run directory nor a storage URL (in memory only).
    """
    jsonl = TrialStore(run_dir, study, sync_s) if run_dir is not None else None
    if storage is None:
        return jsonl
    from selfref.execution.optuna_storage import OptunaStore

    prefix = f"{run_dir.path.name}/" if run_dir is not None else ""
    return OptunaStore(storage, prefix + study, space, method, seed, mirror=jsonl)
