"""Tasks on scikit-learn's 8×8 digits (1,797 images, 10 classes; ships with scikit-learn).

Preprocessing: a fixed, seeded, stratified split 60/20/20 into train/val/test (split seed 0
unless given), then per-feature standardization with the *train* split's mean and std (zero
std replaced by 1). Nothing is downloaded.

- ``digits-mlp``: the MLP of Andrychowicz et al. 2016 (section 3.2: one hidden layer of 20
  sigmoid units, batch 128), scaled from MNIST to digits: 64→20→10. Hidden sizes, depth and
  activation are options.
- ``digits-logreg``: multinomial logistic regression 64→10, convex, for regularization tuning.

Notation: b – batch, d – 64 input features, h – hidden units, c – 10 classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from selfref.params import Params
from selfref.tasks.base import SupervisedTask, resolve_device

__all__ = [
    "DigitsMLP",
    "DigitsLogReg",
    "load_digits_splits",
    "digits_split_indices",
    "ACTIVATIONS",
    "MLPTask",
]

ACTIVATIONS = {
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": torch.nn.functional.gelu,
}


@lru_cache(maxsize=4)
def digits_split_indices(split_seed: int = 0) -> dict[str, np.ndarray]:
    """Row indices into ``load_digits()`` of each split (train/val/test) at ``split_seed``:
    the one split every digits task here uses, so other code can keep clear of its val and
    test examples (the meta-training distribution's ``digits_pool = "train"``)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    idx = np.arange(len(y))
    i_tr, i_rest = train_test_split(idx, test_size=0.4, random_state=split_seed, stratify=y)
    i_va, i_te = train_test_split(
        i_rest, test_size=0.5, random_state=split_seed, stratify=y[i_rest]
    )
    return {"train": i_tr, "val": i_va, "test": i_te}


@lru_cache(maxsize=4)
def _digits_numpy(split_seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float64)
    idx = digits_split_indices(split_seed)
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = (
        (x[idx[s]], y[idx[s]]) for s in ("train", "val", "test")
    )
    mean = x_tr.mean(0)
    std = x_tr.std(0)
    std[std == 0] = 1.0
    return {
        "train": ((x_tr - mean) / std, y_tr),
        "val": ((x_va - mean) / std, y_va),
        "test": ((x_te - mean) / std, y_te),
    }


def load_digits_splits(
    split_seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, tuple[Tensor, Tensor]]:
    """Standardized digits as tensors: {split: (x (n, 64), y (n,) int64)}."""
    arrays = _digits_numpy(split_seed)
    return {
        s: (
            torch.as_tensor(x, dtype=dtype, device=device),
            torch.as_tensor(y, dtype=torch.int64, device=device),
        )
        for s, (x, y) in arrays.items()
    }


class MLPTask(SupervisedTask):
    """A fully connected classifier over in-memory data; layers named ``l{i}.weight/bias``.

    Initialization: weights ~ N(0, 1/fan_in) * init_scale (LeCun normal), biases 0 — a seeded,
    explicit version of a standard init that keeps sigmoid units out of saturation.
    """

    def __init__(
        self,
        data: dict[str, tuple[Tensor, Tensor]],
        num_classes: int,
        hidden: Sequence[int] = (20,),
        activation: str = "sigmoid",
        batch_size: int = 128,
        init_scale: float = 1.0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; valid: {', '.join(sorted(ACTIVATIONS))}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden sizes must be >= 1, got {hidden}")
        self.device = resolve_device(device)
        self.dtype = dtype
        self.data = {s: (x.to(self.device, dtype), y.to(self.device)) for s, (x, y) in data.items()}
        self.num_classes = num_classes
        self.hidden = hidden
        self.activation = activation
        self._act = ACTIVATIONS[activation]
        self.batch_size = batch_size
        self.init_scale = init_scale
        self.sizes = (int(self.data["train"][0].shape[1]), *hidden, num_classes)

    @property
    def layer_names(self) -> list[str]:
        return [f"l{i}" for i in range(len(self.sizes) - 1)]

    def init_params(self, generator: torch.Generator) -> Params:
        params: Params = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            w = torch.randn(fan_out, fan_in, generator=generator, dtype=self.dtype)
            params[f"l{i}.weight"] = (w * (self.init_scale / fan_in**0.5)).to(self.device)
            params[f"l{i}.bias"] = torch.zeros(fan_out, dtype=self.dtype, device=self.device)
        return params

    def forward(self, params: Params, x: Tensor) -> Tensor:
        h = x  # (b, d)
        n = len(self.sizes) - 1
        for i in range(n):
            h = h @ params[f"l{i}.weight"].T + params[f"l{i}.bias"]  # (b, h_i)
            if i < n - 1:
                h = self._act(h)
        return h  # (b, c)


class DigitsMLP(MLPTask):
    """digits-mlp: 64→20→10 sigmoid MLP on standardized digits, batch 128 (L2L's MNIST net).

    Args:
        hidden: hidden layer sizes (default one layer of 20); ``depth`` repeats ``hidden[0]``.
        depth: number of hidden layers when given (overrides the length of ``hidden``).
        activation: sigmoid (paper), relu, tanh or gelu.
        batch_size: minibatch size (paper: 128).
        split_seed: seed of the fixed train/val/test split.
    """

    name: ClassVar[str] = "digits-mlp"
    description: ClassVar[str] = "MLP 64-20-10 (sigmoid) on scikit-learn digits, batch 128"

    def __init__(
        self,
        hidden: Sequence[int] | int = (20,),
        depth: int | None = None,
        activation: str = "sigmoid",
        batch_size: int = 128,
        split_seed: int = 0,
        init_scale: float = 1.0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        if depth is not None:
            if depth < 0:
                raise ValueError(f"depth must be >= 0, got {depth}")
            hidden = (hidden[0] if hidden else 20,) * depth
        dev = resolve_device(device)
        super().__init__(
            load_digits_splits(split_seed, dev, dtype),
            10,
            hidden,
            activation,
            batch_size,
            init_scale,
            dev,
            dtype,
        )
        self.split_seed = split_seed


class DigitsLogReg(MLPTask):
    """digits-logreg: multinomial logistic regression 64→10 on standardized digits (convex).

    Weights start at zero unless ``init_scale`` > 0 (then LeCun normal times init_scale).
    """

    name: ClassVar[str] = "digits-logreg"
    description: ClassVar[str] = "multinomial logistic regression on digits (convex; for L2 tuning)"

    def __init__(
        self,
        batch_size: int = 128,
        split_seed: int = 0,
        init_scale: float = 0.0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        dev = resolve_device(device)
        super().__init__(
            load_digits_splits(split_seed, dev, dtype),
            10,
            (),
            "sigmoid",
            batch_size,
            init_scale,
            dev,
            dtype,
        )
        self.split_seed = split_seed
