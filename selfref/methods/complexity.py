"""Complexity control: one hypernetwork for a whole family of variational models.

Grebenkova, Bakhteev, Strijov 2021, "Variational optimization of deep learning model with
complexity control". The model's weights are mean-field Gaussian, q(w|λ) = N(μ(λ),
diag σ²(λ)), with prior p(w) = N(0, I). A hypernetwork maps the complexity weight λ to the
variational parameters (μ, log σ). Per minibatch the loss is the average over S = 5 draws of
λ, log-uniform on [1e-3, 1e2], of

    CE(y, f(x; w)) + λ · KL(q(w|λ) ‖ p(w)) / N,    w = μ(λ) + σ(λ) ⊙ ε,  ε ∼ N(0, I),

with N the number of training examples (section 3 of the paper). λ enters the hypernetwork
as its normalized logarithm t = (log λ − log λ_min) / (log λ_max − log λ_min) ∈ [0, 1].

Hypernetwork families (:class:`PivotHypernet`):

- ``linear``: μ(t) = (1 − t)·μ₀ + t·μ₁ (and the same for log σ) — interpolation between
  two weight tensors;
- ``piecewise``: piecewise-linear over K pivots t_k = k/(K − 1): between neighbouring
  pivots, the same interpolation of their tensors (``linear`` is K = 2);
- ``constant`` (K = 1): an ordinary variational network, trained at one fixed λ — the
  separately trained networks the paper compares against.

Pruning (section 4): weights are ranked by their signal-to-noise ratio μ²/σ² and the lowest
fraction (0%, 10%, …, 90%) is set to zero, biases kept; accuracy is that of the mean network
μ(λ) with the mask applied. Two rankings (``scope``):

- ``global`` (the paper's text): one ranking over all weights of all layers; exactly
  ⌊q·n⌋ of the n weights are pruned;
- ``layer`` (the authors' code, VarHyperNet ``code/src/mnist_utils.py``, ``delete_10``):
  each weight tensor is ranked on its own, and in a layer of n_l weights every weight whose
  SNR is at most the SNR at sorted position round(q·n_l) is pruned — round(q·n_l) + 1
  weights when SNRs are distinct, so the lowest-SNR weight of each layer goes even at q = 0,
  as in that code. Every layer keeps the same share, however its SNRs compare with the
  other layers'.

Cost: one gradient evaluation per (minibatch, λ draw) — the hypernetwork's S draws cost S per
minibatch, a separate network's single draw costs 1.

Notation: K – pivots, S – λ draws per batch, N – training examples, b – batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from einops import einsum
from torch import Tensor

from selfref.budget import Budget, CostCounter
from selfref.logging import Logger
from selfref.optim import check_lr_schedule, cosine_decay, make_optimizer
from selfref.params import Params, all_finite, tree_detach
from selfref.tasks import Task

__all__ = [
    "ComplexityConfig",
    "PivotHypernet",
    "VariationalFit",
    "FAMILIES",
    "PRUNE_FRACTIONS",
    "PRUNE_SCOPES",
    "kl_to_standard_normal",
    "sample_weights",
    "snr_prune_mask",
    "apply_mask",
    "sample_log_uniform",
    "train_variational",
    "train_hypernet",
    "train_separate",
    "pruning_curve",
    "steps_for_epochs",
    "budget_for",
]

FAMILIES = ("linear", "piecewise", "constant")
PRUNE_FRACTIONS: tuple[float, ...] = tuple(i / 10 for i in range(10))  # 0%, 10%, ..., 90%
PRUNE_SCOPES = ("global", "layer")  # one SNR ranking over all weights, or one per layer


@dataclass(frozen=True)
class ComplexityConfig:
    """Settings of variational training with complexity control (paper defaults)."""

    family: str = "linear"  # hypernetwork: "linear", "piecewise" (K pivots) or "constant"
    pivots: int = 5  # K, pivots of the piecewise-linear family (linear = 2, constant = 1)
    draws: int = 5  # S, λ draws per minibatch (paper: 5); a constant net uses 1
    lam_low: float = 1e-3  # λ ∼ log-uniform on [lam_low, lam_high] (paper: [1e-3, 1e2])
    lam_high: float = 1e2  # upper end of the λ range
    lr: float = 3e-3  # Adam step size for the hypernetwork's parameters
    init_log_sigma: float = -3.0  # initial log σ of every weight
    init_scale: float = 1.0  # initial μ: the task's initialization times this
    lr_schedule: str = "constant"  # "constant" (paper) or "cosine" decay to 0 (an option)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; valid: {', '.join(FAMILIES)}")
        if self.pivots < 2 and self.family == "piecewise":
            raise ValueError(f"piecewise family needs pivots >= 2, got {self.pivots}")
        if self.draws < 1:
            raise ValueError(f"draws must be >= 1, got {self.draws}")
        if not 0 < self.lam_low < self.lam_high:
            raise ValueError(
                f"need 0 < lam_low < lam_high, got lam_low={self.lam_low}, lam_high={self.lam_high}"
            )
        check_lr_schedule(self.lr_schedule)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    @property
    def num_pivots(self) -> int:
        return {"linear": 2, "piecewise": self.pivots, "constant": 1}[self.family]

    def normalize(self, lam: float | Tensor) -> Tensor:
        """t = (log λ − log λ_min) / (log λ_max − log λ_min) (0 at λ_min, 1 at λ_max)."""
        lam_t = torch.as_tensor(lam, dtype=torch.float64)
        lo, hi = math.log(self.lam_low), math.log(self.lam_high)
        return (torch.log(lam_t) - lo) / (hi - lo)


# ---------------------------------------------------------------------------------------------
# Variational pieces (pure functions)


def kl_to_standard_normal(mu: Mapping[str, Tensor], log_sigma: Mapping[str, Tensor]) -> Tensor:
    """KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ (σ² + μ² − 1 − 2 log σ), summed over all weights."""
    total = next(iter(mu.values())).new_zeros(())
    for k in mu:
        s = log_sigma[k]
        total = total + 0.5 * (torch.exp(2 * s) + mu[k] ** 2 - 1.0 - 2 * s).sum()
    return total


def sample_weights(
    mu: Mapping[str, Tensor], log_sigma: Mapping[str, Tensor], generator: torch.Generator
) -> Params:
    """Reparameterized draw w = μ + exp(log σ) ⊙ ε, ε ∼ N(0, I) from ``generator`` (CPU stream).

    Differentiable in μ and log σ; the noise is drawn in dict order, one tensor per entry.
    """
    out: Params = {}
    for k, m in mu.items():
        eps = torch.randn(m.shape, generator=generator, dtype=m.dtype).to(m.device)
        out[k] = m + torch.exp(log_sigma[k]) * eps
    return out


def snr_prune_mask(
    mu: Mapping[str, Tensor],
    log_sigma: Mapping[str, Tensor],
    fraction: float,
    scope: str = "global",
) -> dict[str, Tensor]:
    """Keep-masks that zero the ``fraction`` of weights with the lowest SNR μ²/σ².

    Only ``*.weight`` tensors are pruned; biases are always kept.

    Args:
        mu, log_sigma: the posterior's means and log standard deviations.
        fraction: share of the weights to prune, in [0, 1).
        scope: ``"global"`` — one ranking over every weight tensor, exactly
            ``floor(fraction · n_weights)`` pruned (ties broken by position); ``"layer"`` —
            Grebenkova et al.'s code: per weight tensor of n_l weights, every weight with SNR
            at most the SNR at sorted position ``round(fraction · n_l)`` (Python's round,
            clamped to n_l − 1) is pruned, ties included.

    Raises:
        ValueError: a fraction outside [0, 1) or an unknown scope.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"prune fraction must be in [0, 1), got {fraction}")
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"unknown prune scope {scope!r}; valid: {', '.join(PRUNE_SCOPES)}")
    names = [k for k in mu if k.endswith(".weight")]

    def snr_of(k: str) -> Tensor:
        return (mu[k] ** 2 / torch.exp(2 * log_sigma[k])).reshape(-1)

    masks: dict[str, Tensor] = {k: torch.ones_like(m, dtype=torch.bool) for k, m in mu.items()}
    if scope == "layer":
        for k in names:
            snr = snr_of(k)  # (n_l,)
            position = min(round(fraction * snr.numel()), snr.numel() - 1)
            threshold = torch.sort(snr).values[position]
            masks[k] = (snr > threshold).view(mu[k].shape)
        return masks
    snr = torch.cat([snr_of(k) for k in names])
    n_prune = int(math.floor(fraction * snr.numel() + 1e-9))
    keep_flat = torch.ones_like(snr, dtype=torch.bool)
    if n_prune:
        order = torch.argsort(snr, stable=True)
        keep_flat[order[:n_prune]] = False
    i = 0
    for k in names:
        n = mu[k].numel()
        masks[k] = keep_flat[i : i + n].view(mu[k].shape)
        i += n
    return masks


