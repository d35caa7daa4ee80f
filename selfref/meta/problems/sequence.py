"""Meta-problem: a sequence learner on ``fewshot-digits`` (in-context learning).

φ are the weights of a sequence learner (:mod:`selfref.net.sequence`: the SRWM model of
Irie et al. 2022, an LSTM, a HyperLSTM). One "trajectory" is one sequence of
(P x_t, label) pairs; its meta-loss is the cross-entropy of the learner's predictions averaged
over the sequence's positions, and the learning algorithm lives in the learner's activations
or self-modifying weights. Training backpropagates through the whole sequence (horizon 1,
one truncation: full BPTT through the sequence, as Irie et al. 2022, section 4, and the
reference's few-shot training do), so the estimator is ``full_bptt`` or ``tbptt``.

Each meta-step's sequences are the task's train batch of that meta-step
(``task.batch("train", step, seed)``, which follows the task's ``min_ways`` curriculum), the
seed drawn from the trainer's per-rank stream, so every rank sees its own sequences.

Cost (:mod:`selfref.budget`): one gradient evaluation is a forward and backward pass of the
learner on one batch of ``task.batch_size`` sequences; the forward is charged half.

Notation: b – sequences, n – positions, w – ways.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as Fn
from torch import Tensor

from selfref.logging import Logger, log_metrics
from selfref.meta.problem import Inner, Truncation
from selfref.params import Params

__all__ = ["SequenceProblem"]


class SequenceProblem:
    """Meta-train ``task.model`` on ``task`` (fewshot-digits) by backprop through sequences.

    Args:
        task: a :class:`~selfref.tasks.fewshot.FewShotDigits` that has its learner.
        options: the plain options that built the task and learner (they identify the
            problem in checkpoints: a resume must rebuild the same one).
        eval_split: the split of the held-out evaluation (its ``score`` is the loss there).
        init: start from these weights instead of a fresh init (a warm start).
    """

    name = "sequence"

    def __init__(
        self,
        task: Any,
        options: dict[str, Any] | None = None,
        eval_split: str = "val",
        init: Params | None = None,
    ) -> None:
        self.task = task
        self.model = task.model  # raises when the task has no learner
        self.options = dict(options or {})
        self.eval_split = eval_split
        self.device, self.dtype = task.device, task.dtype
        self.init = init

    def init_meta_params(self, generator: torch.Generator) -> Params:
        if self.init is not None:
            return {k: v.to(self.device, self.dtype).clone() for k, v in self.init.items()}
        return self.task.init_params(generator)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "task": self.task.name, "model": self.model.name, **self.options}

    def init_inner(
        self, meta_params: Params, generator: torch.Generator, n: int, horizon: int, step: int
    ) -> Inner:
        if n != self.task.batch_size:
            raise ValueError(
                f"this rank's share of the meta-batch is {n} sequences but the task's batch "
                f"has {self.task.batch_size}; set meta_batch = batch_size × ranks"
            )
        data_seed = int(torch.randint(0, 2**31, (1,), generator=generator))
        return Inner({"step": torch.tensor(step)}, [data_seed], 0, 1)

    def unroll(
        self, meta_params: Params, inner: Inner, length: int, per_instance: bool = False
    ) -> Truncation:
        if length != 1 or inner.t != 0:
            raise ValueError("a sequence is one truncation: unroll it with length 1 from t = 0")
        batch = self.task.batch("train", int(inner.data["step"]), inner.seeds[0])
        inputs, y = batch["inputs"], batch["y"]  # (b, n, i), (b, n)
        if per_instance:  # sequence i runs φ_i (ES particles), all at once

            def one(phi: Params, x: Tensor) -> Tensor:
                return self.model.forward(phi, x.unsqueeze(0))[0].squeeze(0)

            logits = torch.func.vmap(one)(meta_params, inputs)  # (b, n, w)
        else:
            logits, _ = self.model.forward(meta_params, inputs)  # (b, n, w)
        ce = Fn.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (b, n)
        loss = ce.mean(dim=1)  # (b,)
        half = 0.5 * inputs.shape[0] / self.task.batch_size
        return Truncation(
            loss=loss,
            inner=Inner(inner.data, inner.seeds, 1, 1),
            grad_evals=half,
            backward_evals=half,
            metrics={"inner/accuracy": float((logits.argmax(-1) == y).double().mean())},
            per_step=ce.detach(),
        )

    def evaluate(self, meta_params: Params) -> dict[str, float]:
        ev = self.task.evaluate(meta_params, self.eval_split)
        return {"score": ev["loss"], **ev}

    def log_internals(self, meta_params: Params, logger: Logger, step: int) -> None:
        """The learner's internals on one train batch (SRWM |ΔW|, β, q/k entropy; ...)."""
        batch = self.task.batch("train", step, 0)
        log_metrics(
            logger, self.model.internals(meta_params, batch["inputs"]), step, f"{self.model.name}/"
        )
