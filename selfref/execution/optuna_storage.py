"""Studies in Optuna's RDB storage (``sqlite:///FILE``, ``postgresql://...``): ``--storage URL``.

A second backend behind the store interface of :mod:`selfref.execution.store`
(:class:`OptunaStore`: ``load``/``append``/``sync``/``mark_pruned``). Every trial of every
trial-based method of a comparison goes into one Optuna study per (method, seed), named
``<comparison>/<method>-s<seed>``, so optuna-dashboard (or any Optuna client) shows the
whole comparison, and several processes can write to one database at once (Optuna's RDB
storage serializes the writes in the database).

- A search trial (grid, random, tpe, gp, rnn-bo) is one Optuna trial: its tuned parameters
  with their distributions, its validation loss as the value, the state ``COMPLETE``
  (``FAIL`` for a diverged or failed trial), and user attributes ``method``, ``seed``,
  ``index``, ``status``, ``reason``, ``grad_evals``, ``test_loss`` and the whole selfref
  record (``selfref_records``), from which :meth:`OptunaStore.load` rebuilds the study.
- A multi-fidelity trial (hyperband, asha) is one Optuna trial per configuration: each rung
  adds an intermediate value at its step count; the top rung completes it; at the end of the
  study the configurations that were stopped are set ``PRUNED``. Its user attributes are
  those of its first rung, with ``status`` and ``rung`` following its latest one. A pruned
  configuration that a resumed study (with a larger budget) promotes after all continues in
  a new Optuna trial (user attribute ``continues``: the pruned one's number), since Optuna's
  finished trials cannot change.
- The comparison itself (its configuration and every finished (method, seed) Result) is kept
  in the user attributes of a study ``<comparison>/_comparison``
  (:func:`save_comparison`, :func:`load_comparison`), so ``selfref compare --storage URL
  --resume <comparison>`` needs nothing but the database.

:func:`selfref.execution.store.open_store` builds an :class:`OptunaStore` when a storage URL
is given, mirrored to the run directory's ``trials.jsonl`` when there is one; resume reads
the database, and records only one side holds (a comparison started without ``--storage``,
or a run directory made again from the database) are copied to the other. Optuna (and for
PostgreSQL the psycopg2 driver, ``selfref[postgres]``) is an optional extra.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from selfref.execution.store import StudyStore
from selfref.runs import json_safe
from selfref.search_space import CategoricalDim, FloatDim, IntDim, SearchSpace

__all__ = [
    "optuna_distribution",
    "quiet_optuna",
    "OptunaStore",
    "save_comparison",
    "load_comparison",
    "check_storage_url",
    "check_available",
    "RECORDS_ATTR",
    "COMPARISON_STUDY",
]

RECORDS_ATTR = "selfref_records"  # user attribute holding a trial's selfref records
COMPARISON_STUDY = "_comparison"  # the study that holds a comparison's config and Results


def check_storage_url(url: str) -> str:
    """``sqlite:///FILE`` or ``postgresql://...`` without a password (ValueError naming the
    valid forms). A password in the URL is refused, and not repeated in the message: the URL
    is recorded in the run's argv.txt and config.json."""
    if not isinstance(url, str) or not url.startswith(("sqlite:///", "postgresql")):
        raise ValueError(
            f"unknown storage URL {url!r}; valid: sqlite:///FILE or postgresql://USER@HOST:PORT/DB"
        )
    from urllib.parse import urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:  # e.g. a bad port: the driver reports it when it connects
        password = None
    if password is not None:
        raise ValueError(
            "the storage URL holds a password, and the URL is recorded in the run directory "
            "(argv.txt, config.json); give postgresql://USER@HOST:PORT/DB and put the "
            "password in ~/.pgpass or PGPASSWORD"
        )
    return url


def _sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///FILE`` URL (None for other URLs)."""
    return Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None


def check_available(url: str) -> None:
    """``url`` can be used here: Optuna (and for PostgreSQL the psycopg2 driver) is
    installed, and a SQLite file's folder exists.

    Raises:
        ImportError: naming the extra to install.
        ValueError: a SQLite file in a folder that does not exist.
    """
    check_storage_url(url)
    db = _sqlite_file(url)
    if db is not None and not db.parent.is_dir():
        raise ValueError(
            f"storage {url!r}: the folder {str(db.parent)!r} of the database file does not exist"
        )
    _optuna()
    if url.startswith(("postgresql://", "postgresql+psycopg2://")):
        try:
            import psycopg2  # noqa: F401
        except ImportError as e:
            raise ImportError(
                f"storage {url!r} needs the psycopg2 driver: pip install 'selfref[postgres]'"
            ) from e


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as e:
        raise ImportError("--storage needs optuna: pip install 'selfref[optuna]'") from e
    return optuna


