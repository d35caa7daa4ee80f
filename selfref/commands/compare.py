"""``selfref compare``: the project's main job — methods side by side on one budget.

With no arguments: task digits-mlp, every installed method, the ``quick`` budget (2,000
gradient evaluations per method and seed, trials of 100 steps, seeds 0, 1, 2), one worker
process per CPU core. Writes one run directory ``<logdir>/compare/<stamp>-compare/``::

    config.json  argv.txt
    results.json        Result.to_dict() of every (method, seed), rewritten after each
    results.md          mean ± std over seeds per method
    curves.png          best val loss vs gradient evaluations, mean and min–max band
    trials.jsonl        every finished trial of the search methods (fsync'd; for --resume)
    tb/<method>-s<seed>/   TensorBoard: curves, per-trial scalars, one HParams entry
    tb/                    the custom-scalars layout (all curves on one chart)

and prints the table and the ``tensorboard --logdir`` line. ``--resume RUN_DIR`` continues an
interrupted comparison with its stored configuration: finished (method, seed) runs are kept
and finished trials of an interrupted search are not repeated.

Every trial and every (method, seed) run of a single-run method is a unit of work on one
executor: ``--workers`` local processes, or a Dask cluster with ``--cluster ADDRESS|local:N``
(extra ``selfref[cluster]``); ``--trial-timeout SECONDS`` stops a unit that runs longer.

``--storage URL`` (``sqlite:///FILE`` or ``postgresql://USER@HOST:PORT/DB``) also writes every
trial of the trial-based methods into Optuna's RDB storage, one study per (method, seed)
named ``<run name>/<method>-s<seed>``, and the comparison's configuration and Results into
``<run name>/_comparison`` (:mod:`selfref.execution.optuna_storage`); open it with
``optuna-dashboard URL``. With a storage, ``--resume`` reads trials from the database, and
``--resume NAME --storage URL`` works from the database alone (the run directory is
recreated as ``<logdir>/compare/NAME``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from selfref.commands.common import (
    UsageError,
    add_device_arg,
    add_logdir_arg,
    nonneg_int,
    parse_task_options,
    positive_int,
    read_run_config,
)

__all__ = ["add_parser", "run", "check_config"]


def positive_float(s: str) -> float:
    """argparse type: a number > 0."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{s!r} must be a positive number of seconds")
    return v


def _check_storage(args: argparse.Namespace) -> None:
    """--storage: a URL of a known kind whose driver is installed (before any work)."""
    if args.storage is None:
        return
    from selfref.execution.optuna_storage import check_available, check_storage_url

    try:
        check_storage_url(args.storage)
        check_available(args.storage)
    except (ImportError, ValueError) as e:
        raise UsageError(str(e)) from None


def _check_cluster(args: argparse.Namespace) -> None:
    """--cluster: installed, well-formed, and not given with --workers (before any work)."""
    if args.cluster is None:
        return
    from selfref.execution.cluster import check_available, parse_cluster

    if args.workers is not None:
        raise UsageError(
            "--workers counts local processes; with --cluster give the workers in it "
            "(local:N) or start them on the cluster"
        )
    try:
        check_available()
        parse_cluster(args.cluster)
    except (ImportError, ValueError) as e:
        raise UsageError(str(e)) from None


