"""``selfref meta-train``: every meta-training, through the one loop (:mod:`selfref.meta.trainer`).

A run is described by a *spec*: the task and its options, the core (learned optimizers) or
learner (``fewshot-digits``) and its options, the analyzer's and evaluation model's options,
and ``meta`` — a :class:`~selfref.meta.MetaTrainConfig`. The spec is built from, in order:
the defaults, ``--preset NAME`` (a TOML file shipped in ``selfref/presets/``), ``--config
FILE.toml`` (the same format), then the flags given on the command line. A spec file::

    task = "quadratic"          # any name of `selfref tasks`
    core = "lstm"               # learned optimizers: a core; fewshot-digits: srwm|lstm|hypernet
    [task_options]              # the task's constructor options
    [core_options]              # the core's (or, for fewshot-digits, the learner's) options
    [analyzer]                  # AnalyzerConfig fields
    [evaluation]                # EvaluationConfig fields
    [meta]                      # MetaTrainConfig fields, e.g. meta_steps = 1500
    estimator = "tbptt"
    [meta.estimator_options]
    [problem]                   # optional: kind = "task_distribution" (the `lopt` preset)

A spec with a ``[problem]`` table of kind ``task_distribution`` meta-trains one learned
optimizer on a distribution of tasks (:class:`~selfref.meta.problems.TaskDistributionProblem`:
every estimate draws its own task, the meta-objective is the held-out loss); it takes no
``--task`` or ``-o``, and its run directory also gets ``checkpoints/optimizer.pt``, the slim
checkpoint ``LearnedOptimizer(params, checkpoint=...)`` loads.

A spec may start from a preset (``extends = "lopt"``: the preset's spec with the file's tables
merged over it). One with an ``[ensemble]`` table (``seeds``, ``parallel``) runs one
meta-training per seed, each in its own process, and composes their optimizers into one
``ensemble`` checkpoint (:mod:`selfref.commands.meta_train_ensemble`; the ``lopt-ensemble``
preset made the shipped ``pretrained/lopt.pt``).

On ``fewshot-digits`` a sequence learner is trained by backpropagation through whole
sequences (``SequenceProblem``; defaults: ``full_bptt``, one sequence batch per step, val
evaluation every 500 steps); ``-o`` options that are not the task's go to the learner
(``dim=64``, ``heads=2``, ``token_shift=true``, ...).

Writes ``<logdir>/meta-train/<stamp>-<task>-<core>-s<seed>/`` with TensorBoard events,
``config.json`` (the spec), ``argv.txt``, ``checkpoints/last.pt`` (the training state) every
``checkpoint_every`` meta-steps, ``checkpoints/best.pt`` (the state at the best held-out
score) and ``results.json``. ``--resume RUN_DIR`` continues a run bit for bit with its spec.

Data parallel (:mod:`selfref.meta.distributed`): under ``torchrun --nproc-per-node N -m
selfref meta-train ...`` (the ranks are found from torchrun's ``RANK``/``WORLD_SIZE``), or with
``--nproc N``, which starts that torchrun on this machine itself, each rank runs its shard of
the meta-batch and rank 0 alone writes the run directory. Resume with the same number of
ranks. ``--shards K`` splits the meta-batch into K streams, so any world size dividing K
gives the same φ.

Example:
    selfref meta-train --task quadratic --core lstm --meta-steps 500 --logdir logs
    selfref meta-train --preset l2l-quadratic-recipe
    selfref meta-train --preset lopt-ensemble   # the shipped learned optimizer (pretrained/lopt.pt)
    selfref meta-train --preset lopt            # one restart of it (pretrained/lopt_v2.pt)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

from selfref.commands.common import (
    UsageError,
    add_device_arg,
    add_logdir_arg,
    nonneg_int,
    parse_task_options,
    positive_float,
    positive_int,
)

__all__ = ["add_parser", "run", "build_spec", "preset_names", "load_spec_file", "SPEC_KEYS"]

SPEC_KEYS = (
    "task",
    "core",
    "task_options",
    "core_options",
    "analyzer",
    "evaluation",
    "meta",
    "problem",
    "ensemble",
    "extends",
)
# The task name a spec with a [problem] table of kind "task_distribution" runs under.
DISTRIBUTION_TASK = "distribution"

# Options of fewshot-digits itself; every other -o option goes to its learner.
_FEWSHOT_TASK_KEYS = (
    "ways",
    "length",
    "proj_dim",
    "batch_size",
    "eval_sequences",
    "split_seed",
    "min_ways",
    "min_ways_steps",
    "projection",
    "protocol",
    "shots",
)

# (flag dest, MetaTrainConfig field) for the flags that map onto the config one to one.
_META_FLAGS = (
    "meta_steps",
    "estimator",
    "unroll",
    "inner_steps",
    "meta_batch",
    "shards",
    "meta_lr",
    "lr_schedule",
    "warmup_steps",
    "min_lr_ratio",
    "meta_loss",
    "objective",
    "clip_grad_norm",
    "eval_every",
    "eval_tasks",
    "eval_steps",
    "checkpoint_every",
    "max_seconds",
    "ema_decay",
    "seed",
    "init_from",
    "init_member",
)

# Baselines drawn beside a learned optimizer's held-out curve (fixed, untuned settings).
_CURVE_BASELINES = {
    "quadratic": {"sgd": ("sgd", {"lr": 0.01}), "adam": ("adam", {"lr": 0.1})},
    "default": {"sgd": ("sgd", {"lr": 0.1}), "adam": ("adam", {"lr": 0.01})},
}


def preset_names() -> list[str]:
    """Names of the presets shipped in ``selfref/presets/``."""
    root = resources.files("selfref") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def _read_toml(text: str, where: str, depth: int = 0) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{where} is not valid TOML: {e}") from None
    return _check_spec(data, where, depth)


def _check_spec(data: Any, where: str, depth: int = 0) -> dict[str, Any]:
    """A spec file's contents, checked, with ``extends = "PRESET"`` resolved (the preset's
    spec with this file's tables merged over it)."""
    if not isinstance(data, dict):
        raise UsageError(f"{where} must hold a table of spec keys")
    bad = sorted(set(data) - set(SPEC_KEYS))
    if bad:
        raise UsageError(f"{where}: unknown key(s) {', '.join(bad)}; valid: {', '.join(SPEC_KEYS)}")
    for k in ("task_options", "core_options", "analyzer", "evaluation", "meta", "problem",
              "ensemble"):  # fmt: skip
        if k in data and not isinstance(data[k], dict):
            raise UsageError(f"{where}: [{k}] must be a table")
    if "extends" in data:
        data = dict(data)
        base = data.pop("extends")
        if not isinstance(base, str) or depth >= 4:
            raise UsageError(f"{where}: extends must name a preset (at most 4 deep)")
        data = _merge(_load_preset(base, depth + 1), data)
    return data


