"""Small statistics used by the benchmarks' comparisons."""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["paired_difference"]


def paired_difference(a: Tensor, b: Tensor) -> tuple[float, float]:
    """Mean of ``a − b`` over paired per-sequence hits and its standard error."""
    if a.shape != b.shape or a.dim() != 1 or a.numel() < 2:
        raise ValueError(f"need two paired 1-d hit vectors, got {tuple(a.shape)}, {tuple(b.shape)}")
    d = a.double() - b.double()
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))
