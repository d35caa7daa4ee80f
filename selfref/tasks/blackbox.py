"""Black-box test functions on the unit cube: GP samples by random features, Branin, Hartmann.

The functions a learned black-box optimizer (Chen et al. 2017, "Learning to learn without
gradient descent by gradient descent", ICML) is meta-trained and tested on. Every function
here takes points of the unit cube ``[0, 1]^d`` and is differentiable in them (torch), so a
meta-trainer can backpropagate through its values; test functions are evaluated without
gradients like any black box.

- **GP samples** (Chen et al. 2017, section 2.2, "training function distribution"): draws
  from a zero-mean Gaussian-process prior with the squared-exponential (RBF) kernel
  ``k(x, x') = σ² exp(−‖x − x'‖² / (2ℓ²))``, isotropic length scale ℓ. Sampling a GP at the
  points an optimizer chooses one after another costs O(t³) per query; the paper instead
  draws functions in closed form with random Fourier features (Rahimi & Recht 2007):
  ``f(x) = σ √(2/m) Σ_j w_j cos(ω_jᵀx / ℓ + b_j)`` with ω_j ~ N(0, I_d), b_j ~ U[0, 2π),
  w_j ~ N(0, 1), whose covariance tends to k as the number of features m grows. A batch of
  n functions is a dict of stacked tensors (:func:`sample_gp`) evaluated with
  :func:`gp_eval`.
- **Branin** (2-d, domain [−5, 10] × [0, 15]), **Hartmann 3** and **Hartmann 6** ([0, 1]^d):
  the global-optimization benchmarks of Chen et al. 2017, section 3.2, in their standard
  definitions (Dixon & Szegő 1978), mapped onto the unit cube, with their known minima for
  regret.
- :func:`gp_posterior` and :func:`expected_improvement`: the GP posterior under the known
  kernel and the expected improvement EI(x | y_{1:t−1}) for minimization, which the paper's
  expected-improvement loss (section 2.1, L_EI) reads at training time.

Notation: n – functions in a batch, m – random features, d – input dimension, t – points.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "GPFunctions",
    "sample_gp",
    "gp_eval",
    "gp_posterior",
    "expected_improvement",
    "TestFunction",
    "branin",
    "hartmann3",
    "hartmann6",
    "BENCHMARKS",
    "benchmark",
    "domain_stats",
    "estimate_min",
    "cube_symmetry",
]

GPFunctions = dict[str, Tensor]  # {"omega": (n, m, d), "phase": (n, m), "w": (n, m), "ls": (n,)}


def sample_gp(
    generator: torch.Generator,
    n: int,
    dim: int,
    length_scales: Tensor,
    features: int = 256,
    variance: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> GPFunctions:
    """n GP-prior functions on [0, 1]^dim by random Fourier features (Rahimi & Recht 2007).

    Args:
        generator: the source of every random number.
        n: functions.
        dim: input dimension d.
        length_scales: (n,) the RBF length scale of each function.
        features: m, random features per function (more: closer to the exact kernel).
        variance: σ², the kernel's signal variance.
        dtype: of the returned tensors.

    Returns:
        ``{"omega": (n, m, d), "phase": (n, m), "w": (n, m), "ls": (n,), "var": (n,)}``.
    """
    if n < 1 or dim < 1 or features < 1:
        raise ValueError(f"n, dim and features must be >= 1, got {n}, {dim}, {features}")
    ls = torch.as_tensor(length_scales, dtype=dtype).reshape(-1)
    if ls.numel() != n or not bool((ls > 0).all()):
        raise ValueError(f"length_scales must be {n} positive numbers, got {ls.tolist()}")
    omega = torch.randn(n, features, dim, generator=generator, dtype=dtype)
    phase = torch.rand(n, features, generator=generator, dtype=dtype) * (2 * math.pi)
    w = torch.randn(n, features, generator=generator, dtype=dtype)
    return {"omega": omega, "phase": phase, "w": w, "ls": ls, "var": torch.full_like(ls, variance)}


def gp_eval(fns: GPFunctions, x: Tensor) -> Tensor:
    """Values of the n functions, each at its own points.

    Args:
        fns: from :func:`sample_gp`.
        x: (n, d) one point per function, or (n, t, d) t points per function.

    Returns:
        (n,) or (n, t).
    """
    single = x.dim() == 2
    xs = x.unsqueeze(1) if single else x  # (n, t, d)
    m = fns["w"].shape[1]
    proj = torch.einsum("ntd,nmd->ntm", xs, fns["omega"]) / fns["ls"][:, None, None]  # (n, t, m)
    feats = torch.cos(proj + fns["phase"][:, None, :])  # (n, t, m)
    scale = torch.sqrt(fns["var"] * 2.0 / m)[:, None]  # (n, 1)
    out = scale * torch.einsum("ntm,nm->nt", feats, fns["w"])  # (n, t)
    return out[:, 0] if single else out


def _rbf(a: Tensor, b: Tensor, ls: Tensor, var: Tensor) -> Tensor:
    """(n, s, d), (n, t, d) -> (n, s, t) kernel matrices."""
    d2 = (a.unsqueeze(2) - b.unsqueeze(1)).pow(2).sum(-1)  # (n, s, t)
    return var[:, None, None] * torch.exp(-0.5 * d2 / ls[:, None, None] ** 2)


def gp_posterior(
    x_obs: Tensor, y_obs: Tensor, x: Tensor, ls: Tensor, var: Tensor, noise: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Posterior mean and standard deviation of a zero-mean RBF GP at one point per function.

    Args:
        x_obs: (n, t, d) observed points. y_obs: (n, t) their values.
        x: (n, d) where to predict. ls, var: (n,) the kernel's length scale and variance.
        noise: observation-noise variance (a jitter keeping the Cholesky factor stable).

    Returns:
        mean (n,), std (n,), differentiable in every input.
    """
    t = x_obs.shape[1]
    eye = torch.eye(t, dtype=x_obs.dtype, device=x_obs.device)
    K = _rbf(x_obs, x_obs, ls, var) + noise * eye  # (n, t, t)
    L = torch.linalg.cholesky(K)  # (n, t, t)
    k = _rbf(x_obs, x.unsqueeze(1), ls, var)  # (n, t, 1)
    alpha = torch.cholesky_solve(y_obs.unsqueeze(-1), L)  # (n, t, 1)
    mean = (k * alpha).sum(dim=(1, 2))  # (n,)
    v = torch.linalg.solve_triangular(L, k, upper=False)  # (n, t, 1)
    var_post = (var - v.pow(2).sum(dim=(1, 2))).clamp_min(1e-12)  # (n,)
    return mean, var_post.sqrt()