def load_spec_file(path: str | Path) -> dict[str, Any]:
    """A spec from a TOML file (``--config``), or from JSON (a ``.json`` file: the form an
    ensemble writes for its members)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {str(p)!r} does not exist or is not a file")
    if p.suffix == ".json":
        try:
            return _check_spec(json.loads(p.read_text()), f"--config {str(p)!r}")
        except json.JSONDecodeError as e:
            raise UsageError(f"--config {str(p)!r} is not valid JSON: {e}") from None
    return _read_toml(p.read_text(), f"--config {str(p)!r}")


def _load_preset(name: str, depth: int = 0) -> dict[str, Any]:
    names = preset_names()
    if name not in names:
        raise UsageError(f"unknown preset {name!r}; valid: {', '.join(names)}")
    text = (resources.files("selfref") / "presets" / f"{name}.toml").read_text()
    return _read_toml(text, f"preset {name!r}", depth)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and k != "curriculum" else v
    return out


def add_parser(subparsers: Any) -> None:
    from selfref.meta.estimators import estimator_names
    from selfref.net.cores import core_names
    from selfref.tasks import names as task_names

    p = subparsers.add_parser(
        "meta-train",
        help="meta-train a modifier core or a sequence learner (the one meta-training loop)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    src = p.add_argument_group("where the spec comes from (later ones override earlier ones)")
    src.add_argument("--preset", default=None, help="a shipped spec (see --list-presets)")
    src.add_argument("--config", default=None, metavar="FILE.toml", help="a spec file")
    src.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--task", default=None, choices=task_names(), help="task (family)")
    p.add_argument(
        "--task-option",
        "-o",
        action="append",
        metavar="KEY=VALUE",
        help="task option, repeatable (fewshot-digits: non-task keys go to the learner)",
    )
    p.add_argument("--core", default=None, choices=core_names(), help="modifier core / learner")
    p.add_argument(
        "--core-option", action="append", metavar="KEY=VALUE", help="core option, repeatable"
    )
    p.add_argument("--estimator", default=None, choices=estimator_names())
    p.add_argument(
        "--estimator-option",
        "-e",
        action="append",
        metavar="KEY=VALUE",
        help="estimator option, repeatable (e.g. sigma=0.01)",
    )
    p.add_argument("--meta-steps", type=positive_int, default=None, help="meta-gradient updates")
    p.add_argument("--unroll", type=positive_int, default=None, help="steps per truncation")
    p.add_argument("--inner-steps", type=positive_int, default=None, help="inner horizon")
    p.add_argument("--meta-batch", type=positive_int, default=None, help="trajectories per step")
    p.add_argument(
        "--shards",
        type=positive_int,
        default=None,
        help="random streams the meta-batch splits into (default: one per rank)",
    )
    p.add_argument("--meta-lr", type=positive_float, default=None, help="Adam lr on φ")
    p.add_argument("--lr-schedule", default=None, choices=["constant", "cosine"])
    p.add_argument("--warmup-steps", type=nonneg_int, default=None)
    p.add_argument("--min-lr-ratio", type=float, default=None, help="cosine floor / meta-lr")
    p.add_argument("--meta-loss", default=None, choices=["sum", "log_sum"])
    p.add_argument("--objective", default=None, choices=["train", "heldout"])
    p.add_argument("--clip-grad-norm", type=float, default=None, help="0 disables clipping")
    p.add_argument(
        "--ema-decay",
        type=float,
        default=None,
        help="keep an EMA of φ with this decay; evaluation, keep-best and export use it (0: off)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="CHECKPOINT.pt",
        help="fine-tune: start φ from this learned optimizer's (evaluated at meta-step 0)",
    )
    p.add_argument(
        "--init-member",
        type=nonneg_int,
        default=None,
        help="with --init-from an ensemble: the member to start from",
    )
    p.add_argument("--second-order", action="store_true", help="keep second derivatives")
    p.add_argument("--checkpoint-every", type=nonneg_int, default=None)
    p.add_argument("--eval-every", type=nonneg_int, default=None)
    p.add_argument("--eval-tasks", type=positive_int, default=None, help="held-out instances")
    p.add_argument("--eval-steps", type=nonneg_int, default=None, help="held-out horizon")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this long")
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue this run")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch threads of this process (default: torch's, one per core; give 1 to each "
        "of several runs sharing a machine: oversubscribed, two 2-thread runs on 2 cores "
        "ran about 10x slower here)",
    )
    p.add_argument("--seed", type=int, default=None)
    dp = p.add_argument_group("data parallel (torchrun)")
    dp.add_argument(
        "--nproc",
        type=positive_int,
        default=None,
        metavar="N",
        help="run N ranks on this machine (starts torchrun --standalone on 127.0.0.1)",
    )
    dp.add_argument(
        "--dist-timeout",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="a collective waiting longer than this ends the run (default: 600)",
    )
    add_logdir_arg(p)
    add_device_arg(p)
    p.set_defaults(func=run)


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The run's spec from defaults, --preset, --config and the flags (validated later)."""
    spec: dict[str, Any] = {
        "task": "quadratic",
        "core": "lstm",
        "task_options": {},
        "core_options": {},
        "analyzer": {},
        "evaluation": {},
        "meta": {},
    }
    if args.preset:
        spec = _merge(spec, _load_preset(args.preset))
    if args.config:
        spec = _merge(spec, load_spec_file(args.config))
    if "problem" in spec:  # a task distribution: every estimate draws its own task
        if args.task is not None or args.task_option:
            raise UsageError(
                "this spec has a [problem] table (a task distribution): it takes no --task or -o"
            )
        spec["task"] = DISTRIBUTION_TASK
    if args.task is not None:
        spec["task"] = args.task
    if args.core is not None:
        spec["core"] = args.core
    spec["task_options"] = {**spec["task_options"], **parse_task_options(args.task_option)}
    spec["core_options"] = {**spec["core_options"], **parse_task_options(args.core_option)}
    if args.second_order:
        spec["evaluation"] = {**spec["evaluation"], "second_order": True}
    meta = dict(spec["meta"])
    for name in _META_FLAGS:
        v = getattr(args, name, None)
        if v is not None:
            meta[name] = v
    if args.estimator_option:
        meta["estimator_options"] = {
            **meta.get("estimator_options", {}),
            **parse_task_options(args.estimator_option),
        }
    spec["meta"] = meta
    if spec["task"] == "fewshot-digits":
        opts = spec["task_options"]
        spec["core_options"] = {
            **{k: v for k, v in opts.items() if k not in _FEWSHOT_TASK_KEYS},
            **spec["core_options"],
        }
        spec["task_options"] = {k: v for k, v in opts.items() if k in _FEWSHOT_TASK_KEYS}
    return spec


