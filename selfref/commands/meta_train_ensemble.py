"""``selfref meta-train`` of an ensemble: restarts of one learned-optimizer recipe, composed.

A spec with an ``[ensemble]`` table::

    extends = "lopt"        # the recipe (any learned-optimizer spec)
    [ensemble]
    seeds = [0, 1]          # one member per seed
    parallel = 2            # members running at once (default: all)
    keep = 2                # compose only the best k by meta-validation (default: all)
    core_options = {}       # a config edit of the composed optimizer (default: none)
    # with [meta] init_from = an ensemble checkpoint: member i fine-tunes its member i

runs one ordinary meta-training per seed — the spec without its ``[ensemble]`` table, as
``selfref meta-train --config members/s<S>.json --seed S`` — each in its own process, with
``--threads`` threads (default: the machine's cores over ``parallel``) and its log in
``members/s<S>.log``. When every member has finished, their exported optimizers are composed
(:func:`selfref.meta.ensemble.ensemble_checkpoint`: the ``ensemble`` core, the mean of the
members' updates) into ``checkpoints/optimizer.pt`` of the ensemble's run directory — with
``core_options`` as a config edit of every member's core, φ kept and the edit recorded under
``ck["edits"]`` (:func:`selfref.net.optimizer.edited_checkpoint`; the members meta-train
without it, and an option that would change φ is refused before any member starts) — and
``results.json`` lists the members. With ``keep = k`` only the k members with the lowest
keep-best meta-validation score (``best_heldout_score``: tasks of the meta-training
distribution, never a selection or held-out task) are composed, in seed order; the
checkpoint's meta-training cost (``grad_evals``, ``wall_s``, ``parallel_wall_s``) still counts
every member trained, and ``trained_members`` lists them all with their scores.

A progress bar counts the members' meta-steps, read from their last checkpoints every
``PROGRESS_EVERY_S`` seconds; when stderr is not a terminal (a log file, ``nohup``), it is a
plain line per read that moved, at most one a minute, instead of a bar redrawn with carriage
returns on one endless line.

Nothing is lost when something fails: a member that fails leaves the others running, and the
command then exits 1 naming it; ``selfref meta-train --resume ENSEMBLE_RUN_DIR`` skips the
members that finished, resumes those with a checkpoint and starts the rest. Interrupted
(Ctrl-C or SIGTERM), it stops every member process it started, by its pid; their last
checkpoints stay for the resume.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from selfref.commands.common import UsageError

__all__ = ["ensemble_edit", "ensemble_settings", "kept_seeds", "run_ensemble"]


def ensemble_settings(spec: dict[str, Any]) -> tuple[list[int], int, int]:
    """(seeds, parallel, keep) of a spec's ``[ensemble]`` table, checked (``keep``: how many
    members to compose, default all; ``core_options``: see :func:`ensemble_edit`)."""
    table = dict(spec["ensemble"])
    bad = sorted(set(table) - {"seeds", "parallel", "keep", "core_options"})
    if bad:
        raise UsageError(
            f"unknown [ensemble] setting(s) {', '.join(bad)}; valid: core_options, keep, "
            "parallel, seeds"
        )
    seeds = table.get("seeds")
    if (
        not isinstance(seeds, list)
        or len(seeds) < 2
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise UsageError(f"[ensemble] seeds must be two or more distinct integers, got {seeds!r}")
    parallel = table.get("parallel", len(seeds))
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise UsageError(f"[ensemble] parallel must be an integer >= 1, got {parallel!r}")
    if "problem" not in spec:
        raise UsageError(
            "an [ensemble] spec needs a learned optimizer on a task distribution (a [problem] "
            "table, as the lopt preset has)"
        )
    keep = table.get("keep", len(seeds))
    if not isinstance(keep, int) or isinstance(keep, bool) or not 2 <= keep <= len(seeds):
        raise UsageError(
            f"[ensemble] keep must be an integer from 2 to the number of seeds ({len(seeds)}), "
            f"got {keep!r}"
        )
    return [int(s) for s in seeds], min(parallel, len(seeds)), keep


def kept_seeds(seeds: list[int], scores: list[float], keep: int) -> list[int]:
    """The ``keep`` seeds with the lowest meta-validation scores, in seed-list order (ties:
    the earlier seed; a NaN score ranks last)."""
    rank = sorted(
        range(len(seeds)),
        key=lambda i: (math.isnan(scores[i]), 0.0 if math.isnan(scores[i]) else scores[i], i),
    )
    chosen = set(rank[:keep])
    return [s for i, s in enumerate(seeds) if i in chosen]


def ensemble_edit(spec: dict[str, Any]) -> dict[str, Any]:
    """The ``[ensemble] core_options`` table: a config edit of the composed optimizer ({}:
    none)."""
    edit = spec["ensemble"].get("core_options", {})
    if not isinstance(edit, dict):
        raise UsageError(f"[ensemble] core_options must be a table of options, got {edit!r}")
    return dict(edit)


def _member_specs(spec: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The n members' specs: ``spec``, except that with ``[meta] init_from`` an ensemble
    checkpoint and no ``init_member``, member i fine-tunes the checkpoint's member i (the path
    made absolute, as the members run from their own directories' specs)."""
    meta = dict(spec.get("meta", {}))
    if not meta.get("init_from"):
        return [spec] * n
    meta["init_from"] = str(Path(meta["init_from"]).resolve())
    by_member = False
    if meta.get("init_member", -1) < 0:
        from selfref import checkpoints

        net = checkpoints.load_meta(meta["init_from"]).get("net", {})
        by_member = net.get("core") == "ensemble"
    return [{**spec, "meta": {**meta, "init_member": i} if by_member else meta} for i in range(n)]


