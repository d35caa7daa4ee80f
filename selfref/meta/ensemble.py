"""An ensemble checkpoint from finished meta-training runs (the ``ensemble`` core's members).

:func:`ensemble_checkpoint` reads M meta-training checkpoints (training states or slim
exports, ``weights_only``) of one learned-optimizer recipe — the same core, core options,
analyzer and evaluation model; they differ in seed — and returns one slim checkpoint whose
network is :class:`~selfref.net.cores.ensemble.EnsembleCore` over their best φ. It loads
wherever a slim export does (``LearnedOptimizer``, the ``selfref`` method, the benchmarks).
Its meta-training cost (``grad_evals``, ``wall_s``) is the sum of its members'; the members'
own records (path, seed, best score and step, wall-clock) stay in ``members``. Given the number
of members that ran at once (``parallel``), it also records ``parallel_wall_s``: how long the
members' meta-training takes on that many slots (:func:`parallel_wall_s`), which is the
wall-clock of ``selfref meta-train`` of an ensemble, less its start-up and composing. When
the ensemble keeps some of the members it trained (``[ensemble] keep``), ``trained`` names all
of them, in the order they ran: the cost counts every one (choosing costs what it trained), and
``trained_members`` records which were kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfref import checkpoints

__all__ = ["ensemble_checkpoint", "parallel_wall_s"]

_SHARED = ("analyzer", "evaluation", "core", "core_options")


def parallel_wall_s(durations: Sequence[float], parallel: int) -> float:
    """Wall-clock of jobs of these ``durations`` run in order, ``parallel`` at a time, each
    started as soon as a slot frees (as ``selfref meta-train`` runs an ensemble's members).

    Example:
        >>> parallel_wall_s([24.8, 24.5, 28.9, 29.1], 2)  # s2 takes s1's slot at 24.5
        53.9
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    free = [0.0] * min(parallel, max(1, len(durations)))  # when each slot frees
    for d in durations:
        i = free.index(min(free))
        free[i] += float(d)
    return round(max(free), 9)


def ensemble_checkpoint(
    paths: Sequence[str | Path],
    which: str = "best",
    parallel: int | None = None,
    trained: Sequence[str | Path] | None = None,
) -> dict[str, Any]:
    """One slim checkpoint averaging the updates of the learned optimizers at ``paths``.

    ``parallel``: how many members meta-trained at once; records ``parallel`` and
    ``parallel_wall_s`` (the members' wall-clocks scheduled on that many slots).
    ``trained``: every member meta-trained, in the order they ran, when ``paths`` keeps some
    of them; the cost (``grad_evals``, ``wall_s``, ``parallel_wall_s``) counts them all, and
    ``trained_members`` lists each one's seed, best score and whether it was kept.

    Raises:
        ValueError: fewer than two paths, a checkpoint without a learned optimizer, members
            whose networks differ in anything but φ (the message names the part), or a kept
            path that ``trained`` does not list.
    """
    if len(paths) < 2:
        raise ValueError(f"an ensemble needs at least two checkpoints, got {len(paths)}")
    order = [str(p) for p in (paths if trained is None else trained)]  # as they ran
    index = {p: i for i, p in enumerate(order)}
    missing = [str(p) for p in paths if str(p) not in index]
    if missing:
        raise ValueError(f"kept member(s) {missing} are not among the trained ones")
    cost = [checkpoints.load_meta(p) for p in order]  # every member trained
    records = [_record(p, ck) for p, ck in zip(order, cost)]
    cks = [cost[index[str(p)]] for p in paths]
    for p, ck in zip(paths, cks):
        if "net" not in ck:
            raise ValueError(f"{str(p)!r} holds no learned optimizer")
        if ck["net"]["core"] == "ensemble":
            raise ValueError(f"{str(p)!r} is already an ensemble")
    first = cks[0]["net"]
    for p, ck in zip(paths[1:], cks[1:]):
        for part in _SHARED:
            if ck["net"].get(part) != first.get(part):
                raise ValueError(
                    f"{str(p)!r} differs from {str(paths[0])!r} in its {part}: an ensemble's "
                    "members must be restarts of one recipe"
                )
    phi: dict[str, Any] = {}
    for m, ck in enumerate(cks):
        for k, v in checkpoints.meta_params_of(ck, which).items():
            group, _, rest = k.partition(".")
            if group != "core":  # a learned value model (eval.*) has no ensemble form
                raise ValueError(f"member {m} has meta-parameter {k!r} outside the core")
            phi[f"core.m{m}.{rest}"] = v.detach().clone()
    opts = dict(first["core_options"])
    net = {
        "core": "ensemble",
        "core_options": {
            "member": first["core"],
            "members": len(cks),
            "member_options": opts,
            "feature_dim": int(opts.get("feature_dim", 0)),
        },
        "analyzer": first["analyzer"],
        "evaluation": first["evaluation"],
    }
    members = [records[index[str(p)]] for p in paths]
    walls = [r["wall_s"] for r in records]
    out: dict[str, Any] = {
        "format": checkpoints.META_FORMATS[0],
        "problem": cks[0].get("problem", {}),
        "config": cks[0].get("config", {}),
        "meta_params": phi,
        "best_meta_params": phi,
        "grad_evals": sum(checkpoints.grad_evals_of(ck) for ck in cost),
        "wall_s": sum(walls),
        "members": members,
        "net": net,
        "task": cks[0].get("task", "sampled"),
        "slim": True,
    }
    if parallel is not None:
        out["parallel"] = int(parallel)
        out["parallel_wall_s"] = parallel_wall_s(walls, int(parallel))
    if len(order) > len(paths):
        kept = {str(p) for p in paths}
        out["trained_members"] = [
            {"seed": r["seed"], "best_score": r["best_score"], "kept": r["path"] in kept}
            for r in records
        ]
    return out


def _record(path: str, ck: dict[str, Any]) -> dict[str, Any]:
    """A member's own record: path, seed, best score and step, meta-training seconds."""
    raw = ck.get("best")
    best: dict[str, Any] = raw if isinstance(raw, dict) else {}
    return {
        "path": path,
        "seed": int(ck.get("config", {}).get("seed", -1)),
        "best_score": float(ck.get("best_score", best.get("score", float("nan")))),
        "best_step": int(ck.get("best_step", best.get("step", -1))),
        "wall_s": float(ck.get("wall_s", ck.get("elapsed_s", 0.0))),  # its own clock
    }
