"""A distribution of small training tasks for meta-training learned optimizers, and its tasks.

Learned optimizers generalize when they are meta-trained on many, varied tasks with
augmentation (Metz et al. 2020, "Tasks, stability, architecture, and compute", section 3;
Metz et al. 2022, VeLO, section 4.1). :class:`TaskDistribution` samples a
:class:`TaskSpec` from one integer seed — what data, what model, what augmentation — and
:func:`build_task` turns a spec into a :class:`SampledTask` (a :class:`~selfref.tasks.Task`).
Everything comes from scikit-learn's bundled data sets and synthetic generators; nothing is
downloaded.

The meta-training distribution (:data:`META_TRAIN_SOURCES`, :class:`DistributionConfig`
defaults):

- data: ``digits`` (a random subset of 2–10 classes), ``breast_cancer``,
  ``classification`` (``make_classification`` with sampled dimension, classes, clusters,
  separation and label noise), ``blobs`` (``make_blobs``) and ``quadratic`` (least squares
  on a design with a sampled condition number: a quadratic loss, with minibatches); as an
  option (:data:`EXTRA_META_SOURCES`), ``gp_regression`` — nonlinear regression, the
  target a sample of a Gaussian process with an RBF kernel at Gaussian inputs (random
  length scale) plus noise, learned by MLPs as well as linear models (the defaults have no
  MLP regression at all), and, as another option (``swap_sources``: a share of the MLP
  classification tasks swapped to it), ``xor`` — the parity of the signs of 2 or 3
  Gaussian inputs, a problem with no linear signal whose loss stays on a plateau at chance
  until the hidden units form, and which tuned Adam leaves with learning rates of 0.02–0.1;
- models: MLPs with 1–2 hidden layers of 8–64 units and relu, tanh or sigmoid units, and
  logistic regression (no hidden layer); quadratics train a linear model on MSE;
- augmentation: a random input projection to a sampled dimension, per-feature rescaling,
  label permutation, a parameter-scale reparameterization (each weight tensor is stored
  divided by a sampled factor c and multiplied by c in the forward pass, so the function is
  unchanged but the optimizer sees parameters c⁻¹× and gradients c× as large), sampled batch
  sizes (16–128) and a sampled fraction of the horizon; label noise on classification tasks
  (``label_noise_prob`` < 1 leaves some tasks clean, so their training loss can fall
  towards 0, as it does on clean data sets outside the distribution).

Options no preset uses (each a selection round's recipe): four more hidden units (softsign,
hardtanh, relu6, sin; round 28) and ``digits_pool = "train"`` (round 29), which draws the
digits tasks from the train split of the one fixed split every digits task here validates and
tests on, so that no meta-training objective reads those val or test images.

Data kinds for choosing among meta-trained optimizers live here too
(:data:`SELECTION_SOURCES`: Friedman #2 and #3, a Swiss roll cut into bands, sparse
uncorrelated regression; with silu and leaky-relu units, which nothing else uses), and so do
the held-out data kinds (:data:`HELDOUT_SOURCES`: wine, iris, moons, circles,
gaussian quantiles, Hastie's 10-d problem, diabetes and Friedman #1 regression) so the
evaluation suite can build its tasks from the same pieces; :meth:`TaskDistribution.contains`
says whether a spec could ever be drawn, which the suite uses to prove it is disjoint.

Splits: 60/20/20 train/val/test (stratified for classification), inputs standardized with
the train split's statistics (before projection and rescaling). Regression targets are
standardized with the train split's statistics too.

Notation: b – batch, d – input features, c – classes (or regression outputs), h – hidden.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from selfref.params import Params
from selfref.tasks.base import SupervisedTask, check_split, resolve_device
from selfref.tasks.digits import digits_split_indices

__all__ = [
    "TaskSpec",
    "DistributionConfig",
    "TaskDistribution",
    "SampledTask",
    "build_task",
    "SOURCES",
    "META_TRAIN_SOURCES",
    "EXTRA_META_SOURCES",
    "HELDOUT_SOURCES",
    "SELECTION_SOURCES",
    "SPEC_ACTIVATIONS",
    "DIGITS_POOLS",
]

DIGITS_POOLS = ("all", "train")  # TaskSpec.digits_pool


def _check_digits_pool(pool: str) -> None:
    if pool not in DIGITS_POOLS:
        raise ValueError(f"unknown digits_pool {pool!r}; valid: {', '.join(DIGITS_POOLS)}")


SPEC_ACTIVATIONS = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": torch.nn.functional.gelu,
    "elu": torch.nn.functional.elu,
    "softplus": torch.nn.functional.softplus,
    "silu": torch.nn.functional.silu,  # the selection suite's only
    "leaky_relu": torch.nn.functional.leaky_relu,  # the selection suite's only
    # sampled by no preset; round 28's recipe (experiments/rounds/round28.md) adds them to
    # the meta-training activations: none is a held-out or a selection unit
    "softsign": torch.nn.functional.softsign,
    "hardtanh": torch.nn.functional.hardtanh,
    "relu6": torch.nn.functional.relu6,
    "sin": torch.sin,
}

# data kind -> "classification" or "regression"
SOURCES: dict[str, str] = {
    # meta-training
    "digits": "classification",
    "breast_cancer": "classification",
    "classification": "classification",
    "blobs": "classification",
    "quadratic": "regression",
    "gp_regression": "regression",  # an option (EXTRA_META_SOURCES), not a default
    "xor": "classification",  # an option (EXTRA_META_SOURCES, swap_sources), not a default
    # held-out only
    "wine": "classification",
    "iris": "classification",
    "moons": "classification",
    "circles": "classification",
    "gaussian_quantiles": "classification",
    "hastie": "classification",
    "diabetes": "regression",
    "friedman1": "regression",
    # the selection (out-of-distribution validation) suite only
    "friedman2": "regression",
    "friedman3": "regression",
    "swiss_roll": "classification",
    "sparse_uncorrelated": "regression",
}
META_TRAIN_SOURCES: tuple[str, ...] = (
    "digits",
    "breast_cancer",
    "classification",
    "blobs",
    "quadratic",
)
# meta-training kinds a distribution may add to the defaults (never held out or selected on)
EXTRA_META_SOURCES: tuple[str, ...] = ("gp_regression", "xor")
SELECTION_SOURCES: tuple[str, ...] = ("friedman2", "friedman3", "swiss_roll", "sparse_uncorrelated")
HELDOUT_SOURCES: tuple[str, ...] = tuple(
    s for s in SOURCES if s not in META_TRAIN_SOURCES + EXTRA_META_SOURCES + SELECTION_SOURCES
)


@dataclass(frozen=True)
class TaskSpec:
    """Everything that defines one sampled task (plain data; ``to_dict`` for logs).

    Attributes:
        data: data kind (a key of :data:`SOURCES`).
        data_seed: seeds the generator, the split, the projection and the permutation.
        hidden: hidden layer sizes (() = a linear model: logistic or least squares).
        activation: hidden nonlinearity (a key of :data:`SPEC_ACTIVATIONS`).
        batch_size: minibatch size.
        n_samples: examples drawn from a synthetic generator (ignored for bundled sets).
        n_features: input dimension of a synthetic generator (ignored for bundled sets).
        n_classes: classes of a synthetic generator, or the class subset of ``digits``.
        difficulty: the generator's knob (class separation, cluster std, noise,
            log10 condition number for ``quadratic``).
        proj_dim: input projection to this many dimensions (0 = none).
        feature_log_std: per-feature rescaling x_j · exp(N(0, s²)) (0 = none).
        permute_labels: relabel the classes with a random permutation.
        label_noise: fraction of labels (in every split) replaced by a uniformly random
            class, so no sampled task is separable and its loss stays bounded away from 0.
        param_scale: reparameterization factor c (1 = none; see the module docstring).
        horizon_frac: fraction of the meta-trainer's horizon this task runs for.
        digits_pool: ``"all"`` of digits' 1,797 images, or ``"train"``: only the train split
            of the digits tasks' fixed split (split seed 0), so that nothing meta-trained on
            the task reads an example those tasks validate or test on (``selfref compare``'s
            default task, the selection score's digits part). Ignored for other data.
    """

    data: str
    data_seed: int = 0
    hidden: tuple[int, ...] = (32,)
    activation: str = "relu"
    batch_size: int = 64
    n_samples: int = 1000
    n_features: int = 16
    n_classes: int = 3
    difficulty: float = 1.0
    proj_dim: int = 0
    feature_log_std: float = 0.0
    permute_labels: bool = False
    label_noise: float = 0.0
    param_scale: float = 1.0
    horizon_frac: float = 1.0
    digits_pool: str = "all"

    def __post_init__(self) -> None:
        _check_digits_pool(self.digits_pool)
        if self.data not in SOURCES:
            raise ValueError(f"unknown data {self.data!r}; valid: {', '.join(SOURCES)}")
        if self.activation not in SPEC_ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; valid: {', '.join(SPEC_ACTIVATIONS)}"
            )
        if self.batch_size < 1 or any(h < 1 for h in self.hidden):
            raise ValueError(f"bad batch size {self.batch_size} or hidden sizes {self.hidden}")
        if not self.param_scale > 0 or not 0 < self.horizon_frac <= 1:
            raise ValueError(
                f"param_scale must be > 0 and horizon_frac in (0, 1], got "
                f"{self.param_scale}, {self.horizon_frac}"
            )

    @property
    def kind(self) -> str:
        return SOURCES[self.data]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        if d["digits_pool"] == "all":  # the default is left out: specs written before it match
            del d["digits_pool"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskSpec:
        d = dict(d)
        d["hidden"] = tuple(int(h) for h in d.get("hidden", ()))
        return cls(**d)

    def label(self) -> str:
        """A short readable name, e.g. ``digits-mlp32x2-relu``."""
        model = "linear" if not self.hidden else f"mlp{'x'.join(str(h) for h in self.hidden)}"
        return f"{self.data}-{model}-{self.activation if self.hidden else 'none'}"


@dataclass(frozen=True)
class DistributionConfig:
    """The meta-training distribution; every range is inclusive."""

    sources: tuple[str, ...] = META_TRAIN_SOURCES  # data kinds sampled
    source_weights: tuple[float, ...] = (3.0, 2.0, 3.0, 2.0, 1.0)  # their odds (len(sources))
    width: tuple[int, int] = (8, 64)  # hidden units, log-uniform
    depth: tuple[int, int] = (1, 2)  # hidden layers of an MLP, uniform
    linear_prob: float = 0.25  # probability of a linear model (logistic regression)
    activations: tuple[str, ...] = ("relu", "tanh", "sigmoid")  # sampled uniformly
    batch_sizes: tuple[int, ...] = (16, 32, 64, 128)  # sampled uniformly
    n_samples: tuple[int, int] = (300, 1500)  # synthetic generators' examples
    n_features: tuple[int, int] = (4, 32)  # synthetic generators' input dimension
    n_classes: tuple[int, int] = (2, 6)  # synthetic generators' classes
    digits_classes: tuple[int, int] = (2, 10)  # class subset of digits
    proj_prob: float = 0.5  # probability of a random input projection
    proj_ratio: tuple[float, float] = (0.5, 2.0)  # projected dim / input dim
    feature_log_std: tuple[float, float] = (0.0, 1.0)  # per-feature rescaling strength
    permute_prob: float = 0.5  # probability of a label permutation
    label_noise: tuple[float, float] = (0.02, 0.1)  # fraction of random labels, uniform
    label_noise_prob: float = 1.0  # probability a classification task has label noise (else 0)
    param_scale: tuple[float, float] = (0.3, 3.0)  # reparameterization factor, log-uniform
    param_scale_prob: float = 0.5  # probability of a reparameterization (else c = 1)
    horizon_frac: tuple[float, float] = (0.5, 1.0)  # fraction of the horizon, uniform
    digits_pool: str = "all"  # "train": digits tasks draw from the digits tasks' train split
    # with probability swap_prob an MLP task's data kind becomes one of swap_sources (drawn
    # from a stream of its own, every other field kept: paired with the distribution
    # without it, task for task); () and 0 in every preset
    swap_sources: tuple[str, ...] = ()
    swap_prob: float = 0.0

    def __post_init__(self) -> None:
        bad = [s for s in self.sources if s not in SOURCES]
        if bad or not self.sources:
            raise ValueError(f"unknown data source(s) {bad}; valid: {', '.join(SOURCES)}")
        if len(self.source_weights) != len(self.sources) or min(self.source_weights) < 0:
            raise ValueError(
                f"source_weights {self.source_weights} must be {len(self.sources)} numbers >= 0"
            )
        bad = [a for a in self.activations if a not in SPEC_ACTIVATIONS]
        if bad or not self.activations:
            raise ValueError(f"unknown activation(s) {bad}; valid: {', '.join(SPEC_ACTIVATIONS)}")
        for name in ("width", "depth", "n_samples", "n_features", "n_classes", "digits_classes"):
            lo, hi = getattr(self, name)
            if lo > hi or lo < 0:
                raise ValueError(f"{name} range must be 0 <= low <= high, got {(lo, hi)}")
        if self.width[0] < 1 or self.n_classes[0] < 2 or self.digits_classes[0] < 2:
            raise ValueError("width >= 1 and at least 2 classes are required")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        _check_digits_pool(self.digits_pool)
        for name in ("param_scale", "proj_ratio"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} range must satisfy 0 < low <= high, got {(lo, hi)}")
        bad = [d for d in self.swap_sources if SOURCES.get(d) != "classification"]
        if bad or (self.swap_prob > 0 and not self.swap_sources):
            raise ValueError(
                f"swap_sources must name classification data kinds (swap_prob "
                f"{self.swap_prob}), got {self.swap_sources}"
            )
        for name in (
            "label_noise_prob",
            "param_scale_prob",
            "proj_prob",
            "permute_prob",
            "swap_prob",
        ):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        lo, hi = self.horizon_frac
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"horizon_frac must satisfy 0 < low <= high <= 1, got {(lo, hi)}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistributionConfig:
        opts: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**opts)


def _loguniform_int(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


class TaskDistribution:
    """Samples :class:`TaskSpec` s from one seed each.

    Args:
        config: see :class:`DistributionConfig`.

    Example:
        >>> dist = TaskDistribution()
        >>> spec = dist.sample(0)
        >>> spec == dist.sample(0), dist.contains(spec)
        (True, True)
    """

    def __init__(self, config: DistributionConfig | None = None) -> None:
        self.config = config or DistributionConfig()

    def sample(self, seed: int) -> TaskSpec:
        """The spec of task ``seed`` (deterministic)."""
        c = self.config
        rng = np.random.default_rng([int(seed), 0x7A5C])
        w = np.asarray(c.source_weights, dtype=np.float64)
        data = str(rng.choice(list(c.sources), p=w / w.sum()))
        depth = int(rng.integers(c.depth[0], c.depth[1] + 1))
        if data == "quadratic" or rng.uniform() < c.linear_prob:
            depth = 0  # a linear model: logistic regression, or least squares
        width = _loguniform_int(rng, *c.width)
        hidden = (width,) * depth
        n_samples = int(rng.integers(c.n_samples[0], c.n_samples[1] + 1))
        n_features = int(rng.integers(c.n_features[0], c.n_features[1] + 1))
        if data == "digits":
            n_classes = int(rng.integers(c.digits_classes[0], c.digits_classes[1] + 1))
        else:
            n_classes = int(rng.integers(c.n_classes[0], c.n_classes[1] + 1))
        difficulty = {
            "classification": float(rng.uniform(0.5, 2.0)),  # class_sep
            "blobs": float(rng.uniform(0.5, 3.0)),  # cluster_std
            "quadratic": float(rng.uniform(0.0, 3.0)),  # log10 condition number
        }.get(data, 1.0)
        if data == "gp_regression":  # drawn only here, so the default distribution's specs stay
            difficulty = float(rng.uniform(0.1, 0.5))  # noise sd / the target's sd
        d_in = _input_dim(data, n_features)
        proj_dim = 0
        if rng.uniform() < c.proj_prob:
            ratio = math.exp(rng.uniform(math.log(c.proj_ratio[0]), math.log(c.proj_ratio[1])))
            proj_dim = max(2, int(round(d_in * ratio)))
        param_scale = 1.0
        if rng.uniform() < c.param_scale_prob:
            lo, hi = c.param_scale
            param_scale = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        spec = TaskSpec(
            data=data,
            data_seed=int(rng.integers(0, 2**31 - 1)),
            hidden=hidden,
            activation=str(rng.choice(list(c.activations))),
            batch_size=int(rng.choice(list(c.batch_sizes))),
            n_samples=n_samples,
            n_features=n_features,
            n_classes=n_classes,
            difficulty=difficulty,
            proj_dim=proj_dim,
            feature_log_std=float(rng.uniform(*c.feature_log_std)),
            permute_labels=bool(rng.uniform() < c.permute_prob) and SOURCES[data] != "regression",
            label_noise=float(rng.uniform(*c.label_noise))
            if SOURCES[data] != "regression"
            else 0.0,
            param_scale=param_scale,
            horizon_frac=float(rng.uniform(*c.horizon_frac)),
            digits_pool=c.digits_pool if data == "digits" else "all",
        )
        # drawn last, and only when asked for, so every spec of a distribution with
        # label_noise_prob = 1 (the default) is the one it always was
        if c.label_noise_prob < 1 and rng.uniform() >= c.label_noise_prob:
            spec = replace(spec, label_noise=0.0)
        if c.swap_prob > 0 and hidden and SOURCES[data] == "classification":
            swap = np.random.default_rng([int(seed), 0x5A1B])  # its own stream: paired specs
            if swap.uniform() < c.swap_prob:
                spec = replace(spec, data=str(swap.choice(list(c.swap_sources))))
        return spec

    def contains(self, spec: TaskSpec) -> bool:
        """Whether ``spec`` could be drawn by :meth:`sample` (data, model, sizes, batch)."""
        c = self.config
        sources = c.sources + (c.swap_sources if c.swap_prob > 0 else ())
        if spec.data not in sources or spec.batch_size not in c.batch_sizes:
            return False
        if spec.hidden and not c.depth[0] <= len(spec.hidden) <= c.depth[1]:
            return False
        if not spec.hidden and not (c.linear_prob > 0 or "quadratic" in c.sources):
            return False
        if spec.hidden and (
            spec.activation not in c.activations
            or any(not c.width[0] <= h <= c.width[1] for h in spec.hidden)
        ):
            return False
        return True


def _input_dim(data: str, n_features: int) -> int:
    fixed = {"digits": 64, "breast_cancer": 30, "wine": 13, "iris": 4, "moons": 2,
             "circles": 2, "hastie": 10, "diabetes": 10, "friedman2": 4, "friedman3": 4,
             "swiss_roll": 3}  # fmt: skip
    if data == "xor":  # at most 8 inputs, so a parity of 3 is learnable from 300 examples
        return min(n_features, 8)
    return fixed.get(data, n_features)


@lru_cache(maxsize=32)
def _raw_data(
    data: str,
    seed: int,
    n_samples: int,
    n_features: int,
    n_classes: int,
    difficulty: float,
    digits_pool: str = "all",
) -> tuple[np.ndarray, np.ndarray]:
    """(x (n, d) float64, y (n,) int64 or (n, 1) float64) before any split or augmentation."""
    from sklearn import datasets as skd

    rs = seed % (2**31 - 1)
    if data == "digits":
        x, y = skd.load_digits(return_X_y=True)
        if digits_pool == "train":
            keep_rows = digits_split_indices(0)["train"]
            x, y = x[keep_rows], y[keep_rows]
        rng = np.random.default_rng([seed, 1])
        keep = np.sort(rng.choice(10, size=min(10, max(2, n_classes)), replace=False))
        mask = np.isin(y, keep)
        x, y = x[mask], np.searchsorted(keep, y[mask])
    elif data in ("breast_cancer", "wine", "iris", "diabetes"):
        x, y = getattr(skd, f"load_{data}")(return_X_y=True)
    elif data == "classification":
        n_inf = max(2, math.ceil(math.log2(n_classes)), int(round(0.6 * n_features)))
        n_features = max(n_features, n_inf)
        clusters = 2 if n_classes * 2 <= 2**n_inf else 1
        x, y = skd.make_classification(
            n_samples=n_samples,
            n_features=n_features,
            n_informative=n_inf,
            n_redundant=min(n_features - n_inf, 2),
            n_classes=n_classes,
            n_clusters_per_class=clusters,
            class_sep=difficulty,
            flip_y=0.02,
            random_state=rs,
        )
    elif data == "blobs":
        x, y = skd.make_blobs(
            n_samples=n_samples,
            n_features=n_features,
            centers=n_classes,
            cluster_std=difficulty,
            random_state=rs,
        )
    elif data == "quadratic":
        rng = np.random.default_rng([seed, 2])
        q, _ = np.linalg.qr(rng.standard_normal((n_features, n_features)))
        sv = np.logspace(0, -difficulty / 2, n_features)  # condition number 10^difficulty
        x = rng.standard_normal((n_samples, n_features)) * sv @ q.T
        w = rng.standard_normal(n_features)
        y = x @ w + 0.1 * rng.standard_normal(n_samples)
    elif data == "gp_regression":  # y = a Gaussian-process sample at x (RBF kernel) + noise
        # random Fourier features (Rahimi & Recht 2007): f(x) = Σ_j v_j cos(ω_j·x + b_j),
        # ω_j ~ N(0, κ²/d · I) — an RBF length scale of √d/κ, κ ~ U(0.5, 1.5) from the seed
        rng = np.random.default_rng([seed, 4])
        x = rng.standard_normal((n_samples, n_features))
        kappa = rng.uniform(0.5, 1.5)
        omega = rng.standard_normal((n_features, 256)) * kappa / math.sqrt(n_features)
        f = np.cos(x @ omega + rng.uniform(0, 2 * math.pi, 256)) @ rng.standard_normal(256)
        f = (f - f.mean()) / (f.std() + 1e-12)
        y = f + difficulty * rng.standard_normal(n_samples)
    elif data == "xor":  # the parity of the signs of k = 2 or 3 coordinates: no linear signal
        rng = np.random.default_rng([seed, 5])
        x = rng.standard_normal((n_samples, _input_dim(data, n_features)))
        k = int(rng.integers(2, 4))
        y = (np.prod(x[:, :k], axis=1) > 0).astype(np.int64)
    elif data == "moons":
        x, y = skd.make_moons(n_samples=n_samples, noise=difficulty, random_state=rs)
    elif data == "circles":
        x, y = skd.make_circles(n_samples=n_samples, noise=difficulty, factor=0.5, random_state=rs)
    elif data == "gaussian_quantiles":
        x, y = skd.make_gaussian_quantiles(
            n_samples=n_samples, n_features=n_features, n_classes=n_classes, random_state=rs
        )
    elif data == "hastie":
        x, y = skd.make_hastie_10_2(n_samples=n_samples, random_state=rs)
        y = (y > 0).astype(np.int64)
    elif data == "friedman1":
        x, y = skd.make_friedman1(
            n_samples=n_samples, n_features=n_features, noise=difficulty, random_state=rs
        )
    elif data in ("friedman2", "friedman3"):
        x, y = getattr(skd, f"make_{data}")(n_samples=n_samples, noise=difficulty, random_state=rs)
    elif data == "swiss_roll":  # classes: n_classes quantile bands of the roll's position t
        x, t = skd.make_swiss_roll(n_samples=n_samples, noise=difficulty, random_state=rs)
        y = np.searchsorted(np.quantile(t, np.linspace(0, 1, n_classes + 1)[1:-1]), t)
    elif data == "sparse_uncorrelated":
        x, y = skd.make_sparse_uncorrelated(
            n_samples=n_samples, n_features=max(4, n_features), random_state=rs
        )
    else:  # pragma: no cover - TaskSpec validates the name
        raise ValueError(f"unknown data {data!r}")
    x = np.asarray(x, dtype=np.float64)
    if SOURCES[data] == "regression":
        return x, np.asarray(y, dtype=np.float64).reshape(-1, 1)
    return x, np.asarray(y, dtype=np.int64)


def _splits(spec: TaskSpec) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """Split, standardize and augment the data of ``spec``: ({split: (x, y)}, classes)."""
    from sklearn.model_selection import train_test_split

    x, y = _raw_data(
        spec.data,
        spec.data_seed,
        spec.n_samples,
        spec.n_features,
        spec.n_classes,
        spec.difficulty,
        spec.digits_pool,
    )
    reg = spec.kind == "regression"
    rs = spec.data_seed % (2**31 - 1)
    strat = None if reg else y
    x_tr, x_rest, y_tr, y_rest = train_test_split(
        x, y, test_size=0.4, random_state=rs, stratify=strat
    )
    strat = None if reg else y_rest
    x_va, x_te, y_va, y_te = train_test_split(
        x_rest, y_rest, test_size=0.5, random_state=rs, stratify=strat
    )
    mean, std = x_tr.mean(0), x_tr.std(0)
    std[std == 0] = 1.0
    rng = np.random.default_rng([spec.data_seed, 3])
    d = x.shape[1]
    proj = None
    if spec.proj_dim:
        proj = rng.standard_normal((d, spec.proj_dim)) / math.sqrt(d)
    d_out = spec.proj_dim or d
    rescale = np.exp(spec.feature_log_std * rng.standard_normal(d_out))
    classes = 1 if reg else int(y.max()) + 1
    perm = rng.permutation(classes) if spec.permute_labels and not reg else np.arange(classes)
    if reg:
        y_mean, y_std = y_tr.mean(0), y_tr.std(0)
        y_std[y_std == 0] = 1.0
    out = {}
    for name, (xs, ys) in (("train", (x_tr, y_tr)), ("val", (x_va, y_va)), ("test", (x_te, y_te))):
        xs = (xs - mean) / std
        if proj is not None:
            xs = xs @ proj
        xs = xs * rescale
        if reg:
            ys = (ys - y_mean) / y_std
        else:
            ys = perm[ys]
            if spec.label_noise:
                flip = rng.uniform(size=ys.shape[0]) < spec.label_noise
                ys = np.where(flip, rng.integers(0, classes, size=ys.shape[0]), ys)
        out[name] = (xs, ys)
    return out, classes


class SampledTask(SupervisedTask):
    """A task built from a :class:`TaskSpec`: an MLP (or linear model) over in-memory data.

    Parameters ``l{i}.weight`` (h_out, h_in) and ``l{i}.bias`` (h_out,); the forward pass
    multiplies every tensor by ``spec.param_scale`` (the reparameterization), and the
    initial values are LeCun-normal weights and zero biases divided by it. Loss: cross
    entropy for classification, mean squared error for regression (``quadratic`` included).

    Args:
        spec: the task.
        device, dtype: placement.
    """

    name: ClassVar[str] = "sampled"
    description: ClassVar[str] = "a task drawn from selfref.tasks.distribution"

    def __init__(
        self, spec: TaskSpec, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        self.spec = spec
        self.device = resolve_device(device)
        self.dtype = dtype
        arrays, classes = _splits(spec)
        self.regression = spec.kind == "regression"
        ydt = dtype if self.regression else torch.int64
        self.data = {
            s: (
                torch.as_tensor(x, dtype=dtype, device=self.device),
                torch.as_tensor(y, dtype=ydt, device=self.device),
            )
            for s, (x, y) in arrays.items()
        }
        self.num_classes = classes
        self.batch_size = spec.batch_size
        self.sizes = (int(self.data["train"][0].shape[1]), *spec.hidden, classes)
        self._act = SPEC_ACTIVATIONS[spec.activation]

    @property
    def label(self) -> str:
        return self.spec.label()

    def init_params(self, generator: torch.Generator) -> Params:
        c = self.spec.param_scale
        params: Params = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            w = torch.randn(fan_out, fan_in, generator=generator, dtype=self.dtype)
            params[f"l{i}.weight"] = (w / (c * fan_in**0.5)).to(self.device)
            params[f"l{i}.bias"] = torch.zeros(fan_out, dtype=self.dtype, device=self.device)
        return params

    def forward(self, params: Params, x: Tensor) -> Tensor:
        c = self.spec.param_scale
        h = x  # (b, d)
        n = len(self.sizes) - 1
        for i in range(n):
            h = h @ (c * params[f"l{i}.weight"]).T + c * params[f"l{i}.bias"]  # (b, h_i)
            if i < n - 1:
                h = self._act(h)
        return h  # (b, c)

    def loss(self, params: Params, batch: dict[str, Tensor]) -> Tensor:
        out = self.forward(params, batch["x"])
        if self.regression:
            return ((out - batch["y"]) ** 2).mean()
        return torch.nn.functional.cross_entropy(out, batch["y"])

    @torch.no_grad()
    def evaluate(self, params: Params, split: str) -> dict[str, float]:
        check_split(split)
        if not self.regression:
            return super().evaluate(params, split)
        x, y = self.data[split]
        return {"loss": float(((self.forward(params, x) - y) ** 2).mean())}


def build_task(
    spec: TaskSpec, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> SampledTask:
    """The :class:`SampledTask` of ``spec``."""
    return SampledTask(spec, device=device, dtype=dtype)
