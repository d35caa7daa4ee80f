"""Bayesian optimization as users run it: adapters to Optuna's TPE and GP samplers.

``tpe`` uses ``optuna.samplers.TPESampler`` (the Tree-structured Parzen Estimator of
Bergstra et al. 2011) and ``gp`` ``optuna.samplers.GPSampler`` (Gaussian-process BO with
log expected improvement; Shahriari et al. 2016 survey the method), both with Optuna's
defaults (10 random start-up trials) and seeded with the run's seed. Optuna is an optional
extra: ``pip install 'selfref[optuna]'``; without it both methods are listed as missing.

The samplers' proposals depend on the results so far, so trials run through Optuna's
ask/tell interface with up to ``sync_lag`` (default 2) trials in flight under the study's
synchronous lag (:mod:`selfref.methods.study`): trial i is proposed with trials ≤ i−2 told
and trial i−1 pending (TPE's default constant liar keeps them apart), so a seed gives the
same points whichever worker finishes first and on any number of workers. A larger lag runs
more trials of one study at once but shows the sampler fewer results (with L, the first
trial the model proposes is index 9 + L, after the 10 start-up trials are told).
``sync_lag=0`` tells results as they arrive (no waiting, but the points then depend on the
timing). A trial that diverges or fails is told as a failed trial (Optuna's own treatment of
a NaN objective), or as ``diverged_value`` when that is given. On resume the finished
trials are replayed into a fresh study with ``add_trial`` and the search continues after
them (the new proposals then differ from an uninterrupted run's).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from selfref.budget import Budget
from selfref.execution import Executor, torch_threads
from selfref.execution.optuna_storage import optuna_distribution, quiet_optuna
from selfref.methods.search import TrialSearch
from selfref.methods.study import Proposer
from selfref.methods.trial import TrialFn, run_trial
from selfref.runs import RunDir
from selfref.search_space import SearchSpace

__all__ = ["TPE", "GP", "OptunaProposer", "EXTRA_MESSAGE"]

EXTRA_MESSAGE = "install the extra: pip install 'selfref[optuna]'"


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError as e:
        raise ImportError(f"optuna is not installed; {EXTRA_MESSAGE}") from e
    return optuna


class OptunaProposer:
    """Ask/tell over an Optuna study; trial index -> the Optuna trial in flight.

    Args:
        sampler: the Optuna sampler (seeded).
        space: the search space (mapped onto Optuna distributions).
        diverged_value: objective told for a diverged or failed trial; None tells it as
            failed (Optuna's treatment of a NaN objective).
        ask_threads: torch threads while the sampler proposes (GP fits use torch); None
            leaves the setting alone.
    """

    deterministic = False

    def __init__(
        self,
        sampler: Any,
        space: SearchSpace,
        diverged_value: float | None = None,
        ask_threads: int | None = 1,
    ) -> None:
        self.optuna = _import_optuna()
        self.space = space
        self.diverged_value = diverged_value
        self.ask_threads = ask_threads
        self.dists = {dim.name: optuna_distribution(self.optuna, dim) for dim in space.dims}
        with quiet_optuna(self.optuna):
            self.study = self.optuna.create_study(direction="minimize", sampler=sampler)
        self.live: dict[int, Any] = {}

    def _value(self, record: Mapping[str, Any]) -> float | None:
        v = record.get("val_loss")
        if record.get("status") == "ok" and v is not None and math.isfinite(v):
            return float(v)
        return self.diverged_value

    def ask(self, index: int) -> dict[str, Any] | None:
        with quiet_optuna(self.optuna), torch_threads(self.ask_threads):
            trial = self.study.ask(self.dists)
        self.live[index] = trial
        return {**trial.params, **self.space.fixed}

    def tell(self, index: int, hparams: Mapping[str, Any], record: Mapping[str, Any]) -> None:
        trial = self.live.pop(index)
        value = self._value(record)
        with quiet_optuna(self.optuna):
            if value is None:
                self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
            else:
                self.study.tell(trial, value)

    def replay(self, index: int, hparams: Mapping[str, Any], record: Mapping[str, Any]) -> None:
        value = self._value(record)
        params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in hparams.items()}
        params = {k: params[k] for k in self.dists}
        TrialState = self.optuna.trial.TrialState
        frozen = self.optuna.trial.create_trial(
            params=params,
            distributions=self.dists,
            value=value,
            state=TrialState.COMPLETE if value is not None else TrialState.FAIL,
            user_attrs={"selfref_index": index},
        )
        with quiet_optuna(self.optuna):
            self.study.add_trial(frozen)


class _OptunaSearch(TrialSearch):
    """Shared adapter: a seeded Optuna sampler driven by :func:`run_study`."""

    name: ClassVar[str] = "optuna"

    @classmethod
    def check_available(cls) -> None:
        """Raise ImportError naming the extra when Optuna is missing."""
        _import_optuna()

    def __init__(
        self,
        diverged_value: float | None = None,
        n_startup_trials: int = 10,
        ask_threads: int | None = 1,
        space: SearchSpace | None = None,
        workers: int | None = None,
        executor: Executor | None = None,
        run_dir: RunDir | str | None = None,
        trial_fn: TrialFn = run_trial,
        storage: str | None = None,
        sync_lag: int = 2,
    ) -> None:
        self.check_available()
        super().__init__(
            space=space,
            workers=workers,
            executor=executor,
            run_dir=run_dir,
            trial_fn=trial_fn,
            storage=storage,
        )
        if sync_lag < 0:
            raise ValueError(f"sync_lag must be >= 0 (0: tell as they arrive), got {sync_lag}")
        self.sync_lag = sync_lag or None  # the Study's lag; None: asynchronous
        if n_startup_trials < 1:
            raise ValueError(f"n_startup_trials must be >= 1, got {n_startup_trials}")
        if diverged_value is not None and not math.isfinite(diverged_value):
            raise ValueError(f"diverged_value must be finite or None, got {diverged_value}")
        self.diverged_value = diverged_value
        self.n_startup_trials = n_startup_trials
        self.ask_threads = ask_threads

    def sampler(self, seed: int) -> Any:
        raise NotImplementedError

    def proposer(self, space: SearchSpace, budget: Budget, seed: int) -> Proposer:
        return OptunaProposer(self.sampler(seed), space, self.diverged_value, self.ask_threads)

    def describe(self, proposer: Proposer) -> dict[str, Any]:
        optuna = _import_optuna()
        return {"optuna": optuna.__version__, "n_startup_trials": self.n_startup_trials}


class TPE(_OptunaSearch):
    """Optuna's TPE sampler (Bergstra et al. 2011) with its defaults, seeded.

    Args:
        diverged_value: objective told for diverged/failed trials (None: told as failed).
        n_startup_trials: random trials before TPE starts modelling (Optuna's default 10).
        ask_threads: torch threads while proposing (None: unchanged).
        sync_lag: trial i is proposed once trials ≤ i − sync_lag are told (reproducible on
            any number of workers; at most this many in flight); 0: told as they arrive.
        space, workers, executor, run_dir, trial_fn: see
            :class:`~selfref.methods.search.TrialSearch`.

    Raises:
        ImportError: Optuna is missing (the message names the extra to install).
    """

    name: ClassVar[str] = "tpe"

    def sampler(self, seed: int) -> Any:
        optuna = _import_optuna()
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.n_startup_trials)


class GP(_OptunaSearch):
    """Optuna's Gaussian-process sampler (log expected improvement) with its defaults, seeded.

    Args:
        diverged_value: objective told for diverged/failed trials (None: told as failed).
        n_startup_trials: random trials before the GP is fitted (Optuna's default 10).
        ask_threads: torch threads while fitting and proposing (None: unchanged).
        sync_lag: trial i is proposed once trials ≤ i − sync_lag are told (reproducible on
            any number of workers; at most this many in flight); 0: told as they arrive.
        space, workers, executor, run_dir, trial_fn: see
            :class:`~selfref.methods.search.TrialSearch`.

    Raises:
        ImportError: Optuna (or its GP dependency SciPy) is missing.
    """

    name: ClassVar[str] = "gp"

    @classmethod
    def check_available(cls) -> None:
        _import_optuna()
        try:
            import scipy  # noqa: F401  (GPSampler needs it)
        except ImportError as e:
            raise ImportError(
                "scipy is not installed (Optuna's GPSampler needs it): pip install scipy"
            ) from e

    def sampler(self, seed: int) -> Any:
        optuna = _import_optuna()
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=self.n_startup_trials)