def expected_improvement(mean: Tensor, std: Tensor, best: Tensor) -> Tensor:
    """EI for minimization: E[max(best − f, 0)] with f ~ N(mean, std²); all (n,)."""
    z = (best - mean) / std
    normal = torch.distributions.Normal(torch.zeros_like(z), torch.ones_like(z))
    return (best - mean) * normal.cdf(z) + std * torch.exp(normal.log_prob(z))


# -- the global-optimization benchmarks ---------------------------------------------------


@dataclass(frozen=True)
class TestFunction:
    """A benchmark function on the unit cube.

    Attributes:
        name: registry name.
        dim: input dimension d.
        fn: (..., d) unit-cube points -> (...) values.
        minimum: the known global minimum value (for regret).
        argmin: one minimizer, in unit-cube coordinates.
    """

    __test__ = False  # not a pytest class

    name: str
    dim: int
    fn: Callable[[Tensor], Tensor]
    minimum: float
    argmin: tuple[float, ...]

    def __call__(self, u: Tensor) -> Tensor:
        return self.fn(u)


def _branin(u: Tensor) -> Tensor:
    x1 = -5.0 + 15.0 * u[..., 0]
    x2 = 15.0 * u[..., 1]
    b, c, r, s, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 6.0, 10.0, 1 / (8 * math.pi)
    return (x2 - b * x1**2 + c * x1 - r) ** 2 + s * (1 - t) * torch.cos(x1) + s


