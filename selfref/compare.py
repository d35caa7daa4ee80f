"""The comparison harness: several methods, one task, one budget, several seeds.

:func:`run_comparison` runs every (method, seed) pair of a :class:`CompareConfig` on one task
with the same :class:`~selfref.budget.Budget`, records a failed pair as failed and goes on,
and calls back after each pair so the caller can persist results at once. Every pair runs on
one executor (:mod:`selfref.execution`: local worker processes, or a Dask cluster with
``cluster``): each trial of a search method is a unit of work, and each (method, seed) of
any other method is one unit, so the whole comparison spreads over the workers. Methods
added later plug in by registry name with no change here, and get only the options their
constructor accepts.

Outputs, built from the :class:`~selfref.methods.Result` list:

- :func:`results_table` / :func:`results_markdown`: mean ± std over seeds of final val
  loss, test loss, test accuracy, gradient evaluations, meta-training gradient evaluations
  (reported beside the budget, never inside it) and wall seconds;
- :func:`plot_curves`: a PNG of best validation loss against gradient evaluations, a mean
  line and a min–max band over seeds per method (matplotlib, Agg backend);
- :func:`custom_scalars_layout`: a TensorBoard custom-scalars layout putting every method's
  and seed's ``best/val_loss_vs_grad_evals`` on one chart.

Budget presets (:data:`BUDGETS`), per (method, seed) — size new methods to fit them:

- ``quick`` (the default of ``selfref compare``): 2,000 gradient evaluations, trials of 100
  steps (20 trials for a search method), seeds 0, 1, 2. The four search baselines take
  about a minute together on 2 CPU cores, leaving the rest of the 5-minute target to the
  gradient-based methods: each should finish its 3 seeds in well under a minute.
- ``full``: 10,000 gradient evaluations, trials of 200 steps (50 trials), seeds 0–4; a few
  minutes for the four search baselines on 2 cores.
"""

from __future__ import annotations

import inspect
import math
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from selfref import methods as methods_registry
from selfref.budget import Budget
from selfref.execution import Completion, Executor, drive, make_executor, torch_threads
from selfref.execution.driver import Unit
from selfref.logging import Logger, MemoryLogger
from selfref.methods.base import CURVE_TAG, Result
from selfref.methods.search import TrialSearch
from selfref.methods.study import Study, unit_key
from selfref.options import check_options
from selfref.runs import RunDir

__all__ = [
    "BudgetPreset",
    "BUDGETS",
    "CompareConfig",
    "resolve_budget",
    "run_comparison",
    "run_method",
    "comparison_executor",
    "method_options",
    "results_table",
    "results_markdown",
    "plot_curves",
    "custom_scalars_layout",
    "CURVE_TAG",
]


@dataclass(frozen=True)
class BudgetPreset:
    """A named budget: gradient evaluations and trial length per (method, seed), and seeds."""

    grad_evals: int  # per (method, seed)
    steps_per_trial: int  # inner steps of one training run
    seeds: tuple[int, ...]  # default seeds


BUDGETS: dict[str, BudgetPreset] = {
    "quick": BudgetPreset(2_000, 100, (0, 1, 2)),  # the default comparison: < 5 min, 2 cores
    "full": BudgetPreset(10_000, 200, (0, 1, 2, 3, 4)),  # the serious setting
}