# Options that --resume takes from the stored config.json; giving them as well is an error.
_STORED = ("task", "methods", "seeds", "budget", "steps_per_trial", "space", "task_option",
           "method_option", "checkpoint")  # fmt: skip


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare",
        help="compare meta-optimizers on one task and budget (the main job)",
        description=(
            "Run several methods on one task with the same budget of gradient evaluations "
            "and several seeds; write TensorBoard runs, results.json, results.md and a plot."
        ),
    )
    p.add_argument("--task", default=None, help="task name (default: digits-mlp)")
    p.add_argument(
        "--task-option",
        action="append",
        metavar="KEY=VALUE",
        help="task option, e.g. hidden=40 (repeatable; quadratic defaults to functions=fixed)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated method names (default: every installed one; `selfref methods`)",
    )
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: from --budget)")
    p.add_argument(
        "--budget",
        default=None,
        help="quick (default: 2000 grad evals per method and seed, seeds 0-2), full (10000, "
        "trials of 200 steps, seeds 0-4) or a number of gradient evaluations",
    )
    p.add_argument(
        "--steps-per-trial",
        type=positive_int,
        default=None,
        help="inner training steps of one trial (default: 100 quick, 200 full)",
    )
    p.add_argument(
        "--workers",
        type=nonneg_int,
        default=None,
        help="local worker processes for every trial and (method, seed) run (default: number "
        "of cores; 0 = in this process)",
    )
    p.add_argument(
        "--cluster",
        default=None,
        metavar="ADDRESS|local:N",
        help="run every trial and every (method, seed) run on a Dask cluster: a scheduler "
        "address (tcp://127.0.0.1:8786) or local:N for a local cluster of N workers (extra "
        "selfref[cluster])",
    )
    p.add_argument(
        "--prefetch",
        type=nonneg_int,
        default=None,
        metavar="N",
        help="with --cluster: N units queued on the workers beyond the cluster's slots, so "
        "short trials never wait for the driver (default 0)",
    )
    p.add_argument(
        "--trial-timeout",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="stop a trial (or single run) that runs longer and record it as failed "
        "(needs worker processes or --cluster)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads of each single-run method's run (rmad, hypernet, selfref) and of "
        "this process (default: 1; the models are small, so one thread per process is "
        "fastest and leaves cores to the other workers)",
    )
    p.add_argument("--space", default=None, metavar="FILE.toml", help="search space (TOML)")
    p.add_argument(
        "--method-option",
        action="append",
        metavar="METHOD.KEY=VALUE",
        help="constructor option of one method, e.g. grid.points=4 (repeatable)",
    )
    p.add_argument(
        "--checkpoint", default=None, help="meta-weights for methods that load them (selfref)"
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue this comparison (with --storage: also a comparison's name in the "
        "database, whose run directory is gone)",
    )
    p.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="also keep every trial in Optuna's RDB storage (sqlite:///FILE, "
        "postgresql://USER@HOST:PORT/DB; extras selfref[optuna], selfref[postgres]) for "
        "optuna-dashboard",
    )
    add_logdir_arg(p)
    add_device_arg(p)
    p.set_defaults(func=run, device=None)
    return p


