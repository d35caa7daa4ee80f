"""Studies in Optuna's RDB storage (``sqlite:///FILE``, ``postgresql://...``): ``--storage URL``.

Every trial of every trial-based method of a comparison goes into one Optuna study per
(method, seed), named ``<comparison>/<method>-s<seed>``, so optuna-dashboard (or any Optuna
client) shows the whole comparison and several processes can write to one database at once
(Optuna's RDB storage serializes the writes in the database).

- A search trial (grid, random, tpe, gp, rnn-bo) is one Optuna trial: its tuned parameters
  with their distributions, its validation loss as the value, the state ``COMPLETE``
  (``FAIL`` for a diverged or failed trial), and user attributes ``method``, ``seed``,
  ``index``, ``status``, ``reason``, ``grad_evals``, ``test_loss`` and the whole selfref
  record (``selfref_records``), from which :meth:`OptunaStore.load` rebuilds the study.
- A multi-fidelity trial (hyperband, asha) is one Optuna trial per configuration: each rung
  adds an intermediate value at its step count; the top rung completes it; at the end of the
  search the configurations that were stopped are set ``PRUNED``.
- The comparison itself (its configuration and every finished (method, seed) Result) is kept
  in the user attributes of a study ``<comparison>/_comparison``
  (:func:`save_comparison`, :func:`load_comparison`), so ``selfref compare --storage URL
  --resume <comparison>`` needs nothing but the database.

:func:`open_store` is what the methods call: without a storage URL it is the run
directory's ``trials.jsonl`` (:class:`~selfref.methods.trials.TrialStore`); with one, the
database (and the JSONL file too, when there is a run directory), and resume reads the
database alone. Optuna (and for PostgreSQL a driver, ``selfref[postgres]``) is an optional
extra.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

from selfref.runs import RunDir, json_safe
from selfref.search_space import CategoricalDim, FloatDim, IntDim, SearchSpace

__all__ = [
    "OptunaStore",
    "open_store",
    "save_comparison",
    "load_comparison",
    "check_storage_url",
    "RECORDS_ATTR",
]

RECORDS_ATTR = "selfref_records"
COMPARISON_STUDY = "_comparison"


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as e:  # pragma: no cover - optuna is installed in the dev setup
        raise ImportError("--storage needs optuna: pip install 'selfref[optuna]'") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def check_storage_url(url: str) -> str:
    """``sqlite:///FILE`` or ``postgresql://...`` (ValueError naming the valid forms)."""
    if not isinstance(url, str) or not url.startswith(("sqlite:///", "postgresql")):
        raise ValueError(
            f"unknown storage URL {url!r}; valid: sqlite:///FILE or postgresql://USER@HOST:PORT/DB"
        )
    return url


def _storage(url: str) -> Any:
    optuna = _optuna()
    kwargs: dict[str, Any] = {}
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
            return storage, optuna.create_study(
                storage=storage, study_name=study, direction="minimize", load_if_exists=True
            )
        except (IntegrityError, OperationalError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _distribution(optuna: Any, dim: Any) -> Any:
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
    """One study's records in Optuna's RDB storage (the interface of ``TrialStore``).

    Args:
        url: the storage URL.
        study: the Optuna study name (``<comparison>/<method>-s<seed>``).
        space: the search space (the trials' parameter distributions).
        method, seed: stored on the study and on every trial.
        mirror: also append every record here (the run directory's ``trials.jsonl``).
    """

    def __init__(
        self,
        url: str,
        study: str,
        space: SearchSpace,
        method: str,
        seed: int,
        mirror: Any = None,
    ) -> None:
        self.optuna = _optuna()
        self.study_name = study
        self.space = space
        self.method, self.seed = method, seed
        self.mirror = mirror
        self.storage, self.study = _open_study(self.optuna, url, study)
        self.study.set_user_attr("method", method)
        self.study.set_user_attr("seed", seed)
        self.dists = {d.name: _distribution(self.optuna, d) for d in space.dims}
        self._rung_trials: dict[int, int] = {}  # selfref trial -> Optuna trial id

    # -- reading ---------------------------------------------------------------------------

    def load(self) -> list[dict[str, Any]]:
        """The study's records in index order (from the database alone)."""
        out: dict[int, dict[str, Any]] = {}
        for t in self.study.get_trials(deepcopy=False):
            for rec in t.user_attrs.get(RECORDS_ATTR, []):
                out.setdefault(int(rec["index"]), rec)
            if "selfref_trial" in t.user_attrs:
                self._rung_trials[int(t.user_attrs["selfref_trial"])] = t._trial_id
        return [out[i] for i in sorted(out)]

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
        rec = _plain({**record, "study": self.study_name})
        if "rung" in rec:
            self._append_rung(rec)
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
        self.study.add_trial(frozen)

    def _append_rung(self, rec: dict[str, Any]) -> None:
        st = self.storage
        trial = int(rec["trial"])
        tid = self._rung_trials.get(trial)
        if tid is None:
            tid = st.create_new_trial(self.study._study_id)
            self._rung_trials[trial] = tid
            for k, v in self._params(rec["hparams"]).items():
                dist = self.dists[k]
                st.set_trial_param(tid, k, dist.to_internal_repr(v), dist)
            st.set_trial_user_attr(tid, "selfref_trial", trial)
            records: list[dict[str, Any]] = []
        else:
            records = list(st.get_trial_user_attrs(tid).get(RECORDS_ATTR, []))
        for k, v in self._attrs(rec).items():
            st.set_trial_user_attr(tid, k, v)
        st.set_trial_user_attr(tid, "rung", rec["rung"])
        st.set_trial_user_attr(tid, RECORDS_ATTR, [*records, rec])
        value = _value(rec)
        State = self.optuna.trial.TrialState
        if value is not None:
            st.set_trial_intermediate_value(tid, int(rec["steps"]), value)
        if value is None:
            st.set_trial_state_values(tid, State.FAIL)
        elif rec.get("top"):
            st.set_trial_state_values(tid, State.COMPLETE, [value])

    def mark_pruned(self, trials: list[int]) -> None:
        """Set the configurations stopped early (still running in the database) PRUNED."""
        State = self.optuna.trial.TrialState
        for trial in trials:
            tid = self._rung_trials.get(trial)
            if tid is None:
                continue
            if self.storage.get_trial(tid).state == State.RUNNING:
                self.storage.set_trial_state_values(tid, State.PRUNED)


def open_store(
    run_dir: RunDir | None,
    storage: str | None,
    study: str,
    space: SearchSpace,
    method: str,
    seed: int,
) -> Any:
    """The store a method's study writes to: ``trials.jsonl`` and/or the database.

    Returns None when there is neither a run directory nor a storage URL.
    """
    from selfref.methods.trials import TrialStore

    jsonl = TrialStore(run_dir, study) if run_dir is not None else None
    if storage is None:
        return jsonl
    prefix = f"{run_dir.path.name}/" if run_dir is not None else ""
    return OptunaStore(storage, prefix + study, space, method, seed, mirror=jsonl)


def _comparison_study(url: str, name: str, create: bool) -> Any:
    optuna = _optuna()
    study_name = f"{name}/{COMPARISON_STUDY}"
    if create:
        return _open_study(optuna, url, study_name)[1]
    try:
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
    study = _comparison_study(url, name, create=False)
    attrs = study.user_attrs
    return dict(attrs["config"]), list(attrs.get("results", []))