def resolve_budget(
    budget: str | int, steps_per_trial: int | None = None
) -> tuple[int, int, tuple[int, ...]]:
    """``"quick"``, ``"full"`` or a number of gradient evaluations -> (grad evals, steps, seeds).

    Raises:
        ValueError: an unknown budget name, a non-positive number, or a budget smaller than
            one trial.
    """
    if isinstance(budget, str) and budget in BUDGETS:
        p = BUDGETS[budget]
        grad_evals, steps, seeds = p.grad_evals, p.steps_per_trial, p.seeds
    else:
        try:
            grad_evals = int(budget)
        except (TypeError, ValueError):
            raise ValueError(
                f"unknown budget {budget!r}; valid: {', '.join(BUDGETS)} or a number of "
                "gradient evaluations"
            ) from None
        if grad_evals < 1:
            raise ValueError(f"budget must be >= 1 gradient evaluation, got {grad_evals}")
        steps, seeds = BUDGETS["quick"].steps_per_trial, BUDGETS["quick"].seeds
    if steps_per_trial is not None:
        if steps_per_trial < 1:
            raise ValueError(f"steps per trial must be >= 1, got {steps_per_trial}")
        steps = steps_per_trial
    if grad_evals < steps:
        raise ValueError(
            f"budget of {grad_evals} gradient evaluations is smaller than one trial of "
            f"{steps} steps (lower --steps-per-trial or raise --budget)"
        )
    return grad_evals, steps, seeds


@dataclass(frozen=True)
class CompareConfig:
    """One comparison: what runs, on what, with how much (config.json holds ``to_dict()``).

    Args:
        task: task registry name.
        task_options: options for :func:`selfref.tasks.make`.
        methods: method registry names, in order.
        seeds: seeds; each (method, seed) pair is one run.
        grad_evals: gradient evaluations per (method, seed).
        steps_per_trial: inner steps of one trial.
        workers: trial worker processes shared by the search methods (0 = in-process).
        device: ``auto``, ``cpu`` or ``cuda``.
        space: a search space in its TOML/dict form (None: each task's default space).
        method_options: extra constructor options per method name.
        checkpoint: meta-weights for methods that take a ``checkpoint`` option.
        budget_name: the preset the budget came from (for the record).
        cluster: ``local:N`` or a Dask scheduler address: units run there instead of in
            ``workers`` local processes (:mod:`selfref.execution.cluster`).
        trial_timeout: seconds a unit of work may run before it is stopped and recorded as
            failed (None: no limit).
        prefetch: with ``cluster``, units in flight beyond the cluster's slots (queued on the
            workers, so a worker never waits for the driver; 0: none). Raises dispatch rates
            for short trials; a queued unit of a dead worker is retried like a running one.
        storage: an Optuna RDB URL (``sqlite:///FILE``, ``postgresql://...``) that every
            trial of the trial-based methods also goes to
            (:mod:`selfref.execution.optuna_storage`; None: the run directory alone).
    """

    task: str = "digits-mlp"  # the default comparison's task
    task_options: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"hidden": 40}
    methods: tuple[str, ...] = ()  # registry names
    seeds: tuple[int, ...] = BUDGETS["quick"].seeds  # one run per method and seed
    grad_evals: int = BUDGETS["quick"].grad_evals  # per (method, seed)
    steps_per_trial: int = BUDGETS["quick"].steps_per_trial  # one trial = one training run
    workers: int = 1  # trial worker processes (the CLI defaults to the number of cores)
    device: str = "auto"  # auto picks CUDA when present
    space: Mapping[str, Any] | None = None  # None: the task's default space
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    checkpoint: str | None = None  # for methods that load meta-weights
    budget_name: str = "quick"  # preset name or "custom"
    cluster: str | None = None  # None: local worker processes
    trial_timeout: float | None = None  # None: a unit may run as long as it takes
    prefetch: int = 0  # with a cluster: units queued beyond its slots
    storage: str | None = None  # Optuna RDB URL every trial also goes to (--storage)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("a comparison needs at least one method")
        if not self.seeds:
            raise ValueError("a comparison needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"repeated seeds in {list(self.seeds)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"repeated methods in {list(self.methods)}")
        self.budget.require_trial()  # validates both, and that one trial fits
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = in-process), got {self.workers}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")
        if self.prefetch and self.cluster is None:
            raise ValueError(
                "prefetch queues units on a Dask cluster's workers: it needs a cluster"
            )
        if self.trial_timeout is not None and not self.trial_timeout > 0:
            raise ValueError(f"trial timeout must be > 0 seconds, got {self.trial_timeout}")
        if self.storage is not None:
            from selfref.execution.optuna_storage import check_storage_url

            check_storage_url(self.storage)
        if self.trial_timeout is not None and self.workers == 0 and self.cluster is None:
            raise ValueError(
                "a trial timeout needs worker processes (workers >= 1 or a cluster): a unit "
                "in this process cannot be stopped"
            )

    @property
    def budget(self) -> Budget:
        return Budget(self.grad_evals, self.steps_per_trial)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"], d["seeds"] = list(self.methods), list(self.seeds)
        d["task_options"], d["method_options"] = (
            dict(self.task_options),
            {k: dict(v) for k, v in self.method_options.items()},
        )
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CompareConfig:
        """The inverse of :meth:`to_dict` (a stored config.json's ``compare`` section).

        Raises:
            ValueError: an unknown key (names the valid ones), a value of the wrong type or
                an invalid configuration.
        """
        check_options("comparison config", cls, d)
        d = dict(d)
        d["methods"] = tuple(d.get("methods", ()))
        d["seeds"] = tuple(d.get("seeds", ()))
        return cls(**d)


