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
    lr_grid: tuple[float, ...] = ()  # the learning rates searched (after any widening)
    steps_grid: tuple[int, ...] = ()  # the step counts searched (after any widening)
    on_edge: bool = False  # the best stayed on an edge of a grid that did not plateau there


def tune_sgd(
    task: Any,
    ks: Sequence[int],
    lrs: Sequence[float] = (1e-3, 10**-2.5, 1e-2, 10**-1.5, 0.1, 10**-0.5, 1.0, 10**0.5, 10.0),
    steps_grid: Sequence[int] = (1, 10, 50),
    sequences: int = 500,
    seed: int = 1,
    max_widen: int = 4,
) -> dict[int, SGDChoice]:
    """Grid search of (lr, steps) per k on ``sequences`` train-split (held-in) sequences.

    The default lr grid is 10^{-3}, 10^{-2.5}, ..., 10^{1}; ties keep the fewest steps, then
    the smallest lr. A best lr on an edge of its grid widens the grid past that edge by the
    grid's own ratio, and a best step count on the top edge widens the steps by the ratio of
    the last two (one step is the least there is) — at most ``max_widen`` times per k — unless
    the edge only ties its inner neighbour (accuracy no longer depends on it there: a plateau,
    as at k = 1, where one example fixes the prediction for every learning rate).
    """
    with torch.no_grad():
        batch = task.sequences("train", sequences, seed, step=20_000_000)
        out = {}
        for k in ks:
            lr_vals, step_vals = sorted(float(v) for v in lrs), sorted(int(v) for v in steps_grid)
            acc: dict[tuple[int, float], float] = {}
            for round_ in range(max_widen + 1):
                for st in step_vals:
                    for lr in lr_vals:
                        if (st, lr) not in acc:
                            hit = sgd_query_accuracy(batch["x"], batch["y"], k, task.ways, lr, st)
                            acc[(st, lr)] = float(hit.mean())
                st, lr = max(acc, key=lambda sl: (acc[sl], -sl[0], -sl[1]))
                grow = _widen(acc, (st, lr), lr_vals, step_vals)
                if not grow or round_ == max_widen:
                    break
                new_lr, new_steps = grow
                lr_vals, step_vals = sorted(lr_vals + new_lr), sorted(step_vals + new_steps)
            out[k] = SGDChoice(
                k, lr, st, acc[(st, lr)], tuple(lr_vals), tuple(step_vals), bool(grow)
            )
        return out


def _widen(
    acc: dict[tuple[int, float], float],
    best: tuple[int, float],
    lrs: list[float],
    steps: list[int],
) -> tuple[list[float], list[int]] | None:
    """The values to add when ``best`` lies on a grid edge that is not a plateau, else None."""
    st, lr = best
    top = acc[best]
    new_lr: list[float] = []
    new_steps: list[int] = []
    if len(lrs) > 1:
        if lr == lrs[0] and acc[(st, lrs[1])] < top:
            new_lr = [lrs[0] / (lrs[1] / lrs[0])]
        elif lr == lrs[-1] and acc[(st, lrs[-2])] < top:
            new_lr = [lrs[-1] * (lrs[-1] / lrs[-2])]
    if len(steps) > 1 and st == steps[-1] and acc[(steps[-2], lr)] < top:
        new_steps = [round(steps[-1] * steps[-1] / steps[-2])]
    return (new_lr, new_steps) if new_lr or new_steps else None


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
