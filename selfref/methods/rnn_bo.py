"""``rnn-bo``: the learned black-box optimizer of Chen et al. 2017 as a search method.

"Learning to learn without gradient descent by gradient descent" (ICML 2017): an LSTM,
meta-trained on GP samples (:mod:`selfref.meta.problems.blackbox`), proposes each trial's
point from the previous point and its result, ``x_t = RNN_φ(h_{t−1}, x_{t−1}, y_{t−1})``
(section 2, eq. 1). Here x_t lives in the unit cube of the search space — every dimension
maps [0, 1] onto its (log) range or its choices (:meth:`selfref.search_space.SearchSpace.from_unit`)
— and y_t is the trial's validation loss. A trial is one full training run, as for the
other search methods (:mod:`selfref.methods.trial`), and costs the gradient evaluations
it took; the study loop is theirs (:mod:`selfref.methods.study`), with one trial in flight.

φ comes from, in order: ``rnn_checkpoint=PATH`` (``--method-option
rnn-bo.rnn_checkpoint=PATH``); the checkpoint shipped for the space's number
of dimensions d, ``selfref/net/pretrained/rnn_bo_d<d>.pt`` (shipped: d = 2, 3, 6, made by
``python -m experiments.chen_blackbox --meta-train --export``); otherwise a quick
meta-training on GP samples of dimension d here. The meta-training cost (recorded in the
checkpoint, in gradient evaluations of the synthetic training functions) is reported as
``Result.meta_train_grad_evals``, beside the budget, never inside it.

Choices beside the paper, which optimizes functions whose scale is known:

- The validation losses are fed standardized by the mean and standard deviation of the
  losses seen so far (the problem's ``online`` normalization, 0 for the first), since an
  HPO objective's range is not known in advance. A diverged or failed trial reads as the
  worst loss seen so far.
- The RNN is deterministic; the run's seed applies a random symmetry of the cube (axis
  permutation and flips, :func:`selfref.tasks.blackbox.cube_symmetry`) to its proposals, so
  seeds give different runs as they do for the other methods.
- Proposals are sequential (each needs the previous result): one trial in flight at a time
  (``max_in_flight = 1``) whatever the executor's slots (the paper's section 2.3 parallel
  variant is not implemented). In ``selfref compare`` the other studies fill the free slots.

On resume the finished trials are replayed in order: the RNN is stepped through them
(re-deriving each point) and fed their stored results, so the study continues exactly where
an uninterrupted one would have.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from selfref import checkpoints
from selfref.budget import Budget
from selfref.execution import Executor
from selfref.methods.base import Result
from selfref.methods.search import TrialSearch
from selfref.methods.study import Proposer, Study
from selfref.methods.trial import TrialFn, run_trial
from selfref.net.blackbox import BlackBoxRNN, BlackBoxRNNConfig
from selfref.params import Params
from selfref.runs import RunDir
from selfref.search_space import SearchSpace
from selfref.tasks.blackbox import cube_symmetry

__all__ = [
    "RNNBO",
    "RNNBOProposer",
    "load_proposer",
    "pretrained_path",
    "PRETRAINED_DIMS",
]

PRETRAINED_DIMS = (2, 3, 6)  # input dimensions with a shipped checkpoint


def pretrained_path(dim: int) -> Path:
    """Where the shipped checkpoint for dimension ``dim`` lives (it may not exist)."""
    from selfref.net.optimizer import PRETRAINED_DIR

    return PRETRAINED_DIR / f"rnn_bo_d{dim}.pt"


def load_proposer(
    dim: int, path: str | Path | None = None, which: str = "best"
) -> tuple[BlackBoxRNN, Params, dict[str, Any]]:
    """The proposer network, its φ and facts from a checkpoint (``selfref.checkpoints``).

    Returns:
        (net, φ, info) with info ``dim``, ``normalization``, ``loss``,
        ``meta_train_grad_evals``, ``heldout_score``, ``source``.

    Raises:
        ValueError: no checkpoint at ``path`` (or none shipped for ``dim``), a checkpoint of
            another kind, or one for another dimension.
    """
    p = Path(path) if path is not None else pretrained_path(dim)
    ck = checkpoints.load_meta(p)
    desc = ck.get("problem", {})
    if desc.get("kind") != "blackbox":
        raise ValueError(
            f"{str(p)!r} is not a black-box optimizer checkpoint ({desc.get('kind')!r})"
        )
    if int(desc["dim"]) != dim:
        raise ValueError(
            f"{str(p)!r} is for {desc['dim']}-d functions; the space has {dim} dimensions"
        )
    net = BlackBoxRNN(
        BlackBoxRNNConfig(dim=dim, hidden=int(desc["hidden"]), layers=int(desc["layers"]))
    )
    phi = checkpoints.meta_params_of(ck, which)
    info = {
        "dim": dim,
        "normalization": desc["normalization"],
        "loss": desc["loss"],
        "meta_train_grad_evals": checkpoints.grad_evals_of(ck),
        "heldout_score": ck.get("best_score"),
        "source": str(p),
    }
    return net, {k: v.to(torch.float64) for k, v in phi.items()}, info


class RNNBOProposer:
    """Ask/tell over the LSTM: trial t's point is the RNN's x_t mapped onto the space.

    Args:
        net, meta_params: the proposer and its φ.
        space: the search space (``len(space.dims)`` = the network's d).
        seed: chooses the cube symmetry applied to the proposals.
    """

    deterministic = False

    def __init__(self, net: BlackBoxRNN, meta_params: Params, space: SearchSpace, seed: int):
        d = net.config.dim
        if len(space.dims) != d:
            raise ValueError(f"the proposer is for {d} dimensions; the space has {len(space.dims)}")
        self.net, self.phi, self.space = net, meta_params, space
        self.sym = cube_symmetry(d, seed)
        self.state = net.init_state(1)
        self.x_prev = torch.zeros(1, d, dtype=torch.float64)
        self.y_prev = torch.zeros(1, dtype=torch.float64)
        self.values: list[float | None] = []  # raw validation losses told so far
        self.pending: torch.Tensor | None = None  # the point asked and not yet told

    def _step(self) -> dict[str, Any]:
        with torch.no_grad():
            x, self.state = self.net.step(self.phi, self.state, self.x_prev, self.y_prev)
        self.pending = x
        u = self.sym(x[0]).tolist()
        return self.space.from_unit(u)

    def _observe(self, record: Mapping[str, Any]) -> None:
        raw = record.get("val_loss")
        v = float(raw) if record.get("status") == "ok" and raw is not None else math.nan
        ok = math.isfinite(v)
        self.values.append(v if ok else None)
        seen = [y for y in self.values if y is not None]
        y = v if ok else (max(seen) if seen else 0.0)
        if len(seen) < 2:
            z = 0.0
        else:
            mean = sum(seen) / len(seen)
            std = max(math.sqrt(sum((s - mean) ** 2 for s in seen) / len(seen)), 1e-6)
            z = (y - mean) / std
        assert self.pending is not None
        self.x_prev, self.pending = self.pending, None
        self.y_prev = torch.tensor([z], dtype=torch.float64)

    def ask(self, index: int) -> dict[str, Any] | None:
        if self.pending is not None:
            raise RuntimeError("rnn-bo proposes one trial at a time: tell the previous one first")
        return self._step()

    def tell(self, index: int, hparams: Mapping[str, Any], record: Mapping[str, Any]) -> None:
        self._observe(record)

    def replay(self, index: int, hparams: Mapping[str, Any], record: Mapping[str, Any]) -> None:
        if index != len(self.values):
            raise ValueError(
                f"rnn-bo replays trials in order; trial {index} follows {len(self.values)} "
                "finished ones (the stored study has a gap)"
            )
        self._step()
        self._observe(record)


class RNNBO(TrialSearch):
    """The learned RNN black-box optimizer (Chen et al. 2017) over a search space.

    Args:
        rnn_checkpoint: ``"auto"`` (the shipped checkpoint for the space's dimension, else a
            quick meta-training), a checkpoint path, or None (always meta-train here).
        which: ``"best"`` (φ chosen on validation functions) or ``"last"``.
        meta_steps, meta_batch, meta_lr: the quick meta-training (full BPTT over a horizon
            of ``min(trials, 100)``; sized to take seconds).
        space, executor, run_dir, trial_fn, storage: see
            :class:`~selfref.methods.search.TrialSearch`.
        workers: local worker processes when no executor is given: at most 1 (one trial
            at a time; 0 = in this process).

    Example:
        >>> from selfref.budget import Budget
        >>> from selfref.tasks import make
        >>> res = RNNBO(workers=0).run(make("quadratic"), Budget(200, 50), seed=0)
        >>> res.grad_evals <= 200, res.extra["trials_ok"] >= 1, res.meta_train_grad_evals > 0
        (True, True, True)
    """

    name: ClassVar[str] = "rnn-bo"
    max_in_flight: ClassVar[int | None] = 1  # each point needs the previous result

    def __init__(
        self,
        rnn_checkpoint: str | Path | None = "auto",
        which: str = "best",
        meta_steps: int = 60,
        meta_batch: int = 16,
        meta_lr: float = 3e-3,
        space: SearchSpace | None = None,
        workers: int | None = None,
        executor: Executor | None = None,
        run_dir: RunDir | str | None = None,
        trial_fn: TrialFn = run_trial,
        storage: str | None = None,
    ) -> None:
        if workers is not None and workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = in-process), got {workers}")
        super().__init__(
            space=space,
            workers=1 if workers is None else min(1, workers),
            executor=executor,
            run_dir=run_dir,
            trial_fn=trial_fn,
            storage=storage,
        )
        if which not in ("best", "last"):
            raise ValueError(f"which must be 'best' or 'last', got {which!r}")
        if meta_steps < 1 or meta_batch < 1 or not meta_lr > 0:
            raise ValueError(
                f"meta_steps and meta_batch must be >= 1 and meta_lr > 0, got {meta_steps}, "
                f"{meta_batch}, {meta_lr}"
            )
        if rnn_checkpoint not in (None, "auto") and not Path(str(rnn_checkpoint)).is_file():
            raise ValueError(f"rnn_checkpoint {str(rnn_checkpoint)!r} does not exist")
        self.checkpoint = rnn_checkpoint
        self.which = which
        self.meta_steps, self.meta_batch, self.meta_lr = meta_steps, meta_batch, meta_lr
        self.info: dict[str, Any] = {}

    def _network(self, dim: int, horizon: int, seed: int) -> tuple[BlackBoxRNN, Params]:
        path = None
        if self.checkpoint == "auto" and pretrained_path(dim).is_file():
            path = pretrained_path(dim)
        elif self.checkpoint not in (None, "auto"):
            path = Path(str(self.checkpoint))
        if path is not None:
            net, phi, self.info = load_proposer(dim, path, self.which)
            return net, phi
        from selfref.meta import MetaTrainConfig, MetaTrainer
        from selfref.meta.problems.blackbox import BlackBoxConfig, BlackBoxProblem

        h = max(2, min(horizon, 100))
        problem = BlackBoxProblem(BlackBoxConfig(dim=dim, eval_functions=16, eval_horizon=h))
        cfg = MetaTrainConfig(
            meta_steps=self.meta_steps,
            estimator="full_bptt",
            inner_steps=h,
            meta_batch=self.meta_batch,
            meta_lr=self.meta_lr,
            eval_every=max(1, self.meta_steps // 3),
            checkpoint_every=0,
            seed=seed,
        )
        res = MetaTrainer(problem, cfg).train()
        self.info = {
            "dim": dim,
            "normalization": problem.config.normalization,
            "loss": problem.config.loss,
            "meta_train_grad_evals": res.meta_train_grad_evals,
            "heldout_score": res.best_score,
            "source": "meta-trained here",
        }
        phi = res.best_meta_params if self.which == "best" else res.meta_params
        return problem.proposer, phi

    def proposer(self, space: SearchSpace, budget: Budget, seed: int) -> Proposer:
        net, phi = self._network(len(space.dims), budget.max_trials, seed)
        return RNNBOProposer(net, phi, space, seed)

    def describe(self, proposer: Proposer) -> dict[str, Any]:
        return {k: v for k, v in self.info.items() if k != "meta_train_grad_evals"}

    def result(self, study: Study, workers: int, extra: Mapping[str, Any] | None = None) -> Result:
        """The study's Result, with the proposer's meta-training cost beside the budget."""
        res = super().result(study, workers, extra)
        res.meta_train_grad_evals = int(self.info.get("meta_train_grad_evals", 0))
        return res
