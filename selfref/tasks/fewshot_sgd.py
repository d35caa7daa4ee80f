"""The tuned-SGD baseline of in-context learning on ``fewshot-digits``.

For each k, a linear (softmax-regression) classifier trained from zero by gradient descent on
the first k examples of a sequence predicts example k — the same query and the same labelled
examples a sequence learner has at position k. Its learning rate and step count are chosen on
a grid on held-in (train-split) sequences (:func:`tune_sgd`), never on test sequences.

Notation: b – sequences, n – length, p – projected features, w – ways, k – examples seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as Fn
from torch import Tensor

__all__ = ["sgd_query_accuracy", "SGDChoice", "tune_sgd", "sgd_eval", "sgd_hits"]


def sgd_query_accuracy(x: Tensor, y: Tensor, k: int, ways: int, lr: float, steps: int) -> Tensor:
    """Per-sequence hit (b,) of a linear classifier trained on the first k examples.

    For each sequence, softmax regression W (w, p), bias (w), from zero, trained by ``steps``
    steps of (full-batch) gradient descent with learning rate ``lr`` on the mean
    cross-entropy of examples 0..k−1; then it predicts example k — the same query and the
    same k labelled examples the sequence learner has when it predicts position k.

    Args:
        x: (b, n, p) inputs. y: (b, n) labels. k: examples to train on (1 <= k < n).
    """
    if not 1 <= k < x.shape[1]:
        raise ValueError(f"k must be in 1..{x.shape[1] - 1}, got {k}")
    xs, ys = x[:, :k].double(), y[:, :k]  # (b, k, p), (b, k)
    onehot = Fn.one_hot(ys, ways).double()  # (b, k, w)
    W = xs.new_zeros(x.shape[0], ways, x.shape[2])  # (b, w, p)
    bias = xs.new_zeros(x.shape[0], ways)  # (b, w)
    for _ in range(steps):
        logits = torch.einsum("bkp,bwp->bkw", xs, W) + bias[:, None]
        err = (torch.softmax(logits, -1) - onehot) / k  # dL/dlogits (b, k, w)
        W = W - lr * torch.einsum("bkw,bkp->bwp", err, xs)
        bias = bias - lr * err.sum(1)
    q = torch.einsum("bp,bwp->bw", x[:, k].double(), W) + bias  # (b, w)
    return (q.argmax(-1) == y[:, k]).double()


@dataclass(frozen=True)
class SGDChoice:
    """The tuned baseline setting for one k."""

    k: int
    lr: float
    steps: int
    train_acc: float  # query accuracy on the held-in sequences used for tuning


def tune_sgd(
    task: Any,
    ks: Sequence[int],
    lrs: Sequence[float] = (1e-3, 10**-2.5, 1e-2, 10**-1.5, 0.1, 10**-0.5, 1.0, 10**0.5, 10.0),
    steps_grid: Sequence[int] = (1, 10, 50),
    sequences: int = 500,
    seed: int = 1,
) -> dict[int, SGDChoice]:
    """Grid search of (lr, steps) per k on ``sequences`` train-split (held-in) sequences.

    The default lr grid is 10^{-3}, 10^{-2.5}, ..., 10^{1}; ties keep the first (smallest lr).
    """
    with torch.no_grad():
        batch = task.sequences("train", sequences, seed, step=20_000_000)
        out = {}
        for k in ks:
            best: SGDChoice | None = None
            for steps in steps_grid:
                for lr in lrs:
                    acc = float(
                        sgd_query_accuracy(batch["x"], batch["y"], k, task.ways, lr, steps).mean()
                    )
                    if best is None or acc > best.train_acc:
                        best = SGDChoice(k, float(lr), int(steps), acc)
            assert best is not None
            out[k] = best
    return out


def sgd_eval(task: Any, choices: dict[int, SGDChoice], split: str = "test") -> dict[str, float]:
    """``acc@k`` of the tuned baseline on exactly the sequences ``task.evaluate`` uses."""
    return {f"acc@{k}": float(h.mean()) for k, h in sgd_hits(task, choices, split).items()}


def sgd_hits(task: Any, choices: dict[int, SGDChoice], split: str = "test") -> dict[int, Tensor]:
    """Per-sequence hits (s,) of the tuned baseline for each k, on the fixed sequences of
    ``split`` in ``task.query_hits``'s order (for paired differences)."""
    out: dict[int, list[Tensor]] = {k: [] for k in choices}
    with torch.no_grad():
        for batch in task.eval_batches(split):
            for k, ch in choices.items():
                hit = sgd_query_accuracy(batch["x"], batch["y"], k, task.ways, ch.lr, ch.steps)
                out[k].append(hit.cpu())
    return {k: torch.cat(v) for k, v in out.items()}