_H_ALPHA = (1.0, 1.2, 3.0, 3.2)
_H3_A = ((3.0, 10, 30), (0.1, 10, 35), (3.0, 10, 30), (0.1, 10, 35))
_H3_P = ((3689, 1170, 2673), (4699, 4387, 7470), (1091, 8732, 5547), (381, 5743, 8828))
_H6_A = (
    (10.0, 3, 17, 3.5, 1.7, 8),
    (0.05, 10, 17, 0.1, 8, 14),
    (3.0, 3.5, 1.7, 10, 17, 8),
    (17.0, 8, 0.05, 10, 0.1, 14),
)
_H6_P = (
    (1312, 1696, 5569, 124, 8283, 5886),
    (2329, 4135, 8307, 3736, 1004, 9991),
    (2348, 1451, 3522, 2883, 3047, 6650),
    (4047, 8828, 8732, 5743, 1091, 381),
)


def _hartmann(A: tuple[tuple[float, ...], ...], P: tuple[tuple[int, ...], ...]) -> Callable:
    def fn(u: Tensor) -> Tensor:
        a = torch.tensor(A, dtype=u.dtype, device=u.device)  # (4, d)
        p = torch.tensor(P, dtype=u.dtype, device=u.device) * 1e-4  # (4, d)
        alpha = torch.tensor(_H_ALPHA, dtype=u.dtype, device=u.device)  # (4,)
        inner = (a * (u.unsqueeze(-2) - p) ** 2).sum(-1)  # (..., 4)
        return -(alpha * torch.exp(-inner)).sum(-1)

    return fn


branin = TestFunction("branin", 2, _branin, 0.397887357729738, (0.5427728, 0.15166667))
hartmann3 = TestFunction(
    "hartmann3", 3, _hartmann(_H3_A, _H3_P), -3.86278214782076, (0.114614, 0.555649, 0.852547)
)
hartmann6 = TestFunction(
    "hartmann6",
    6,
    _hartmann(_H6_A, _H6_P),
    -3.32236801141551,
    (0.20168952, 0.15001069, 0.47687398, 0.27533243, 0.31165162, 0.65730054),
)

BENCHMARKS: dict[str, TestFunction] = {f.name: f for f in (branin, hartmann3, hartmann6)}


def benchmark(name: str) -> TestFunction:
    """A benchmark by name (ValueError lists the valid ones)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown test function {name!r}; valid: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def domain_stats(
    fn: Callable[[Tensor], Tensor], dim: int, points: int = 4096
) -> tuple[float, float]:
    """Mean and standard deviation of ``fn`` over the unit cube (a scrambled Sobol sample,
    seed 0): the affine map that puts a test function on the training prior's scale."""
    u = torch.quasirandom.SobolEngine(dim, scramble=True, seed=0).draw(points, dtype=torch.float64)
    with torch.no_grad():
        y = fn(u)
    return float(y.mean()), float(y.std())


def estimate_min(
    fn: Callable[[Tensor], Tensor], dim: int, points: int = 8192, starts: int = 8, steps: int = 150
) -> float:
    """An estimate of min ``fn`` on the unit cube (for the regret of GP samples, whose
    minimum has no closed form): the best of a Sobol sample, polished from its ``starts``
    best points by projected Adam."""
    u = torch.quasirandom.SobolEngine(dim, scramble=True, seed=1).draw(points, dtype=torch.float64)
    with torch.no_grad():
        y = fn(u)
    best = float(y.min())
    x = u[torch.argsort(y)[:starts]].clone().requires_grad_(True)  # (starts, d)
    opt = torch.optim.Adam([x], lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        fn(x).sum().backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
    with torch.no_grad():
        best = min(best, float(fn(x).min()))
    return best


def cube_symmetry(dim: int, seed: int) -> Callable[[Tensor], Tensor]:
    """A random symmetry of [0, 1]^dim from ``seed``: a permutation of the axes, then a flip
    (u ↦ 1 − u) of each axis with probability 1/2 (2^d·d! symmetries in all).

    A deterministic optimizer run on f∘S for a random S is a differently seeded run on f
    (the function stays continuous, unlike under a random shift modulo 1).
    """
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(dim, generator=g)
    flip = torch.rand(dim, generator=g) < 0.5

    def apply(u: Tensor) -> Tensor:
        u = u[..., perm]
        return torch.where(flip, 1.0 - u, u)

    return apply