def _meta_config(spec: dict[str, Any], task: Any, world_size: int = 1) -> Any:
    from selfref.meta import MetaTrainConfig

    meta = dict(spec["meta"])
    if spec["task"] == "fewshot-digits":  # one sequence batch per step, backprop through it
        defaults = {
            "estimator": "full_bptt",
            "meta_steps": 2000,
            "unroll": 1,
            "inner_steps": 1,
            "meta_batch": task.batch_size * (meta.get("shards") or world_size),  # a batch per shard
            "eval_every": 500,
            "log_every": 50,
        }
        meta = {**defaults, **meta}
    valid = {f.name for f in fields(MetaTrainConfig)}
    bad = sorted(set(meta) - valid)
    if bad:
        raise UsageError(
            f"unknown [meta] setting(s) {', '.join(bad)}; valid: {', '.join(sorted(valid))}"
        )
    return MetaTrainConfig.from_dict(meta)


def build(spec: dict[str, Any], device: str, world_size: int = 1) -> tuple[Any, Any, Any]:
    """(task, problem, config) of a spec for ``world_size`` ranks; every bad value raises
    ValueError naming it."""
    from selfref.meta import LearnedOptimizerProblem, SequenceProblem
    from selfref.net import AnalyzerConfig, EvaluationConfig, SelfReferentialNet
    from selfref.tasks import make

    for k in ("task_options", "core_options", "analyzer", "evaluation"):
        if not isinstance(spec.get(k, {}), dict):
            raise UsageError(f"spec {k} must be a table of options, got {spec.get(k)!r}")
    if "problem" in spec:
        return _build_distribution(spec, device, world_size)
    task_options = dict(spec["task_options"])
    if "dtype" in task_options:  # "float32" | "float64" in the spec
        task_options["dtype"] = _task_dtype(task_options["dtype"])
    task: Any = make(spec["task"], device=device, **task_options)
    if spec["task"] == "fewshot-digits":
        from selfref.net.sequence import CORE_TO_MODEL, make_sequence_model

        if spec["core"] not in CORE_TO_MODEL:
            raise UsageError(
                f"--core {spec['core']!r} has no in-context learner; valid: "
                f"{', '.join(CORE_TO_MODEL)}"
            )
        model = make_sequence_model(spec["core"], task.input_dim, task.ways, **spec["core_options"])
        task = task.with_model(model)
        cfg = _meta_config(spec, task, world_size)
        if cfg.estimator not in ("tbptt", "full_bptt"):
            raise UsageError(
                f"--estimator {cfg.estimator!r} does not apply to fewshot-digits (a sequence "
                "is one truncation); valid: full_bptt, tbptt"
            )
        options = {
            "task_options": spec["task_options"],
            "learner": spec["core"],
            "learner_options": spec["core_options"],
        }
        return task, SequenceProblem(task, options), cfg
    cfg = _meta_config(spec, task, world_size)
    try:
        an = AnalyzerConfig(**spec["analyzer"])
        ev = EvaluationConfig(**spec["evaluation"])
    except TypeError as e:
        raise UsageError(f"bad analyzer/evaluation option: {e}") from None
    net = SelfReferentialNet.from_task(
        task, core=spec["core"], analyzer=an, evaluation=ev, **spec["core_options"]
    )
    problem = LearnedOptimizerProblem(
        net,
        meta_loss=cfg.meta_loss,
        objective=cfg.objective,
        mode=cfg.mode,
        eval_tasks=cfg.eval_tasks,
        eval_steps=cfg.eval_steps or cfg.inner_steps,
        eval_split=cfg.eval_split,
    )
    return task, problem, cfg


