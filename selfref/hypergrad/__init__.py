"""Exact arithmetic and hypergradient machinery (RMAD; Maclaurin, Duvenaud & Adams 2015).

- :mod:`selfref.hypergrad.exact` — int64 fixed point (radix 2^52) and the vectorized
  information buffer that makes multiplication by a momentum decay exactly reversible.
- :mod:`selfref.hypergrad.rmad` — forward/reverse SGD with momentum and the hypergradients of
  per-step per-layer log learning rates, logit momenta, per-layer log L2 and log init scales;
  ``method="unrolled"`` for autograd through the stored loop.
"""

from selfref.hypergrad.exact import (
    ExactRep,
    FixedPointOverflow,
    InfoBuffer,
    from_fixed,
    quantize_gamma,
    rational_gamma,
    to_fixed,
)
from selfref.hypergrad.rmad import (
    META_KINDS,
    Groups,
    Hypergrad,
    hypergradient,
    hypergradient_cost,
    init_meta,
    param_groups,
    sgd_momentum,
)

__all__ = [
    "ExactRep",
    "FixedPointOverflow",
    "InfoBuffer",
    "from_fixed",
    "to_fixed",
    "rational_gamma",
    "quantize_gamma",
    "META_KINDS",
    "Groups",
    "Hypergrad",
    "hypergradient",
    "hypergradient_cost",
    "init_meta",
    "param_groups",
    "sgd_momentum",
]
