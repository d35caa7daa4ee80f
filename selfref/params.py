"""Parameter dicts: the functional currency of selfref.

Every model here is a ``dict[str, Tensor]`` (``Params``) evaluated with
``torch.func.functional_call``; inner loops never mutate modules or ``.data``.
This module holds the small tree utilities the rest of the package shares:
maps over dicts, flatten/unflatten to one vector, norms, and a seeded
module-parameter extractor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "Params",
    "tree_map",
    "tree_map2",
    "tree_add",
    "tree_sub",
    "tree_scale",
    "tree_zeros_like",
    "tree_dot",
    "tree_norm",
    "tree_detach",
    "tree_to",
    "tree_clone",
    "flatten",
    "unflatten",
    "num_params",
    "module_params",
    "call",
    "all_finite",
]

Params = dict[str, Tensor]


def tree_map(fn: Callable[[Tensor], Tensor], tree: Mapping[str, Tensor]) -> Params:
    """Apply ``fn`` to every tensor of a parameter dict, keeping the keys and their order."""
    return {k: fn(v) for k, v in tree.items()}


def tree_map2(
    fn: Callable[[Tensor, Tensor], Tensor], a: Mapping[str, Tensor], b: Mapping[str, Tensor]
) -> Params:
    """Apply ``fn`` leafwise to two dicts with the same keys."""
    if a.keys() != b.keys():
        raise ValueError(f"parameter dicts differ in keys: {sorted(a)} vs {sorted(b)}")
    return {k: fn(a[k], b[k]) for k in a}


def tree_add(a: Mapping[str, Tensor], b: Mapping[str, Tensor], alpha: float = 1.0) -> Params:
    """``a + alpha * b`` leafwise."""
    return tree_map2(lambda x, y: x + alpha * y, a, b)


def tree_sub(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Params:
    """``a - b`` leafwise."""
    return tree_map2(lambda x, y: x - y, a, b)


def tree_scale(a: Mapping[str, Tensor], s: float | Tensor) -> Params:
    """``s * a`` leafwise."""
    return tree_map(lambda x: s * x, a)


def tree_zeros_like(a: Mapping[str, Tensor]) -> Params:
    return tree_map(torch.zeros_like, a)


def tree_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Sum over leaves of the elementwise product (a scalar tensor)."""
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def tree_norm(a: Mapping[str, Tensor]) -> Tensor:
    """Global L2 norm over all leaves."""
    leaves = list(a.values())
    total = torch.stack([(v.double() ** 2).sum() for v in leaves]).sum()
    return torch.sqrt(total).to(leaves[0].dtype)


def tree_detach(a: Mapping[str, Tensor]) -> Params:
    return tree_map(lambda x: x.detach(), a)


def tree_clone(a: Mapping[str, Tensor]) -> Params:
    return tree_map(lambda x: x.clone(), a)


def tree_to(
    a: Mapping[str, Tensor], device: Any = None, dtype: torch.dtype | None = None
) -> Params:
    """Move (and optionally cast floating) leaves to a device/dtype."""

    def move(x: Tensor) -> Tensor:
        if dtype is not None and x.is_floating_point():
            return x.to(device=device, dtype=dtype)
        return x.to(device=device)

    return tree_map(move, a)


def flatten(a: Mapping[str, Tensor]) -> Tensor:
    """Concatenate all leaves into one vector (keys in dict order)."""
    return torch.cat([v.reshape(-1) for v in a.values()])


def unflatten(vec: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Inverse of :func:`flatten`: split ``vec`` into tensors shaped like ``like``."""
    n = sum(v.numel() for v in like.values())
    if vec.numel() != n:
        raise ValueError(f"vector has {vec.numel()} elements, the parameter dict needs {n}")
    out: Params = {}
    i = 0
    for k, v in like.items():
        out[k] = vec[i : i + v.numel()].view_as(v)
        i += v.numel()
    return out


def num_params(a: Mapping[str, Tensor]) -> int:
    return sum(v.numel() for v in a.values())


def module_params(module: nn.Module) -> Params:
    """Detached copies of a module's parameters, keyed by their qualified names."""
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def call(module: nn.Module, params: Mapping[str, Tensor], *args: Any, **kwargs: Any) -> Any:
    """``functional_call(module, params, args)``: evaluate ``module`` with explicit weights."""
    return functional_call(module, dict(params), args, kwargs)


def all_finite(a: Mapping[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in a.values())