def _build_distribution(spec: dict[str, Any], device: str, world_size: int) -> tuple[Any, Any, Any]:
    """(None, problem, config) of a spec with a ``[problem]`` table: the learned optimizer
    meta-trained on a task distribution (:class:`~selfref.meta.problems.TaskDistributionProblem`,
    the ``lopt`` preset)."""
    from selfref.meta.problems import TaskDistributionProblem

    kind = spec["problem"].get("kind", "task_distribution")
    if kind != "task_distribution":
        raise UsageError(f"[problem] kind {kind!r} is unknown; valid: task_distribution")
    # settings of single-task meta-training that a task distribution takes from [problem]
    elsewhere = {"meta_loss": "meta_loss", "objective": "outer_split",
                 "eval_tasks": "eval_tasks", "eval_steps": "eval_steps"}  # fmt: skip
    moved = [k for k in elsewhere if k in spec["meta"]]
    if moved:
        raise UsageError(
            "a [problem] spec (a task distribution) takes "
            + ", ".join(f"[problem] {elsewhere[k]}" for k in moved)
            + " instead of "
            + ", ".join(f"--{k.replace('_', '-')}" for k in moved)
            + " / [meta]"
        )
    cfg = _meta_config(spec, None, world_size)
    try:
        problem = TaskDistributionProblem.from_spec(spec, device=device)
    except TypeError as e:
        raise UsageError(f"bad [problem] or net option: {e}") from None
    return None, problem, cfg