def _member_run(members: Path, seed: int) -> Path | None:
    """The member's run directory: the newest under ``members/s<seed>`` holding a checkpoint
    (None: none yet)."""
    runs = sorted((members / f"s{seed}" / "meta-train").glob("*"), key=lambda p: p.name)
    runs = [r for r in runs if (r / "checkpoints" / "last.pt").is_file()]
    return runs[-1] if runs else None


def _command(args: argparse.Namespace, members: Path, seed: int, threads: int) -> list[str]:
    base = [sys.executable, "-m", "selfref", "meta-train", "--threads", str(threads)]
    run = _member_run(members, seed)
    if run is not None:
        return [*base, "--resume", str(run)]
    return [
        *base,
        "--config",
        str(members / f"s{seed}.json"),
        "--seed",
        str(seed),
        "--logdir",
        str(members / f"s{seed}"),
        "--device",
        str(args.device),
    ]


PROGRESS_EVERY_S = 30.0  # how often the progress bar reads the members' last checkpoints
LOG_LINE_EVERY_S = 60.0  # without a terminal: at most one progress line this often


def _steps_done(members: Path, seed: int) -> int:
    """Meta-steps the member has checkpointed (0 before its first checkpoint)."""
    from selfref import checkpoints

    run = _member_run(members, seed)
    if run is None:
        return 0
    try:
        return int(checkpoints.load(run / "checkpoints" / "last.pt")["step"])
    except (checkpoints.CheckpointError, KeyError):
        return 0