def _accepted(cls: Any) -> set[str]:
    """The constructor's explicitly named parameters (``**options`` is not an invitation:
    such constructors usually validate their options against a config)."""
    params = inspect.signature(cls.__init__).parameters
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n for n, p in params.items() if n != "self" and p.kind in kinds}


def method_options(
    name: str, offered: Mapping[str, Any], user: Mapping[str, Any]
) -> dict[str, Any]:
    """Constructor options for method ``name``: the harness's ``offered`` ones its constructor
    names, and every ``user`` option (a bad one fails in :func:`selfref.methods.make`)."""
    names = _accepted(methods_registry.method_class(name))
    out = {k: v for k, v in offered.items() if v is not None and k in names}
    out.update(user)
    return out


def check_methods(names: Sequence[str]) -> None:
    """Every name is registered and installed.

    Raises:
        ValueError: an unknown method (lists the known ones) or one whose optional
            dependency is missing (names what to install).
    """
    known = list(methods_registry.REGISTRY)
    gone = methods_registry.missing()
    for n in names:
        if n not in known:
            raise ValueError(f"unknown method {n!r}; known methods: {', '.join(known)}")
        if n in gone:
            raise ValueError(f"method {n!r} is not available: {gone[n]}")


class _TagRecorder:
    """Forwards to a logger, remembers which scalar tags were written, and holds back the
    method's own hparams entries so the harness writes one merged entry per run."""

    def __init__(self, inner: Logger) -> None:
        self.inner = inner
        self.tags: set[str] = set()
        self.held: list[tuple[dict[str, Any], dict[str, float]]] = []

    def scalar(self, tag: str, value: float | int | Tensor, step: int) -> None:
        self.tags.add(tag)
        self.inner.scalar(tag, value, step)

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        self.inner.histogram(tag, values, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.inner.text(tag, text, step)

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        self.held.append((dict(hparams), dict(metrics)))

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


def _hparam_entry(res: Result) -> tuple[dict[str, Any], dict[str, float]]:
    hp: dict[str, Any] = {"method": res.method, "seed": res.seed, "status": res.status}
    for k, v in res.best_hparams.items():
        hp[f"best.{k}"] = v
    metrics = {
        "final/val_loss": res.val_loss,
        "final/test_loss": res.test_loss,
        "final/test_accuracy": res.test_accuracy if res.test_accuracy is not None else math.nan,
        "cost/grad_evals": float(res.grad_evals),
        "cost/meta_train_grad_evals": float(res.meta_train_grad_evals),
        "cost/wall_s": res.wall_s,
    }
    return hp, metrics


def run_method(
    method: Any, task: Any, budget: Budget, seed: int, threads: int | None = None
) -> tuple[Result, MemoryLogger]:
    """One (method, seed) run of a single-run method: the unit of work an executor runs.

    The method logs into a :class:`~selfref.logging.MemoryLogger` that comes back with its
    Result (the driver replays it into the run's TensorBoard logger). A method that raises
    gives a failed Result with the exception as its reason; this never raises.
    """
    logger = MemoryLogger()
    t0 = time.perf_counter()
    try:
        with torch_threads(threads):
            res = method.run(task, budget, logger, seed)
    except Exception as e:  # recorded as a failed run; the comparison goes on
        res = _failed(type(method).name, task.name, seed, e)
    wall = time.perf_counter() - t0
    res.extra["harness_wall_s"] = wall
    if res.wall_s <= 0:
        res.wall_s = wall
    return res, logger


def _failed(
    name: str, task: str, seed: int, e: BaseException | str, tb: str | None = None
) -> Result:
    res = Result(method=name, task=task, seed=seed, status="failed")
    if isinstance(e, BaseException):
        res.reason = f"{type(e).__name__}: {e}"
        res.extra["traceback"] = traceback.format_exc(limit=10)
    else:
        res.reason = e
        if tb:
            res.extra["traceback"] = tb
    return res


def _replay(log: MemoryLogger, into: Logger) -> None:
    """Write what a unit logged in its worker into the driver's logger."""
    for tag, points in log.scalars.items():
        for step, value in points:
            into.scalar(tag, value, step)
    for tag, hist in log.histograms.items():
        for step, values in hist:
            into.histogram(tag, values, step)
    for tag, texts in log.texts.items():
        for step, text in texts:
            into.text(tag, text, step)
    for hp, metrics in log.hparam_entries:
        into.hparams(hp, metrics)


class _PairJob:
    """One (method, seed) of a comparison as a job: a search study, or a single run."""

    def __init__(self, name: str, seed: int, logger: _TagRecorder | None) -> None:
        self.name = name
        self.seed = seed
        self.logger = logger
        self.result: Result | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    def units(self, free: int) -> list[Unit]:
        return []

    def finish(self, completion: Completion) -> None:
        pass


class _RunJob(_PairJob):
    """A single-run method: one unit that runs it (:func:`run_method`)."""

    def __init__(self, name: str, seed: int, logger: _TagRecorder | None, unit: Unit) -> None:
        super().__init__(name, seed, logger)
        self.unit: Unit | None = unit

    def units(self, free: int) -> list[Unit]:
        unit, self.unit = self.unit, None
        return [unit] if unit is not None else []

    def finish(self, completion: Completion) -> None:
        if completion.status == "ok":
            res, log = completion.value
            if self.logger is not None:
                _replay(log, self.logger)
        else:
            res = _failed(self.name, "", self.seed, str(completion.reason), completion.traceback)
        res.extra["attempts"] = completion.attempts
        self.result = res


class _StudyJob(_PairJob):
    """A search method: its :class:`~selfref.methods.study.Study`, errors made a failed Result."""

    def __init__(
        self,
        name: str,
        seed: int,
        logger: _TagRecorder | None,
        method: TrialSearch,
        study: Study,
        workers: int,
    ) -> None:
        super().__init__(name, seed, logger)
        self.method = method
        self.study = study
        self.workers = workers

    def _guard(self, step: Callable[[], Any]) -> Any:
        try:
            out = step()
        except Exception as e:  # the study fails; the others go on
            self.result = _failed(self.name, "", self.seed, e)
            return []
        if self.result is None and self.study.done:
            self.result = self.method.result(self.study, self.workers)
        return out

    def units(self, free: int) -> list[Unit]:
        if self.result is not None:
            return []
        return self._guard(lambda: self.study.units(free))

    def finish(self, completion: Completion) -> None:
        if self.result is None:  # a failed study ignores its units still in flight
            self._guard(lambda: self.study.finish(completion))


def run_comparison(
    config: CompareConfig,
    task: Any,
    *,
    make_logger: Callable[[str], Logger] | None = None,
    run_dir: RunDir | None = None,
    previous: Sequence[Result] = (),
    on_result: Callable[[Result, list[Result]], None] | None = None,
    executor: Executor | None = None,
    threads: int | None = None,
) -> list[Result]:
    """Run every (method, seed) pair of ``config`` on ``task``; return all Results in order.

    Every pair is a job on one executor (:func:`selfref.execution.drive`): a search method
    is a study whose trials (for hyperband and asha: rungs) are units of work; any other
    method is one unit that runs it (:func:`run_method`). All pairs run at once as far as the
    executor's slots allow, earlier pairs first. A pair already in ``previous`` with status
    ok or diverged is kept, not re-run (resume); an interrupted study resumes from
    ``run_dir``'s trials.jsonl, or with ``config.storage`` from the database. A method that
    raises is recorded as a failed Result with the exception as its reason, and the
    comparison goes on. As each pair ends, its logger (``make_logger("<method>-s<seed>")``)
    gets the curve under ``best/val_loss_vs_grad_evals`` (if the method did not log it) and
    one hparams entry, and ``on_result(result, results so far)`` is called. Methods that take
    ``trial_logger`` get ``make_logger`` for one HParams row per trial; those that take
    ``storage`` get ``config.storage``.

    Args:
        config: the comparison.
        task: the built task.
        make_logger: a logger per run name; None logs nothing.
        run_dir: passed to methods that take ``run_dir`` (their trials.jsonl, for resume).
        previous: Results of an interrupted comparison.
        on_result: called after each pair with it and the finished ones, in config order.
        executor: where units run; None starts one from ``config`` (``workers``,
            ``cluster``, ``trial_timeout``) and closes it at the end.
        threads: torch threads of each single-run unit (None: the worker's setting).

    Raises:
        ValueError: an unknown or unavailable method.
    """
    from selfref.search_space import SearchSpace

    check_methods(config.methods)
    space = SearchSpace.from_dict(config.space) if config.space is not None else None
    done = {(r.method, r.seed): r for r in previous if r.status != "failed"}
    own = executor is None
    if executor is None:
        executor = comparison_executor(config, task)
    pairs = [(m, s) for m in config.methods for s in config.seeds]
    finished: dict[tuple[str, int], Result] = {}

    def so_far() -> list[Result]:
        return [finished[p] for p in pairs if p in finished]

    def close_pair(job: Any) -> None:
        res = job.result
        assert res is not None
        res.task = task.name
        finished[(job.name, job.seed)] = res
        if job.logger is not None:
            _log_pair(job.logger, res)
        if on_result is not None:
            on_result(res, so_far())

    try:
        task_ref = executor.share(task)
        prefix = _key_prefix(run_dir)
        offered = {
            "space": space,
            "workers": config.workers,
            "executor": executor,
            "run_dir": run_dir,
            "checkpoint": config.checkpoint,
            "trial_logger": make_logger,  # one TensorBoard run per trial (hyperband, asha)
            "storage": config.storage,  # every trial of the trial-based methods, if given
        }
        jobs: list[_PairJob] = []
        for name, seed in pairs:
            if (name, seed) in done:
                finished[(name, seed)] = done[(name, seed)]
                continue
            opts = method_options(name, offered, config.method_options.get(name, {}))
            logger = _TagRecorder(make_logger(f"{name}-s{seed}")) if make_logger else None
            job = _PairJob(name, seed, logger)
            try:
                method = methods_registry.make(name, **opts)
                if isinstance(method, TrialSearch):
                    study = method.study(task, config.budget, logger, seed, task_ref, prefix)
                    job = _StudyJob(name, seed, logger, method, study, executor.workers)
                else:
                    key = unit_key(prefix, f"{name}-s{seed}", 0, {"options": opts})
                    unit = (key, run_method, (method, task_ref, config.budget, seed, threads))
                    job = _RunJob(name, seed, logger, unit)
            except Exception as e:  # recorded as a failed run; the comparison goes on
                job.result = _failed(name, task.name, seed, e)
            jobs.append(job)
        drive(executor, jobs, on_done=close_pair, poll_s=executor_poll_s(executor))
    finally:
        if own:
            executor.close()
    return so_far()


def comparison_executor(config: CompareConfig, task: Any) -> Executor:
    """The executor ``config`` asks for; a local one falls back to this process (with a
    warning) when the task cannot be pickled."""
    from selfref.methods.search import study_executor
    from selfref.methods.trial import warmup

    gpu = str(getattr(task, "device", "cpu")).startswith("cuda")
    if config.cluster is not None:
        return make_executor(
            cluster=config.cluster,
            setup=warmup,
            timeout=config.trial_timeout,
            gpu=gpu,
            prefetch=config.prefetch,
        )
    if config.trial_timeout is None:
        return study_executor(task, config.workers)
    return make_executor(config.workers, setup=warmup, timeout=config.trial_timeout)


def executor_poll_s(executor: Executor) -> float | None:
    """How often the driver looks again at a cluster's capacity (None: only on completions)."""
    return 1.0 if executor.name == "dask" else None


def _key_prefix(run_dir: RunDir | None) -> str:
    """Unit keys of one comparison: the same across resumes of its run directory."""
    import hashlib
    import uuid

    where = str(run_dir.path.resolve()) if run_dir is not None else uuid.uuid4().hex
    return f"selfref-{hashlib.sha1(where.encode()).hexdigest()[:10]}/"


def _log_pair(logger: _TagRecorder, res: Result) -> None:
    """The harness's part of a pair's TensorBoard run: curve (if missing), one hparams entry."""
    if CURVE_TAG not in logger.tags:
        for p in res.curve:
            logger.scalar(CURVE_TAG, p.best_val_loss, p.grad_evals)
    hp, metrics = {}, {}
    for own_hp, own_metrics in logger.held:  # the method's own entries, merged in
        hp.update(own_hp)
        metrics.update(own_metrics)
    base_hp, base_metrics = _hparam_entry(res)
    hp.update(base_hp)
    metrics.update(base_metrics)
    logger.inner.hparams(hp, metrics)
    logger.close()


# -- summaries ---------------------------------------------------------------------------

_COLUMNS: tuple[tuple[str, str], ...] = (
    ("val_loss", "final val loss"),
    ("test_loss", "test loss"),
    ("test_accuracy", "test accuracy"),
    ("grad_evals", "grad evals"),
    ("meta_train_grad_evals", "meta-train grad evals"),
    ("wall_s", "wall s"),
)


def results_table(results: Sequence[Result]) -> list[dict[str, Any]]:
    """One row per method (in first-seen order): runs, ok runs, and (mean, std, n) per column
    over the runs that finished ok (std is the sample std, 0 for a single run)."""
    order: list[str] = []
    for r in results:
        if r.method not in order:
            order.append(r.method)
    rows = []
    for m in order:
        runs = [r for r in results if r.method == m]
        ok = [r for r in runs if r.status == "ok"]
        row: dict[str, Any] = {"method": m, "runs": len(runs), "ok": len(ok)}
        for key, _ in _COLUMNS:
            vals = [getattr(r, key) for r in ok]
            xs = np.array(
                [float(v) for v in vals if v is not None and math.isfinite(float(v))],
                dtype=np.float64,
            )
            if xs.size == 0:
                row[key] = (math.nan, math.nan, 0)
            else:
                std = float(xs.std(ddof=1)) if xs.size > 1 else 0.0
                row[key] = (float(xs.mean()), std, int(xs.size))
        row["reasons"] = sorted({str(r.reason) for r in runs if r.status != "ok"})
        rows.append(row)
    return rows


def _fmt(stat: tuple[float, float, int], key: str) -> str:
    mean, std, n = stat
    if n == 0:
        return "—"
    if key in ("grad_evals", "meta_train_grad_evals"):
        return f"{mean:,.0f} ± {std:,.0f}"
    if key == "wall_s":
        return f"{mean:.1f} ± {std:.1f}"
    return f"{mean:.4f} ± {std:.4f}"


def results_markdown(
    results: Sequence[Result], title: str | None = None, notes: Sequence[str] = ()
) -> str:
    """A Markdown table of mean ± std over seeds per method (runs that finished ok)."""
    rows = results_table(results)
    lines = []
    if title:
        lines += [f"# {title}", ""]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    head = ["method", "ok/runs", *[label for _, label in _COLUMNS]]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * len(head)) + "|")
    for row in rows:
        cells = [row["method"], f"{row['ok']}/{row['runs']}"]
        cells += [_fmt(row[key], key) for key, _ in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [(row["method"], row["reasons"]) for row in rows if row["reasons"]]
    if failed:
        lines += ["", "Runs that did not finish ok:"]
        for m, reasons in failed:
            for reason in reasons:
                lines.append(f"- {m}: {reason}")
    lines.append("")
    lines.append(
        "Mean ± sample std over seeds of the runs that finished ok; gradient evaluations are "
        "the budget's unit (meta-training is reported beside it, never inside it)."
    )
    return "\n".join(lines) + "\n"


def _step_values(curve: Sequence[Any], xs: np.ndarray) -> np.ndarray:
    """Best-so-far value at each x (the last curve point at or before x; NaN before the first)."""
    gx = np.array([p.grad_evals for p in curve], dtype=np.float64)  # (k,)
    gy = np.array([p.best_val_loss for p in curve], dtype=np.float64)  # (k,)
    idx = np.searchsorted(gx, xs, side="right") - 1  # (x,)
    out = np.full(xs.shape, np.nan)
    ok = idx >= 0
    out[ok] = gy[idx[ok]]
    return out


def plot_curves(results: Sequence[Result], path: str | Path, title: str = "") -> Path:
    """Best val loss against gradient evaluations: a mean line and a min–max band per method.

    Each seed's best-so-far curve is a step function; at every x the mean is taken over the
    seeds that have a value there. Log y axis. Returns the PNG's path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    order: list[str] = []
    for r in results:
        if r.method not in order:
            order.append(r.method)
    any_line = False
    for m in order:
        curves = [r.curve for r in results if r.method == m and r.curve]
        if not curves:
            continue
        xs = np.unique(np.concatenate([[p.grad_evals for p in c] for c in curves]).astype(float))
        ys = np.stack([_step_values(c, xs) for c in curves])  # (seeds, x)
        have = np.isfinite(ys)
        cols = have.any(0)  # (x,)
        xs, ys, have = xs[cols], ys[:, cols], have[:, cols]
        filled = np.where(have, ys, 0.0)
        mean = filled.sum(0) / have.sum(0)  # (x,)
        lo = np.where(have, ys, np.inf).min(0)
        hi = np.where(have, ys, -np.inf).max(0)
        (line,) = ax.step(xs, mean, where="post", label=f"{m} (n={len(curves)})")
        ax.fill_between(xs, lo, hi, step="post", alpha=0.2, color=line.get_color())
        any_line = True
    ax.set_xlabel("gradient evaluations")
    ax.set_ylabel("best validation loss so far")
    if any_line:
        ax.set_yscale("log")
        ax.legend()
    ax.set_title(title or "best validation loss vs gradient evaluations (mean, min–max band)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def custom_scalars_layout() -> dict[str, dict[str, list[Any]]]:
    """Every run's best-so-far curve on one chart, and every trial's val loss on another."""
    return {
        "selfref compare": {
            "best validation loss vs gradient evaluations (all methods, all seeds)": [
                "Multiline",
                [r"^best/val_loss_vs_grad_evals$"],
            ],
            "validation loss of each trial vs gradient evaluations": [
                "Multiline",
                [r"^trial/val_loss$"],
            ],
        }
    }