def _task_dtype(name: Any) -> Any:
    import torch

    if name not in ("float32", "float64"):
        raise UsageError(f"task option dtype={name!r} is invalid; valid: float32, float64")
    return getattr(torch, name)


def _resume_spec(path: str) -> tuple[Any, dict[str, Any]]:
    run_dir, spec = _saved_spec(path)
    if not (run_dir.checkpoints / "last.pt").is_file():
        raise UsageError(f"--resume {path!r}: no checkpoints/last.pt to resume from")
    return run_dir, spec


def _saved_spec(path: str) -> tuple[Any, dict[str, Any]]:
    """The run directory at ``path`` and the spec its config.json stores."""
    from selfref.runs import RunDir

    run_dir = RunDir.open(path)
    cfg_file = run_dir.path / "config.json"
    if not cfg_file.is_file():
        raise UsageError(f"--resume {path!r} has no config.json; is it a meta-train run directory?")
    try:
        saved = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"--resume {path!r}: config.json is not valid JSON ({e})") from None
    if not isinstance(saved, dict) or saved.get("command") != "meta-train" or "spec" not in saved:
        raise UsageError(
            f"--resume {path!r} is not a meta-train run directory (its config.json was not "
            "written by selfref meta-train)"
        )
    return run_dir, saved["spec"]


