"""Packing: a parameter dict as one vector, and per-tensor reductions over it.

The analyzing model and the ``lopt`` core work per coordinate, with a few statistics per
parameter tensor (means, norms, cosines). Computed tensor by tensor, a step dispatches every
op once per tensor, and on the small nets of meta-training that dispatch, not arithmetic, is
most of a meta-step's time (profile in ``benchmarks/lopt_packed.py``). :class:`Segments`
describes the tensors of one ``Params`` dict packed end to end into one vector (dict order,
each flattened row-major, as :func:`selfref.params.flatten`), so that the same step runs once
on all coordinates: per-tensor sums by ``index_add`` over the segment ids, per-tensor values
spread back to coordinates by indexing. It is the same mathematics as the per-tensor loops;
sums are accumulated in another order, so results agree to float rounding, not bit for bit.

Packed tensors carry a leading instance dimension m (m instances of one task, the same
layout; m = 1 for one): vectors are (m, n), features (m, n, F), per-tensor values (m, T, ...),
so that m instances run as one batch without ``torch.func.vmap``'s per-op cost. Every op is
differentiable and works under ``vmap`` too (the ids are unbatched constants).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from selfref.params import Params

__all__ = ["Segments", "segments_of", "PACKED"]

PACKED = "*"  # the one key of a packed Params dict (``{PACKED: (n,)}``)


class Segments:
    """The layout of T parameter tensors packed into one vector of n coordinates.

    Args:
        names: the tensors' names, in packing (dict) order.
        shapes: their shapes.
        device, dtype: where the per-tensor counts live and their float type.

    Attributes:
        sizes: coordinates per tensor (T ints).
        ids: (n,) int64, the tensor each coordinate belongs to.
        starts: (T,) int64, each tensor's first coordinate.
        counts: (T,) the sizes as floats (for means).
    """

    def __init__(
        self,
        names: tuple[str, ...],
        shapes: tuple[tuple[int, ...], ...],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        if len(names) != len(shapes) or not names:
            raise ValueError(f"need one shape per name and at least one tensor, got {names}")
        self.names, self.shapes = names, shapes
        self.sizes = tuple(math.prod(s) for s in shapes)
        if min(self.sizes) < 1:
            raise ValueError(f"cannot pack an empty tensor: shapes {shapes}")
        self.n, self.t = sum(self.sizes), len(names)
        sizes = torch.tensor(self.sizes, device=device)
        self.ids = torch.repeat_interleave(torch.arange(self.t, device=device), sizes)
        self.starts = torch.cumsum(sizes, 0) - sizes
        self.counts = sizes.to(dtype)

    def pack(self, tensors: Params) -> Tensor:
        """{name: (m, *shape)} (these names and shapes after the instance dimension) ->
        (m, n)."""
        return torch.cat([tensors[k].flatten(1) for k in self.names], dim=1)

    def unpack(self, flat: Tensor) -> Params:
        """(m, n) -> {name: (m, *shape)} (views of ``flat``)."""
        parts = torch.split(flat, list(self.sizes), dim=1)
        return {k: p.view(-1, *s) for k, p, s in zip(self.names, parts, self.shapes)}

    def sum(self, x: Tensor) -> Tensor:
        """Per-tensor sums of ``x`` (m, n, ...) -> (m, T, ...)."""
        shape = (x.shape[0], self.t, *x.shape[2:])
        return x.new_zeros(shape).index_add(1, self.ids, x)

    def mean(self, x: Tensor) -> Tensor:
        """Per-tensor means of ``x`` (m, n, ...) -> (m, T, ...)."""
        counts = self.counts.reshape(self.t, *([1] * (x.dim() - 2)))
        return self.sum(x) / counts

    def spread(self, v: Tensor) -> Tensor:
        """Per-tensor values (m, T, ...) -> every coordinate's (m, n, ...)."""
        return v.index_select(1, self.ids)

    def first(self, x: Tensor) -> Tensor:
        """Each tensor's first coordinate of ``x`` (m, n, ...) -> (m, T, ...)."""
        return x.index_select(1, self.starts)

    def cosine(self, a: Tensor, b: Tensor) -> Tensor:
        """Per-tensor cos(a, b) of two packed vectors (m, n) -> (m, T), 0 where either is 0
        (the packed form of the ``lopt`` core's per-tensor cosine)."""
        dots = self.sum(torch.stack([a * b, a * a, b * b], dim=-1))  # (m, T, 3)
        return dots[..., 0] / (dots[..., 1].sqrt() * dots[..., 2].sqrt() + 1e-12)


@lru_cache(maxsize=64)
def _segments(
    names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...], device: str, dtype: torch.dtype
) -> Segments:
    return Segments(names, shapes, torch.device(device), dtype)


def segments_of(params: Params, batched: bool = True) -> Segments:
    """The :class:`Segments` of ``params`` (cached by layout): with ``batched``, tensors of
    m instances (the leading dimension is not part of the layout), else one instance's."""
    ref = next(iter(params.values()))
    names = tuple(params)
    shapes = tuple(tuple(v.shape[int(batched) :]) for v in params.values())
    return _segments(names, shapes, str(ref.device), ref.dtype)