def apply_mask(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> Params:
    """Zero the pruned entries (``params * mask``)."""
    return {k: torch.where(masks[k], v, torch.zeros_like(v)) for k, v in params.items()}


def sample_log_uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    """``n`` draws of λ, log-uniform on [low, high] (float64, CPU)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))


# ---------------------------------------------------------------------------------------------
# The hypernetwork λ -> (μ, log σ)


@dataclass(frozen=True)
class PivotHypernet:
    """λ → (μ(λ), log σ(λ)) by piecewise-linear interpolation between K pivot tensors.

    φ = {``mu.<name>``: (K, *S), ``log_sigma.<name>``: (K, *S)}; pivots at t_k = k/(K − 1),
    t the normalized log λ (clamped to [0, 1]). K = 2 is the paper's linear family, K = 1 a
    constant (an ordinary variational network).
    """

    config: ComplexityConfig
    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def k(self) -> int:
        return self.config.num_pivots

    def init(self, base: Params) -> Params:
        phi: Params = {}
        for name, v in base.items():
            mu0 = (v.detach() * self.config.init_scale).expand(self.k, *v.shape).clone()
            phi[f"mu.{name}"] = mu0
            phi[f"log_sigma.{name}"] = torch.full_like(mu0, self.config.init_log_sigma)
        return phi

    def coefficients(self, lam: float | Tensor) -> Tensor:
        """Hat-function weights (K,) of the pivots at λ; they sum to 1."""
        if self.k == 1:
            return torch.ones(1, dtype=torch.float64)
        t = self.config.normalize(lam).clamp(0.0, 1.0)
        grid = torch.arange(self.k, dtype=torch.float64)
        return torch.clamp(1.0 - (t * (self.k - 1) - grid).abs(), min=0.0)  # (K,)

    def __call__(self, phi: Mapping[str, Tensor], lam: float | Tensor) -> tuple[Params, Params]:
        ref = next(iter(phi.values()))
        c = self.coefficients(lam).to(device=ref.device, dtype=ref.dtype)  # (K,)
        mu = {n: einsum(c, phi[f"mu.{n}"], "k, k ... -> ...") for n, _ in self.shapes}
        ls = {n: einsum(c, phi[f"log_sigma.{n}"], "k, k ... -> ...") for n, _ in self.shapes}
        return mu, ls


@dataclass
class VariationalFit:
    """A trained hypernetwork (or one variational network) and what training cost."""

    hypernet: PivotHypernet
    phi: Params
    grad_evals: int
    steps: int
    losses: list[float] = field(default_factory=list)
    fixed_lam: float | None = None  # the λ of a separately trained network
    status: str = "ok"

    def posterior(self, lam: float | None = None) -> tuple[Params, Params]:
        """(μ(λ), log σ(λ)), detached; a separate network ignores ``lam``."""
        lam_v = self.fixed_lam if lam is None else lam
        if lam_v is None:
            raise ValueError("posterior of a hypernetwork needs a λ")
        with torch.no_grad():
            mu, ls = self.hypernet(self.phi, lam_v)
        return tree_detach(mu), tree_detach(ls)


def _check_supervised(task: Task) -> None:
    if task.num_classes < 1 or task.full_batch("train") is None:
        raise ValueError(
            f"complexity control needs a supervised task (classes, an in-memory data set), got "
            f"{task.name!r}; valid: digits-mlp, digits-logreg, mnist-mlp"
        )


def train_variational(
    task: Task,
    config: ComplexityConfig,
    steps: int,
    seed: int = 0,
    *,
    fixed_lam: float | None = None,
    counter: CostCounter | None = None,
    logger: Logger | None = None,
    tag: str = "complexity",
    log_every: int = 10,
) -> VariationalFit:
    """Train the hypernetwork (``fixed_lam=None``) or one variational net at ``fixed_lam``.

    Each step takes minibatch ``step`` of the train split and averages, over the S draws of
    λ (or the one fixed λ), the loss CE + λ·KL(q(·|λ) ‖ N(0, I))/N at a reparameterized
    weight sample. Adam on φ.

    Args:
        task: a supervised task (``forward(params, x)``, ``data``).
        config: family, pivots, draws, λ range, learning rate, initialization.
        steps: minibatches (optimizer steps).
        seed: seeds the initialization, the λ draws, the weight noise and the batch order.
        fixed_lam: train one network at this λ (family must be ``constant``).
        counter: charged one gradient evaluation per (minibatch, draw) before each step.
        logger: receives ``<tag>/loss``, ``<tag>/kl`` every ``log_every`` steps.

    Returns:
        A :class:`VariationalFit` (status ``diverged`` if a loss becomes NaN/inf).
    """
    _check_supervised(task)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if (fixed_lam is None) == (config.family == "constant"):
        raise ValueError(
            "a constant family trains one network at a fixed λ (give fixed_lam); "
            f"family {config.family!r} with fixed_lam={fixed_lam} is not valid"
        )
    if fixed_lam is not None and not fixed_lam > 0:
        raise ValueError(f"fixed_lam must be > 0, got {fixed_lam}")
    gen = torch.Generator().manual_seed(seed)
    base = task.init_params(gen)
    hnet = PivotHypernet(config, tuple((k, tuple(v.shape)) for k, v in base.items()))
    phi = hnet.init(base)
    n_train = task.num_examples("train")
    draws = 1 if fixed_lam is not None else config.draws

    def objective(phi_: Params, batch: Any, lams: Tensor, noise_seed: int) -> tuple[Tensor, Any]:
        g = torch.Generator().manual_seed(noise_seed)
        total = phi_[next(iter(phi_))].new_zeros(())
        kl_sum = total
        for lam in lams:
            mu, ls = hnet(phi_, lam)
            w = sample_weights(mu, ls, g)
            kl = kl_to_standard_normal(mu, ls)
            total = total + task.loss(w, batch) + float(lam) * kl / n_train
            kl_sum = kl_sum + kl.detach()
        return total / len(lams), kl_sum / len(lams)

    def grad_fn(phi_: Params, *rest: Any) -> tuple[Params, tuple[Tensor, Tensor]]:
        # reverse mode on fresh leaves (the functional equivalent of torch.func's
        # grad_and_value(has_aux=True), with less per-step overhead); nothing is mutated
        leaves = {k: v.detach().requires_grad_(True) for k, v in phi_.items()}
        value, aux = objective(leaves, *rest)
        grads = torch.autograd.grad(value, list(leaves.values()))
        return dict(zip(leaves, grads)), (value.detach(), aux)

    adam = make_optimizer("adam")
    state = adam.init(phi)
    fit = VariationalFit(hnet, phi, 0, 0, fixed_lam=fixed_lam)
    for step in range(steps):
        if counter is not None:
            counter.spend(draws)
        if fixed_lam is not None:
            lams = torch.tensor([fixed_lam], dtype=torch.float64)
        else:
            lams = sample_log_uniform(draws, config.lam_low, config.lam_high, gen)
        noise_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        grads, (loss, kl) = grad_fn(phi, task.batch("train", step, seed), lams, noise_seed)
        fit.grad_evals += draws
        fit.steps = step + 1
        loss_v = float(loss)
        fit.losses.append(loss_v)
        if not math.isfinite(loss_v):
            fit.status = "diverged"
            break
        if logger is not None and step % log_every == 0:
            logger.scalar(f"{tag}/loss", loss_v, step)
            logger.scalar(f"{tag}/kl", kl, step)
        lr = config.lr
        if config.lr_schedule == "cosine":
            lr = config.lr * cosine_decay(step / steps)
        phi, state = adam.update(phi, grads, state, {"lr": lr})
    if fit.status == "ok" and not all_finite(phi):
        fit.status = "diverged"
    fit.phi = tree_detach(phi)
    return fit


def train_hypernet(
    task: Task,
    config: ComplexityConfig,
    steps: int,
    seed: int = 0,
    *,
    counter: CostCounter | None = None,
    logger: Logger | None = None,
) -> VariationalFit:
    """Train one hypernetwork over the λ range (cost ``steps · draws``)."""
    return train_variational(task, config, steps, seed, counter=counter, logger=logger, tag="hyper")


def train_separate(
    task: Task,
    lam: float,
    steps: int,
    seed: int = 0,
    *,
    config: ComplexityConfig | None = None,
    counter: CostCounter | None = None,
    logger: Logger | None = None,
) -> VariationalFit:
    """Train one ordinary variational network at fixed λ (cost ``steps``)."""
    base = config or ComplexityConfig()
    cfg = ComplexityConfig(**{**asdict(base), "family": "constant"})
    return train_variational(
        task,
        cfg,
        steps,
        seed,
        fixed_lam=lam,
        counter=counter,
        logger=logger,
        tag=f"separate/lambda_{lam:g}",
    )


@torch.no_grad()
def pruning_curve(
    task: Task,
    fit: VariationalFit,
    lam: float,
    fractions: Sequence[float] = PRUNE_FRACTIONS,
    split: str = "test",
    scope: str = "global",
) -> list[float]:
    """Accuracy on ``split`` of the mean network μ(λ) after SNR pruning of each fraction.

    ``scope`` is the ranking of :func:`snr_prune_mask` (``global`` or per ``layer``).
    """
    mu, ls = fit.posterior(lam)
    out = []
    for q in fractions:
        pruned = apply_mask(mu, snr_prune_mask(mu, ls, q, scope))
        out.append(float(task.evaluate(pruned, split)["accuracy"]))
    return out


def steps_for_epochs(task: Task, epochs: int) -> int:
    """Minibatches in ``epochs`` passes over the train split."""
    per_epoch = task.batches_per_epoch("train")  # type: ignore[attr-defined]
    return max(1, int(epochs) * int(per_epoch))


def budget_for(steps: int, draws: int) -> Budget:
    """The Budget a run of ``steps`` minibatches with ``draws`` λ draws each spends."""
    return Budget(grad_evals=max(1, steps * draws))
