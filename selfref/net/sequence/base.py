"""Small numeric pieces the sequence learners share: ``nn.Linear``'s init and a linear map.

Notation: b – batch, n – sequence length.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from selfref.params import Params

__all__ = ["uniform", "linear"]


def uniform(generator: torch.Generator, fan_in: int, *shape: int) -> Tensor:
    """``nn.Linear``'s default init U(−1/√fan_in, 1/√fan_in), drawn from ``generator``."""
    return (torch.rand(*shape, generator=generator) * 2 - 1) / math.sqrt(fan_in)


def linear(params: Params, name: str, x: Tensor) -> Tensor:
    """``x @ W.T + b`` with ``params[name + ".weight"]`` and (if present) ``".bias"``."""
    out = x @ params[f"{name}.weight"].T
    if f"{name}.bias" in params:
        out = out + params[f"{name}.bias"]
    return out