def _strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (and argparse's abbreviations of it)."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        flag = tok.split("=", 1)[0]
        if len(flag) >= 3 and "--nproc".startswith(flag):
            skip = "=" not in tok
            continue
        out.append(tok)
    return out


def _launch(args: argparse.Namespace) -> int:
    """``--nproc N``: check the spec here once, then run the ranks under torchrun."""
    from selfref.meta.distributed import launch

    if args.resume:
        _resume_spec(args.resume)
    else:
        build_spec(args)
    return launch(args.nproc, _strip_nproc(list(args.argv[1:])))


def _join_ranks(args: argparse.Namespace, device: str) -> Any:
    """The ranks' comm when torchrun started this process (None otherwise)."""
    from selfref.meta.distributed import DEFAULT_TIMEOUT_S, TorchDistributedComm, torchrun_env

    if torchrun_env() is None:
        return None
    return TorchDistributedComm.from_env(device, args.dist_timeout or DEFAULT_TIMEOUT_S)


def _create_run_dir(
    args: argparse.Namespace, spec: dict[str, Any], cfg: Any, device: str, comm: Any
) -> Any:
    """Rank 0 creates the run directory; the other ranks get its path (or its error)."""
    from selfref.runs import RunDir

    made: tuple[str, str] = ("", "")
    if comm is None or comm.rank == 0:
        try:
            name = f"{spec['task']}-{spec['core']}"
            run_dir = RunDir.create(args.logdir, "meta-train", name, cfg.seed, argv=args.argv)
            config = {"command": "meta-train", "spec": spec, "device": device}
            if comm is not None:
                config["world_size"] = comm.world_size
            run_dir.write_config(config)
            made = ("ok", str(run_dir.path))
        except ValueError as e:
            made = ("error", str(e))
    if comm is not None:
        made = comm.broadcast(made)
    if made[0] == "error":
        raise UsageError(made[1])
    return RunDir(Path(made[1]))


def _rank_failed(e: Exception, trainer: Any, run_dir: Any, world_size: int) -> int:
    """One line for a rank whose collective failed (or that torchrun stopped); exit code 1."""
    last = run_dir.checkpoints / "last.pt"
    where = (
        f"the last checkpoint is intact: {last}; resume on {world_size} ranks: selfref "
        f"meta-train --resume {run_dir.path} --nproc {world_size}"
        if last.is_file()
        else "no checkpoint had been written yet"
    )
    print(f"selfref: error: {e}; stopped at meta-step {trainer.step}; {where}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from selfref.logging import MultiLogger, PrintLogger, TensorBoardLogger
    from selfref.meta import MetaTrainer
    from selfref.meta.distributed import RankFailure, sigterm_raises, torchrun_env
    from selfref.tasks import resolve_device

    if args.list_presets:
        for name in preset_names():
            print(name)
        return 0
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    if args.resume:
        names = (*_META_FLAGS, "task", "core", "preset", "config")
        given = [n for n in names if getattr(args, n, None) is not None]
        if given or args.task_option or args.core_option or args.estimator_option:
            raise UsageError(
                "--resume continues a run with its stored spec; drop "
                + ", ".join(f"--{n.replace('_', '-')}" for n in given or ["options"])
            )
    built: dict[str, Any] | None = None  # the spec from the flags, built once
    if torchrun_env() is None:  # an [ensemble] spec runs its members as processes
        from selfref.commands.meta_train_ensemble import run_ensemble

        if args.resume:
            saved_dir, saved = _saved_spec(args.resume)
            if "ensemble" in saved:
                return run_ensemble(args, saved, device, saved_dir)
        else:
            built = build_spec(args)
            if "ensemble" in built:
                return run_ensemble(args, built, device, None)
    if args.nproc is not None:
        if torchrun_env() is not None:
            raise UsageError("--nproc starts torchrun itself; under torchrun leave it out")
        return _launch(args)
    comm = _join_ranks(args, device)  # None unless torchrun started this process
    world_size = 1 if comm is None else comm.world_size
    rank0 = comm is None or comm.rank == 0
    if comm is not None:
        device = str(comm.device)
    if args.resume:
        run_dir, spec = _resume_spec(args.resume)
        task, problem, cfg = build(spec, device, world_size)
        # safe load; a bad file fails before work
        ck = run_dir.load_checkpoint("last.pt", map_location=device)
    else:
        spec = built if built is not None else build_spec(args)
        if "ensemble" in spec:  # only here under torchrun: the members are processes
            raise UsageError("an [ensemble] spec runs its members as processes, not under torchrun")
        task, problem, cfg = build(spec, device, world_size)  # validated before the run dir
        ck = None
        run_dir = _create_run_dir(args, spec, cfg, device, comm)
    logger = None
    if rank0:  # rank 0 alone writes
        logger = MultiLogger(
            [
                TensorBoardLogger(run_dir.path),
                PrintLogger(every=max(1, cfg.meta_steps // 20), prefixes=("meta/loss", "heldout/")),
            ]
        )
    baselines = None
    if spec["task"] not in ("fewshot-digits", DISTRIBUTION_TASK):
        baselines = _CURVE_BASELINES.get(spec["task"], _CURVE_BASELINES["default"])
    trainer = MetaTrainer(problem, cfg, logger, run_dir=run_dir, baselines=baselines, comm=comm)
    if ck is not None:
        trainer.load_state_dict(ck)
    try:
        with nullcontext() if comm is None else sigterm_raises(comm.rank):
            res = trainer.train()
        if comm is not None:
            comm.close()
        if logger is None:  # ranks other than 0 write nothing
            return 0
        final = problem.evaluate(res.best_meta_params)
        test = None
        if spec["task"] == "fewshot-digits":
            test = task.evaluate(res.best_meta_params, "test")
            logger.hparams(
                {"core": spec["core"], "meta_steps": cfg.meta_steps, "meta_lr": cfg.meta_lr,
                 "lr_schedule": cfg.lr_schedule,
                 **{f"task/{k}": v for k, v in spec["task_options"].items()},
                 **{f"model/{k}": v for k, v in spec["core_options"].items()}},
                {f"hparams/test_{k}": v for k, v in test.items()},
            )  # fmt: skip
    except RankFailure as e:
        return _rank_failed(e, trainer, run_dir, world_size)
    finally:
        if logger is not None:
            logger.close()
    out: dict[str, Any] = {
        "task": spec["task"],
        "core": spec["core"],
        "estimator": cfg.estimator,
        "meta_steps": cfg.meta_steps,
        "steps_done": res.steps_done,
        "best_step": res.best_step,
        "best_heldout_score": res.best_score if math.isfinite(res.best_score) else None,
        "heldout": final,
        "skipped": res.skipped,
        "meta_train_grad_evals": res.meta_train_grad_evals,
        "wall_s": res.wall_s,
        "history": res.history,
        "best_checkpoint": str(run_dir.checkpoints / "best.pt"),
    }
    if test is not None:
        out["test"] = test
    if spec["task"] == DISTRIBUTION_TASK:  # what LearnedOptimizer(params, checkpoint=...) loads
        out["optimizer_checkpoint"] = str(trainer.export(run_dir.checkpoints / "optimizer.pt"))
    run_dir.write_results(out)
    print(json.dumps({k: v for k, v in out.items() if k != "history"}, default=str))
    print(f"run directory: {run_dir.path}")
    return 0