@contextlib.contextmanager
def quiet_optuna(optuna: Any) -> Iterator[None]:
    """Optuna logs every study it creates and every trial at INFO; keep WARNING and above
    meanwhile."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


def _storage(url: str) -> Any:
    optuna = _optuna()
    kwargs: dict[str, Any]
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}  # concurrent writers wait for the lock
    else:
        kwargs = {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(check_storage_url(url), engine_kwargs=kwargs)


def _open_study(optuna: Any, url: str, study: str, attempts: int = 8) -> tuple[Any, Any]:
    """(storage, study), created if missing. Processes that start together race to create
    the schema and the study (a unique-constraint error in one of them); the loser retries."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(attempts):
        try:
            storage = _storage(url)
            with quiet_optuna(optuna):
                made = optuna.create_study(
                    storage=storage, study_name=study, direction="minimize", load_if_exists=True
                )
            return storage, made
        except (IntegrityError, OperationalError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def optuna_distribution(optuna: Any, dim: Any) -> Any:
    """The Optuna distribution of a search-space dimension."""
    d = optuna.distributions
    if isinstance(dim, FloatDim):
        return d.FloatDistribution(dim.low, dim.high, log=dim.log)
    if isinstance(dim, IntDim):
        return d.IntDistribution(dim.low, dim.high, log=dim.log)
    if isinstance(dim, CategoricalDim):
        return d.CategoricalDistribution(list(dim.choices))
    raise ValueError(f"unsupported dimension type {type(dim).__name__}")


def _plain(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record as JSON would give it back (what user attributes can hold)."""
    return json.loads(json.dumps(json_safe(dict(record))))


def _value(record: Mapping[str, Any]) -> float | None:
    v = record.get("val_loss")
    if record.get("status") == "ok" and v is not None and math.isfinite(float(v)):
        return float(v)
    return None


class OptunaStore:
    """One study's records in Optuna's RDB storage (the :class:`StudyStore` interface).

    Args:
        url: the storage URL.
        study: the Optuna study name (``<comparison>/<method>-s<seed>``).
        space: the search space (the trials' parameter distributions).
        method, seed: stored on the study and on every trial.
        mirror: another store every record also goes to (the run directory's
            ``trials.jsonl``); :meth:`load` copies what only one side holds to the other.

    Example:
        >>> import tempfile
        >>> from selfref.search_space import default_space
        >>> url = f"sqlite:///{tempfile.mkdtemp()}/s.db"
        >>> store = OptunaStore(url, "demo", default_space(), "random", 0)
        >>> store.append({"index": 0, "hparams": {"lr": 0.1, "momentum": 0.9,
        ...               "weight_decay": 1e-4}, "status": "ok", "val_loss": 0.5})
        >>> [r["val_loss"] for r in OptunaStore(url, "demo", default_space(), "random", 0).load()]
        [0.5]
    """

    def __init__(
        self,
        url: str,
        study: str,
        space: SearchSpace,
        method: str,
        seed: int,
        mirror: StudyStore | None = None,
    ) -> None:
        self.optuna = _optuna()
        self.url = url
        self.study = study
        self.space = space
        self.method, self.seed = method, seed
        self.mirror = mirror
        self.storage, self.optuna_study = _open_study(self.optuna, url, study)
        self.study_id = self.storage.get_study_id_from_name(study)
        self.optuna_study.set_user_attr("method", method)
        self.optuna_study.set_user_attr("seed", seed)
        self.dists = {d.name: optuna_distribution(self.optuna, d) for d in space.dims}
        self._rung_trials: dict[int, int] = {}  # selfref trial -> its Optuna trial id

    # -- reading ---------------------------------------------------------------------------

    def _db_records(self) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for t in self.optuna_study.get_trials(deepcopy=False):
            for rec in t.user_attrs.get(RECORDS_ATTR, []):
                out.setdefault(int(rec["index"]), rec)
            if "selfref_trial" in t.user_attrs:  # the latest Optuna trial of a configuration
                tid = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, t.number)
                self._rung_trials[int(t.user_attrs["selfref_trial"])] = tid
        return out

    def load(self) -> list[dict[str, Any]]:
        """The study's records in index order, from the database (and the mirror: records
        only one of them holds are written to the other first)."""
        db = self._db_records()
        if self.mirror is not None:
            mirrored = {int(r["index"]): r for r in self.mirror.load()}
            for i in sorted(set(mirrored) - set(db)):  # e.g. started without --storage
                self._write(mirrored[i])
                db[i] = _plain({**mirrored[i], "study": self.study})
            for i in sorted(set(db) - set(mirrored)):  # e.g. a run directory made again
                self.mirror.append({k: v for k, v in db[i].items() if k != "study"})
        return [db[i] for i in sorted(db)]

    # -- writing ---------------------------------------------------------------------------

    def _params(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        return {
            k: (tuple(v) if isinstance(v, list) else v)
            for k, v in hparams.items()
            if k in self.dists
        }

    def _attrs(self, rec: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "method": self.method,
            "seed": self.seed,
            "index": rec.get("index"),
            "status": rec.get("status"),
            "reason": rec.get("reason"),
            "grad_evals": rec.get("grad_evals"),
            "test_loss": rec.get("test_loss"),
        }

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one finished trial (or rung) to the database (and the mirror)."""
        if self.mirror is not None:
            self.mirror.append(record)
        self._write(record)

    def _write(self, record: Mapping[str, Any]) -> None:
        rec = _plain({**record, "study": self.study})
        if "rung" in rec:
            self._write_rung(rec)
            return
        value = _value(rec)
        State = self.optuna.trial.TrialState
        frozen = self.optuna.trial.create_trial(
            params=self._params(rec["hparams"]),
            distributions=self.dists,
            value=value,
            state=State.COMPLETE if value is not None else State.FAIL,
            user_attrs={**self._attrs(rec), RECORDS_ATTR: [rec]},
        )
        self.optuna_study.add_trial(frozen)

    def _write_rung(self, rec: dict[str, Any]) -> None:
        """A configuration's first rung creates its Optuna trial in one transaction; a later
        rung updates ``status``, ``rung`` and the records, adds its intermediate value and
        completes (top rung) or fails the trial (each call is one commit, so few of them)."""
        st = self.storage
        State = self.optuna.trial.TrialState
        trial = int(rec["trial"])
        value = _value(rec)
        tid = self._rung_trials.get(trial)
        previous = None
        if tid is not None and st.get_trial(tid).state.is_finished():
            previous, tid = st.get_trial(tid).number, None  # promoted after it was pruned
        if tid is None:
            attrs = {**self._attrs(rec), "selfref_trial": trial, "rung": rec["rung"]}
            if previous is not None:
                attrs["continues"] = previous
            if value is None:
                state = State.FAIL
            else:
                state = State.COMPLETE if rec.get("top") else State.RUNNING
            template = self.optuna.trial.FrozenTrial(
                number=-1,  # set by the storage
                state=state,
                value=value if state == State.COMPLETE else None,
                datetime_start=datetime.now(),
                datetime_complete=None if state == State.RUNNING else datetime.now(),
                params=self._params(rec["hparams"]),
                distributions=self.dists,
                user_attrs={**attrs, RECORDS_ATTR: [rec]},
                system_attrs={},
                intermediate_values={} if value is None else {int(rec["steps"]): value},
                trial_id=-1,
            )
            self._rung_trials[trial] = st.create_new_trial(self.study_id, template_trial=template)
            return
        records = list(st.get_trial_user_attrs(tid).get(RECORDS_ATTR, []))
        st.set_trial_user_attr(tid, "status", rec.get("status"))
        st.set_trial_user_attr(tid, "rung", rec["rung"])
        st.set_trial_user_attr(tid, RECORDS_ATTR, [*records, rec])
        if value is None:
            st.set_trial_state_values(tid, State.FAIL)
            return
        st.set_trial_intermediate_value(tid, int(rec["steps"]), value)
        if rec.get("top"):
            st.set_trial_state_values(tid, State.COMPLETE, [value])

    def sync(self) -> None:
        """Each write is committed when it returns; the mirror is synced."""
        if self.mirror is not None:
            self.mirror.sync()

    def mark_pruned(self, trials: Sequence[int]) -> None:
        """Set the configurations stopped early (still running in the database) PRUNED."""
        State = self.optuna.trial.TrialState
        for trial in trials:
            tid = self._rung_trials.get(trial)
            if tid is not None and self.storage.get_trial(tid).state == State.RUNNING:
                self.storage.set_trial_state_values(tid, State.PRUNED)
        if self.mirror is not None:
            self.mirror.mark_pruned(trials)


def _comparison_study(url: str, name: str, create: bool) -> Any:
    optuna = _optuna()
    study_name = f"{name}/{COMPARISON_STUDY}"
    if create:
        return _open_study(optuna, url, study_name)[1]
    try:
        with quiet_optuna(optuna):
            return optuna.load_study(study_name=study_name, storage=_storage(url))
    except KeyError:
        raise ValueError(
            f"storage {url!r} has no comparison {name!r} (no study {study_name!r})"
        ) from None


def save_comparison(
    url: str, name: str, config: Mapping[str, Any], results: list[Mapping[str, Any]] | None = None
) -> None:
    """Keep the comparison's configuration (and its finished Results) in the database."""
    study = _comparison_study(url, name, create=True)
    study.set_user_attr("config", _plain(config))
    if results is not None:
        study.set_user_attr("results", [_plain(r) for r in results])


def load_comparison(url: str, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(configuration, finished Results as dicts) of comparison ``name``.

    Raises:
        ValueError: the database holds no such comparison.
    """
    db = _sqlite_file(url)
    if db is not None and not db.is_file():
        raise ValueError(f"storage {url!r}: the database file {str(db)!r} does not exist")
    study = _comparison_study(url, name, create=False)
    attrs = study.user_attrs
    if "config" not in attrs:
        raise ValueError(f"storage {url!r}: comparison {name!r} holds no configuration")
    return dict(attrs["config"]), list(attrs.get("results", []))
