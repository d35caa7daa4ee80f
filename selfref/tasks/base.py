"""The Task contract: what is learned.

A task owns its data and its model. It gives initial parameters, a scalar loss that is
differentiable in the parameters, deterministic minibatches, and an evaluation. Everything a
loss needs is either in ``params`` or in the ``batch`` (never read from hidden mutable state),
so ``torch.func.vmap`` can map a task's loss over stacked parameters and batches of many
task instances at once.

Notation: b – batch size, d – input features, c – classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from selfref.params import Params

__all__ = [
    "Task",
    "SupervisedTask",
    "Split",
    "SPLITS",
    "SPLIT_SALT",
    "Batch",
    "NO_OPTIONS",
    "check_split",
    "mix_seed",
    "resolve_device",
]

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
Batch = dict[str, Tensor]


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


@runtime_checkable
class Task(Protocol):
    """What every task provides (see ../shared/DESIGN.md, "Core contracts").

    Attributes:
        name: registry name, e.g. ``"digits-mlp"``.
        description: one line for ``selfref tasks``.
        step_invariant: ``batch(split, step, seed)`` does not depend on ``step`` (the
            objective is one fixed function per (split, seed), e.g. quadratics), so a caller
            may fetch it once and reuse it.
        search_defaults: task options a hyperparameter search on this task uses unless the
            user sets them (``selfref compare``), e.g. quadratics' ``functions="fixed"``: one
            optimization problem, so val/test score the function that was trained.
        device, dtype: where and in what precision params and batches live.
        batch_size: examples per minibatch (1 for tasks without data, e.g. quadratics).
        num_classes: classes the task's predictions range over (0: not a classification
            task, e.g. quadratics).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    step_invariant: ClassVar[bool]
    search_defaults: ClassVar[Mapping[str, Any]]
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    num_classes: int

    def init_params(self, generator: torch.Generator) -> Params:
        """Fresh initial parameters drawn from ``generator`` (on the CPU generator's stream)."""
        ...

    def loss(self, params: Params, batch: Batch) -> Tensor:
        """Scalar training objective, differentiable in ``params``; pure in (params, batch)."""
        ...

    def batch(self, split: str, step: int, seed: int) -> Batch:
        """Minibatch ``step`` of ``split`` under ``seed``; same arguments, same tensors, always."""
        ...

    def evaluate(self, params: Params, split: str) -> dict[str, float]:
        """Metrics on a whole split: always ``loss``; ``accuracy`` for classification."""
        ...

    def num_examples(self, split: str) -> int:
        """Number of examples in a split (1 for data-free tasks)."""
        ...

    def full_batch(self, split: str) -> Batch | None:
        """The whole ``split`` as one batch ``loss`` accepts, for tasks whose data set lives
        in memory (``num_examples(split)`` rows); None for tasks without one (quadratics:
        the function is the batch; fewshot-digits: the loss is over sequences)."""
        ...


# The options of a task that has none for a hyperparameter search (read-only, shared).
NO_OPTIONS: Mapping[str, Any] = MappingProxyType({})


class SupervisedTask:
    """Shared machinery for classification tasks over an in-memory data set.

    Subclasses set ``self.data[split] = (x, y)`` tensors and implement ``forward``.
    Minibatches: for each epoch, a permutation of the split drawn from a generator seeded
    by ``(seed, epoch)``; minibatch ``step`` is a contiguous slice of it (the last partial
    slice of an epoch is dropped so every batch has ``batch_size`` rows).
    """

    name: ClassVar[str] = "supervised"
    description: ClassVar[str] = ""
    step_invariant: ClassVar[bool] = False  # minibatch order changes with the step
    search_defaults: ClassVar[Mapping[str, Any]] = NO_OPTIONS
    data: dict[str, tuple[Tensor, Tensor]]
    batch_size: int
    device: torch.device
    dtype: torch.dtype
    num_classes: int

    def forward(self, params: Params, x: Tensor) -> Tensor:  # (b, d) -> (b, c)
        raise NotImplementedError

    def loss(self, params: Params, batch: Batch) -> Tensor:
        logits = self.forward(params, batch["x"])  # (b, c)
        return torch.nn.functional.cross_entropy(logits, batch["y"])

    def num_examples(self, split: str) -> int:
        check_split(split)
        return int(self.data[split][1].shape[0])

    def full_batch(self, split: str) -> Batch:
        """The whole split as one batch {"x": (n, d), "y": (n,)}."""
        check_split(split)
        x, y = self.data[split]
        return {"x": x, "y": y}

    def batches_per_epoch(self, split: str) -> int:
        return max(1, self.num_examples(split) // self.batch_size)

    def batch(self, split: str, step: int, seed: int) -> Batch:
        check_split(split)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        x, y = self.data[split]
        n = y.shape[0]
        bs = min(self.batch_size, n)
        per_epoch = max(1, n // bs)
        epoch, i = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(mix_seed(seed, epoch, SPLIT_SALT[split]))
        perm = torch.randperm(n, generator=g)[i * bs : (i + 1) * bs].to(x.device)
        return {"x": x[perm], "y": y[perm]}

    @torch.no_grad()
    def evaluate(self, params: Params, split: str) -> dict[str, float]:
        check_split(split)
        x, y = self.data[split]
        logits = self.forward(params, x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        acc = (logits.argmax(-1) == y).to(torch.float64).mean()
        return {"loss": float(loss), "accuracy": float(acc)}


# One integer per split, mixed into every generator seed so splits draw disjoint streams.
SPLIT_SALT: Mapping[str, int] = MappingProxyType({"train": 0, "val": 1, "test": 2})


def mix_seed(*ints: int) -> int:
    """Deterministic 63-bit mix of small integers (a seed for ``torch.Generator``).

    Example:
        >>> mix_seed(0, 1) == mix_seed(0, 1) != mix_seed(1, 0)
        True
    """
    h = 0x9E3779B97F4A7C15
    for v in ints:
        h ^= (int(v) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & (
            0xFFFFFFFFFFFFFFFF
        )
    return h & 0x7FFFFFFFFFFFFFFF


def resolve_device(device: Any) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; otherwise validated ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str) and device.split(":")[0] in ("cpu", "cuda"):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} requested but CUDA is not available; use cpu or auto"
            )
        return torch.device(device)
    raise ValueError(f"unknown device {device!r}; valid: auto, cpu, cuda")
