"""The checkpoint format: plain containers of tensors, written atomically, read safely.

Every checkpoint selfref writes is a dict of tensors, numbers, strings, bools, ``None``,
lists, tuples and dicts, nothing else, so it loads with ``torch.load(..., weights_only=True)``:
a file cannot run code when it is read, whoever made it. This module is the one place that
reads and writes them; it sits below ``net/`` and ``meta/`` (it imports only torch), so both
can use it without importing each other.

A checkpoint names its format in ``ck["format"]`` (e.g. ``"selfref-meta/1"``); :func:`load`
checks it when asked to.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "save",
    "load",
    "load_meta",
    "meta_params_of",
    "grad_evals_of",
    "CheckpointError",
    "META_FORMATS",
]


class CheckpointError(ValueError):
    """A file that is not a readable selfref checkpoint (missing, corrupt, unsafe, wrong kind)."""


def save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same directory, then rename into place.

    A crash mid-write never leaves a half-written checkpoint under ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(
    path: str | Path,
    map_location: Any = "cpu",
    formats: str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``.

    Args:
        path: the file.
        map_location: as for ``torch.load`` (default CPU, so CUDA checkpoints load anywhere).
        formats: when given, ``ck["format"]`` must be one of these.

    Raises:
        CheckpointError: (a ``ValueError``) the file is missing, not a torch file, holds
            objects other than plain containers and tensors (a pickle that could run code
            is refused, never executed), is not a dict, or has another format.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist or is not a file")
    if not zipfile.is_zipfile(p):  # torch.save has written zip archives since torch 1.6
        raise CheckpointError(f"{str(p)!r} is not a readable torch checkpoint (not a zip archive)")
    try:
        ck = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
        detail = lines[0] if lines else type(e).__name__
        raise CheckpointError(
            f"refusing to load {str(p)!r}: it holds objects other than tensors and plain "
            f"containers, which could run code ({detail[:160]})"
        ) from None
    except Exception as e:  # corrupt zip, truncated file, not a torch file at all
        raise CheckpointError(
            f"{str(p)!r} is not a readable torch checkpoint ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else 'no detail'})"
        ) from None
    if not isinstance(ck, dict):
        raise CheckpointError(f"{str(p)!r} holds a {type(ck).__name__}, not a checkpoint dict")
    if formats is not None:
        want = (formats,) if isinstance(formats, str) else tuple(formats)
        if ck.get("format") not in want:
            raise CheckpointError(
                f"{str(p)!r} has format {ck.get('format')!r}; expected {' or '.join(want)}"
            )
    return ck


# Formats of meta-training checkpoints: /1 written before the one engine (slim exports
# only are still read), /2 the engine's training state (selfref.meta.trainer).
META_FORMATS: tuple[str, ...] = ("selfref-meta/2", "selfref-meta/1")


def load_meta(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a meta-training checkpoint (training state or slim export) safely."""
    return load(path, map_location=map_location, formats=META_FORMATS)


def meta_params_of(ck: dict[str, Any], which: str = "best") -> dict[str, Any]:
    """φ of a meta-training checkpoint: the best by held-out score, or the last.

    Reads both a slim export (``best_meta_params``/``meta_params``) and a training state
    (``best["meta_params"]``/``meta_params``).
    """
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    if which == "last":
        return ck["meta_params"]
    if "best_meta_params" in ck:
        return ck["best_meta_params"]
    best = ck.get("best")
    if isinstance(best, dict) and "meta_params" in best:
        return best["meta_params"]
    raise CheckpointError("the checkpoint holds no best meta-parameters")


def grad_evals_of(ck: dict[str, Any]) -> float:
    """What the checkpoint's meta-training cost, in gradient evaluations."""
    return float(ck.get("grad_evals", 0))