def _stop(procs: dict[int, subprocess.Popen[bytes]]) -> None:
    """Stop every member process still running, by its pid (SIGTERM, then SIGKILL)."""
    for p in procs.values():
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 20
    for p in procs.values():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_ensemble(args: argparse.Namespace, spec: dict[str, Any], device: str, run_dir: Any) -> int:
    """Run (or, with ``run_dir`` given, resume) the ensemble of ``spec``; the exit code."""
    from selfref import checkpoints
    from selfref.commands.meta_train import DISTRIBUTION_TASK, build
    from selfref.meta.ensemble import ensemble_checkpoint
    from selfref.runs import RunDir

    seeds, parallel, keep = ensemble_settings(spec)
    edit = ensemble_edit(spec)
    member_spec = {k: v for k, v in spec.items() if k != "ensemble"}
    if run_dir is None:
        if args.seed is not None:
            raise UsageError("an [ensemble] spec takes its members' seeds from [ensemble] seeds")
        if args.nproc is not None:
            raise UsageError("an [ensemble] spec runs its members as processes; drop --nproc")
        _, problem, _ = build(member_spec, device)  # the members' spec builds before any runs
        if edit:  # and the edit applies to their optimizer (φ kept), before any member runs
            from selfref.net.optimizer import with_core_options

            try:
                with_core_options(problem.net.describe(), edit)
            except ValueError as exc:
                raise UsageError(f"[ensemble] core_options: {exc}") from None
        name = f"{DISTRIBUTION_TASK}-{spec['core']}-ensemble"
        run_dir = RunDir.create(args.logdir, "meta-train", name, None, argv=args.argv)
        run_dir.write_config({"command": "meta-train", "spec": spec, "device": device})
    members = run_dir.path / "members"
    members.mkdir(exist_ok=True)
    for seed, one in zip(seeds, _member_specs(member_spec, len(seeds))):
        (members / f"s{seed}.json").write_text(json.dumps(one, indent=2) + "\n")
    threads = args.threads or max(1, (os.cpu_count() or 1) // parallel)
    done = {s for s in seeds if (r := _member_run(members, s)) and (r / "results.json").is_file()}
    todo = [s for s in seeds if s not in done]
    print(
        f"ensemble of {len(seeds)} (seeds {seeds}): {len(done)} finished, {len(todo)} to run, "
        f"{parallel} at a time, {threads} thread(s) each; run directory: {run_dir.path}",
        flush=True,
    )
    procs: dict[int, subprocess.Popen[bytes]] = {}
    failed: dict[int, int] = {}
    started: dict[int, float] = {}
    logs = []
    from tqdm.auto import tqdm

    per_member = int(member_spec.get("meta", {}).get("meta_steps", 0)) or None
    as_lines = per_member is not None and not sys.stderr.isatty()  # no terminal: plain lines
    bar = tqdm(
        total=per_member and per_member * len(seeds),
        initial=(per_member or 0) * len(done),
        desc="ensemble meta-steps",
        unit="step",
        disable=per_member is None or as_lines,
    )
    last_read = last_line = time.monotonic()
    t_start, shown = last_read, bar.n

    def log_line(n: int, force: bool = False) -> None:
        """Without a terminal (the bar is off): one plain progress line."""
        nonlocal last_line, shown
        if not as_lines or n == shown:
            return
        if force or time.monotonic() - last_line >= LOG_LINE_EVERY_S:
            total = (per_member or 0) * len(seeds)
            minutes = (time.monotonic() - t_start) / 60
            print(
                f"ensemble meta-steps: {n}/{total} ({100 * n / total:.0f} %), {minutes:.1f} min",
                file=sys.stderr,
                flush=True,
            )
            last_line, shown = time.monotonic(), n

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        while todo or procs:
            while todo and len(procs) < parallel:
                seed = todo.pop(0)
                log = open(members / f"s{seed}.log", "ab")  # noqa: SIM115 (closed below)
                logs.append(log)
                cmd = _command(args, members, seed, threads)
                procs[seed] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
                started[seed] = time.monotonic()
                print(f"  member s{seed}: started, pid {procs[seed].pid}", flush=True)
            time.sleep(1.0)
            ended = any(p.poll() is not None for p in procs.values())
            if ended or time.monotonic() - last_read >= PROGRESS_EVERY_S:
                last_read = time.monotonic()
                running = sum(_steps_done(members, s) for s in procs)
                n = (per_member or 0) * len(done) + running
                bar.update(n - bar.n)
                log_line(n, force=ended)
            for seed, p in list(procs.items()):
                rc = p.poll()
                if rc is None:
                    continue
                del procs[seed]
                minutes = (time.monotonic() - started[seed]) / 60
                if rc == 0:
                    done.add(seed)
                    print(f"  member s{seed}: finished in {minutes:.1f} min", flush=True)
                else:
                    failed[seed] = rc
                    print(
                        f"  member s{seed}: failed (exit {rc}) after {minutes:.1f} min; "
                        f"its log: {members / f's{seed}.log'}",
                        flush=True,
                    )
    except KeyboardInterrupt:
        _stop(procs)
        print(
            f"selfref: interrupted; member processes stopped. Continue with: selfref "
            f"meta-train --resume {run_dir.path}",
            file=sys.stderr,
        )
        return 130
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous)
        for log in logs:
            log.close()
    if failed:
        print(
            f"selfref: error: member(s) {', '.join(f's{s}' for s in sorted(failed))} failed "
            f"(logs in {members}); the others are kept. Continue with: selfref meta-train "
            f"--resume {run_dir.path}",
            file=sys.stderr,
        )
        return 1
    member_runs = [_member_run(members, s) for s in seeds]
    results = [json.loads((r / "results.json").read_text()) for r in member_runs if r]
    scores = [float(r["best_heldout_score"]) for r in results]
    kept = kept_seeds(seeds, scores, keep)
    paths = [r["optimizer_checkpoint"] for s, r in zip(seeds, results) if s in kept]
    # the cost counts every member trained, in seed order (each member's seconds as its
    # exported optimizer records them: a fine-tune counts its start's, inherited_wall_s)
    trained = [r["optimizer_checkpoint"] for r in results]
    composed = ensemble_checkpoint(paths, parallel=parallel, trained=trained)
    if edit:
        from selfref.net.optimizer import edited_checkpoint

        composed = edited_checkpoint(composed, edit, "[ensemble] core_options")
    path = checkpoints.save(composed, run_dir.checkpoints / "optimizer.pt")
    out = {
        "task": DISTRIBUTION_TASK,
        "core": "ensemble",
        "member_core": spec["core"],
        "seeds": seeds,
        "kept_seeds": kept,
        "members": [
            {
                "seed": s,
                "run_dir": str(r),
                "best_step": res["best_step"],
                "best_heldout_score": res["best_heldout_score"],
                "wall_s": res["wall_s"],
                "meta_train_grad_evals": res["meta_train_grad_evals"],
            }
            for s, r, res in zip(seeds, member_runs, results)
        ],
        "meta_train_grad_evals": composed["grad_evals"],  # every member trained
        "members_wall_s": composed["wall_s"],
        "parallel_wall_s": composed["parallel_wall_s"],  # every member's clock on the slots
        "core_options_edit": edit,
        "optimizer_checkpoint": str(path),
    }
    run_dir.write_results(out)
    print(json.dumps({k: v for k, v in out.items() if k != "members"}, default=str))
    print(f"run directory: {run_dir.path}")
    return 0