def _parse_seeds(s: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--seeds {s!r} must be comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise UsageError("--seeds is empty; give at least one seed, e.g. 0,1,2")
    return seeds


def _parse_method_options(items: list[str] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        head, _, value = item.partition("=")
        method, dot, key = head.partition(".")
        if not (dot and key and _):
            raise UsageError(f"method option {item!r} must look like METHOD.KEY=VALUE")
        out.setdefault(method, {}).update(parse_task_options([f"{key}={value}"]))
    return out


def check_config(config: Any) -> None:
    """Everything a comparison will use, checked before any work (a fresh or a resumed one).

    The methods are registered and installed; each method's options are ones it accepts,
    of the right types and values (:func:`selfref.methods.check_options`); the search space
    is valid; a checkpoint is read by some compared method and loads safely. The task and its
    options are checked when the caller builds the task, also before any work.

    Raises:
        ValueError: one line naming the bad value and what would be valid.
    """
    from selfref import methods
    from selfref.compare import check_methods
    from selfref.search_space import SearchSpace

    check_methods(config.methods)
    stray = sorted(set(config.method_options) - set(config.methods))
    if stray:
        raise UsageError(
            f"--method-option names methods not compared: {', '.join(stray)} "
            f"(compared: {', '.join(config.methods)})"
        )
    for name in config.methods:
        methods.check_options(name, config.method_options.get(name, {}))
    if config.space is not None:
        SearchSpace.from_dict(config.space)
    if config.checkpoint is not None:
        takers = [m for m in config.methods if "checkpoint" in (methods.user_options(m) or {})]
        if not takers:
            readers = [
                m for m in methods.names() if "checkpoint" in (methods.user_options(m) or {})
            ]
            raise UsageError(
                f"--checkpoint is read only by methods that load meta-weights "
                f"({', '.join(readers) or 'none installed'}); none of them is compared"
            )
        from selfref.meta.trainer import load_checkpoint

        load_checkpoint(config.checkpoint)  # read it now (safely): a bad file fails here


def _build_config(args: argparse.Namespace) -> Any:
    from selfref import methods, tasks
    from selfref.compare import CompareConfig, resolve_budget
    from selfref.execution import default_workers
    from selfref.search_space import load_space

    budget = args.budget if args.budget is not None else "quick"
    grad_evals, steps, preset_seeds = resolve_budget(budget, args.steps_per_trial)
    seeds = _parse_seeds(args.seeds) if args.seeds is not None else preset_seeds
    if args.methods is not None:
        names = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        if not names:
            raise UsageError("--methods is empty; see `selfref methods` for the names")
    else:
        names = tuple(methods.names())
        if not names:
            raise UsageError("no method is installed; see `selfref methods`")
    user_opts = _parse_method_options(args.method_option)
    _check_cluster(args)
    _check_storage(args)
    space = None
    if args.space is not None:
        try:
            space = load_space(args.space).to_dict()
        except UnicodeDecodeError:
            raise UsageError(f"--space {args.space!r} is not a text (TOML) file") from None
    task = args.task or "digits-mlp"
    # the task's own defaults for a search on it (quadratics: one fixed function), then the user's
    task_options = {**tasks.task_class(task).search_defaults}
    task_options.update(parse_task_options(args.task_option))
    config = CompareConfig(
        task=task,
        task_options=task_options,
        methods=names,
        seeds=seeds,
        grad_evals=grad_evals,
        steps_per_trial=steps,
        workers=default_workers() if args.workers is None else args.workers,
        device=args.device or "auto",
        space=space,
        method_options=user_opts,
        checkpoint=args.checkpoint,
        budget_name=budget if budget in ("quick", "full") else "custom",
        cluster=args.cluster,
        trial_timeout=args.trial_timeout,
        prefetch=args.prefetch or 0,
        storage=args.storage,
    )
    check_config(config)
    return config


def _resume_config(args: argparse.Namespace) -> tuple[Any, Any, list[Any]]:
    """The stored comparison of ``--resume``, checked as a fresh one is: (config, run
    directory path, the Results already finished)."""

    from selfref.compare import CompareConfig
    from selfref.methods.base import Result

    given = [f"--{k.replace('_', '-')}" for k in _STORED if getattr(args, k) is not None]
    if given:
        raise UsageError(
            f"--resume continues a comparison with its stored configuration; drop "
            f"{', '.join(given)} (only --workers, --cluster, --prefetch, --trial-timeout, "
            "--storage and --device may be given with it)"
        )
    _check_storage(args)
    if args.storage is not None and not (Path(args.resume) / "config.json").is_file():
        return _resume_from_storage(args)
    path, stored = read_run_config(args.resume, "compare", "compare")
    try:
        config = CompareConfig.from_dict(stored["compare"])
    except (TypeError, ValueError) as e:
        raise UsageError(
            f"--resume {args.resume!r}: the stored comparison is invalid: {e}"
        ) from None
    config = _resume_overrides(args, config)
    previous: list[Any] = []
    if (path / "results.json").is_file():
        try:
            previous = [
                Result.from_dict(d) for d in json.loads((path / "results.json").read_text())
            ]
        except (OSError, TypeError, KeyError, AttributeError, ValueError) as e:
            raise UsageError(
                f"--resume {args.resume!r}: results.json is not a list of results ({e})"
            ) from None
    return config, path, previous


def _resume_overrides(args: argparse.Namespace, config: Any) -> Any:
    """The stored ``config`` with the flags a resume may change (--workers, --cluster,
    --prefetch, --trial-timeout, --storage, --device), checked as a fresh comparison is."""
    from dataclasses import replace

    _check_cluster(args)
    try:
        if args.workers is not None:
            config = replace(config, workers=args.workers, cluster=None, prefetch=0)
        if args.cluster is not None:
            config = replace(config, cluster=args.cluster)
        if args.prefetch is not None:
            config = replace(config, prefetch=args.prefetch)
        if args.trial_timeout is not None:
            config = replace(config, trial_timeout=args.trial_timeout)
        if args.storage is not None:
            config = replace(config, storage=args.storage)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.device is not None:
        config = replace(config, device=args.device)
    check_config(config)
    return config


def _resume_from_storage(args: argparse.Namespace) -> tuple[Any, Any, list[Any]]:
    """``--resume NAME --storage URL`` with no run directory: the comparison's configuration
    and finished Results from the database (its trials are read there by each study); the
    run directory is made again as ``<logdir>/compare/NAME``."""
    from selfref.compare import CompareConfig
    from selfref.execution.optuna_storage import load_comparison
    from selfref.methods.base import Result
    from selfref.runs import check_logdir

    name = Path(args.resume).name
    try:
        stored, done = load_comparison(args.storage, name)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        config = CompareConfig.from_dict(stored)
        previous = [Result.from_dict(d) for d in done]
    except (TypeError, KeyError, ValueError) as e:
        raise UsageError(
            f"--resume {name!r}: the comparison stored in {args.storage!r} is invalid: {e}"
        ) from None
    config = _resume_overrides(args, config)
    try:
        path = check_logdir(args.logdir) / "compare" / name
    except ValueError as e:
        raise UsageError(str(e)) from None
    path.mkdir(parents=True, exist_ok=True)
    return config, path, previous


def run(args: argparse.Namespace) -> int:
    from selfref import tasks
    from selfref.compare import (
        custom_scalars_layout,
        plot_curves,
        results_markdown,
        run_comparison,
    )
    from selfref.logging import TensorBoardLogger
    from selfref.methods.base import Result
    from selfref.runs import RunDir, atomic_write_text, check_logdir

    previous: list[Result] = []
    if args.resume is not None:
        config, path, previous = _resume_config(args)
        task = tasks.make(config.task, device=config.device, **config.task_options)
        run_dir = RunDir.open(path)
        with open(run_dir.path / "argv.txt", "a") as f:
            f.write(" ".join(getattr(args, "argv", sys.argv)) + "\n")
    else:
        check_logdir(args.logdir)
        config = _build_config(args)
        task = tasks.make(config.task, device=config.device, **config.task_options)
        run_dir = RunDir.create(args.logdir, "compare", "compare")
    run_dir.write_config({"compare": config.to_dict(), "resumed": args.resume is not None})
    if config.storage is not None:
        from selfref.execution.optuna_storage import save_comparison

        save_comparison(config.storage, run_dir.path.name, config.to_dict())
    tb_root = run_dir.subdir("tb")
    layout = TensorBoardLogger(tb_root)
    layout.custom_scalars(custom_scalars_layout())
    layout.close()

    budget_note = (
        f"budget: {config.grad_evals:,} gradient evaluations per (method, seed) "
        f"({config.budget_name}), trials of {config.steps_per_trial} steps, "
        f"seeds {', '.join(map(str, config.seeds))}; "
        + (f"Dask cluster {config.cluster}" if config.cluster else f"{config.workers} workers")
        + (f", trial timeout {config.trial_timeout:g} s" if config.trial_timeout else "")
    )
    print(f"selfref compare: task {config.task}, methods {', '.join(config.methods)}")
    print(budget_note)
    print(f"run directory: {run_dir.path}", flush=True)

    def on_result(res: Result, so_far: list[Result]) -> None:
        run_dir.write_results([r.to_dict() for r in so_far])
        if config.storage is not None:
            from selfref.execution.optuna_storage import save_comparison

            save_comparison(
                config.storage, run_dir.path.name, config.to_dict(), [r.to_dict() for r in so_far]
            )
        if res.status == "ok":
            acc = f", test acc {res.test_accuracy:.4f}" if res.test_accuracy is not None else ""
            print(
                f"  {res.method:>10} s{res.seed}: val loss {res.val_loss:.4f}, test loss "
                f"{res.test_loss:.4f}{acc} ({res.grad_evals:,} grad evals, {res.wall_s:.1f} s)",
                flush=True,
            )
        else:
            print(
                f"  {res.method:>10} s{res.seed}: {res.status.upper()}: {res.reason}",
                file=sys.stderr,
                flush=True,
            )

    import torch

    torch.set_num_threads(args.threads)
    results = run_comparison(
        config,
        task,
        make_logger=lambda name: TensorBoardLogger(tb_root / name),
        run_dir=run_dir,
        previous=previous,
        on_result=on_result,
        threads=args.threads,
    )
    run_dir.write_results([r.to_dict() for r in results])
    options = json.dumps(dict(config.task_options)) if config.task_options else ""
    notes = [
        f"task: {config.task} {options}".rstrip(),
        budget_note,
        f"run directory: {run_dir.path}",
    ]
    table = results_markdown(results, title="selfref compare", notes=notes)
    atomic_write_text(run_dir.path / "results.md", table)
    plot_curves(results, run_dir.path / "curves.png", title=f"{config.task}: best val loss")
    print()
    print(table)
    print(f"plot: {Path(run_dir.path) / 'curves.png'}")
    print(f"tensorboard --logdir {run_dir.path}")
    return 0
