"""Meta-train the shipped learned optimizer from a preset (issue 14), or resume one.

Reads ``selfref/presets/<name>.toml`` (``[meta]`` → :class:`~selfref.meta.MetaTrainConfig`;
``core``, ``[core_options]``, ``[analyzer]``, ``[evaluation]`` and ``[problem]`` →
:class:`~selfref.meta.problems.TaskDistributionProblem`), runs the
one meta-training loop (:class:`~selfref.meta.MetaTrainer`) into a run directory
``<logdir>/meta-train/<time>-<preset>-s<seed>/`` (TensorBoard events, ``config.json``,
``checkpoints/last.pt`` and ``best.pt``, ``results.json``) and exports the kept φ as a slim
checkpoint; ``--export`` also copies it to ``selfref/net/pretrained/<preset>.pt`` (``-``
written ``_``; the ``lopt`` preset's to ``lopt_v2.pt``, one restart of the two that
``selfref meta-train --preset lopt-ensemble`` composes into ``lopt.pt``, the file
``LearnedOptimizer()`` and the ``selfref`` method load).
``selfref meta-train --preset lopt`` runs the same configuration through the CLI (its run
directory gets ``checkpoints/optimizer.pt``; the CLI never writes into the package).

Usage:
    python -m experiments.lopt_meta_train [--preset lopt] [--export] [--device auto]
    python -m experiments.lopt_meta_train --resume logs/meta-train/<run>
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from selfref.logging import MultiLogger, PrintLogger, TensorBoardLogger
from selfref.meta import MetaTrainConfig, MetaTrainer
from selfref.meta.problems import TaskDistributionProblem
from selfref.net.optimizer import PRETRAINED_DIR
from selfref.runs import RunDir
from selfref.tasks import resolve_device

PRESETS = Path(__file__).resolve().parent.parent / "selfref" / "presets"
EXPORT_NAMES = {"lopt": "lopt_v2.pt"}  # the presets whose export is not <preset>.pt


def load_preset(name: str) -> dict[str, Any]:
    """The preset ``name`` (a file in selfref/presets/ or a path to a TOML file)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]

    path = Path(name) if name.endswith(".toml") else PRESETS / f"{name}.toml"
    if not path.is_file():
        have = sorted(p.stem for p in PRESETS.glob("*.toml"))
        raise SystemExit(f"unknown preset {name!r}; valid: {', '.join(have)}")
    return tomllib.loads(path.read_text())


def build(preset: dict[str, Any], device: str) -> tuple[MetaTrainConfig, TaskDistributionProblem]:
    """The config and problem of a spec: ``core``, ``core_options``, ``analyzer``,
    ``evaluation`` (the ``selfref meta-train`` spec keys; or all four under ``[net]``),
    ``meta`` and ``problem``."""
    cfg = MetaTrainConfig.from_dict(preset["meta"])
    if "net" in preset:  # the first layout of this preset: the four net keys under [net]
        preset = {**preset, **preset["net"]}
    return cfg, TaskDistributionProblem.from_spec(preset, device=device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="lopt")
    p.add_argument("--resume", default=None, metavar="RUN_DIR")
    p.add_argument("--export", action="store_true", help="copy the result into the package")
    p.add_argument("--device", default="auto")
    p.add_argument("--logdir", default="logs")
    p.add_argument("--meta-steps", type=int, default=None, help="override [meta] meta_steps")
    p.add_argument("--max-seconds", type=float, default=None, help="override [meta] max_seconds")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    if args.resume:
        run_dir = RunDir.open(args.resume)
        saved = run_dir.read_config()
        preset, name = saved["preset"], saved["preset_name"]
    else:
        name = Path(args.preset).stem
        preset = load_preset(args.preset)
        for key, value in (("meta_steps", args.meta_steps), ("max_seconds", args.max_seconds)):
            if value is not None:
                preset["meta"][key] = value
        run_dir = RunDir.create(args.logdir, "meta-train", name, int(preset["meta"].get("seed", 0)))
        run_dir.write_config({"preset_name": name, "preset": preset, "device": device})
    cfg, problem = build(preset, device)
    logger = MultiLogger(
        [
            TensorBoardLogger(run_dir.path),
            PrintLogger(every=10, prefixes=("meta/loss", "heldout/", "outer/final_loss")),
        ]
    )
    trainer = MetaTrainer(problem, cfg, logger, run_dir=run_dir)
    if args.resume:
        trainer.resume(run_dir.checkpoints / "last.pt")
    t0 = time.perf_counter()
    try:
        res = trainer.train()
    finally:
        logger.close()
    slim = trainer.export(run_dir.checkpoints / f"{name}.pt")
    out = {
        "preset": name,
        "meta_steps_done": res.steps_done,
        "best_step": res.best_step,
        "best_score_log10_vs_tuned_adam": res.best_score if math.isfinite(res.best_score) else None,
        "skipped": res.skipped,
        "meta_train_grad_evals": res.meta_train_grad_evals,
        "wall_s_this_process": time.perf_counter() - t0,
        "wall_s_total": res.wall_s,
        "history": res.history,
        "export": str(slim),
    }
    if args.export:
        # lopt-v1 -> lopt_v1.pt; lopt -> lopt_v2.pt (one restart: pretrained/lopt.pt is the
        # ensemble of two, made by `selfref meta-train --preset lopt-ensemble`)
        dest = PRETRAINED_DIR / EXPORT_NAMES.get(name, f"{name.replace('-', '_')}.pt")
        shutil.copyfile(slim, dest)
        out["installed"] = str(dest)
    run_dir.write_results(out)
    print(json.dumps({k: v for k, v in out.items() if k != "history"}))
    print(f"run directory: {run_dir.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
