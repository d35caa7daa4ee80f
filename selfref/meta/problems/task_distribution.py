"""Meta-problem: one learned optimizer for a whole distribution of tasks.

Learned optimizers that work on tasks they never saw are meta-trained on many tasks at once
(Metz et al. 2020, "Tasks, stability, architecture, and compute", sections 3–4; VeLO,
Metz et al. 2022, section 4): here every estimate draws one task from a
:class:`~selfref.tasks.distribution.TaskDistribution` — its data, model and augmentation,
fixed by one task seed — and runs n instances of it (other initializations and minibatch
orders), so the n trajectories share their parameter shapes and run together under
``torch.func.vmap`` (``SelfReferentialNet.step_many``). The coordinatewise core's φ does not
depend on the task's shapes, so one φ serves every task.

The meta-objective is held-out loss over the horizon: at every step, Q(θ_{t+1}) on the
task's *outer* split (``outer_split``, default ``"test"`` — these tasks exist only for
meta-training, and this split is never shown to the optimizer; its first ``outer_examples``
examples, all of them for the data sets sampled here, so the objective carries no minibatch
noise), summed over
the truncation's steps as Σ_t w_t log(Q + ε) (``meta_loss="log_sum"``, scale-free across
tasks; the floor ε = ``loss_floor`` keeps a task whose loss can fall towards zero from
outweighing the rest) or Σ_t w_t Q (``"sum"``); ``weighting="linear"`` puts w_t ∝ (t+1)/T
on later steps. The
optimizer itself may read held-out losses of the *inner* validation split (the val split),
as it will at test time: every ``EvaluationConfig.heldout_every`` steps a val minibatch
rides along in the batch and the evaluation model measures Q on it. Keeping inner and outer
validation data apart follows google/learned_optimization.

The carry (:class:`~selfref.meta.problem.Inner`) holds the weights, the network state and
the task seed (``data["task"]``, (n,)); the horizon of a trajectory is the trainer's horizon
times the task's sampled ``horizon_frac``, and the analyzer is told it (training progress).

Held-out evaluation (keep-best): ``eval_tasks`` tasks of the same distribution from seeds
above the training stream's range, ``eval_instances`` instances each, ``eval_steps`` steps;
each task's reference is Adam with its learning rate tuned on the val split over
:data:`EVAL_LR_GRID` (once, cached). ``score`` is the mean over tasks of
log10(learned / tuned-Adam) final loss on the outer split (lower is better; < 0 beats
tuned Adam on average; both losses + ε), ``win_frac`` the fraction of tasks where the
learned loss is lower.

Cost (:mod:`selfref.budget`): per instance and step one gradient evaluation, plus the outer
forward pass (one half per minibatch's worth of examples) and one half per held-out read (one
with ``heldout_grad``);
backpropagating through a step costs about one more.

Notation: n – instances, K – truncation length, T – horizon.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from selfref.meta.family import TaskFamily
from selfref.meta.problem import Inner, Truncation, detach_tree
from selfref.meta.unroll import META_LOSSES
from selfref.net.network import SelfReferentialNet
from selfref.params import Params
from selfref.tasks.base import Batch, check_split
from selfref.tasks.distribution import DistributionConfig, TaskDistribution, build_task

__all__ = [
    "TaskDistributionProblem",
    "WEIGHTINGS",
    "EVAL_LR_GRID",
    "EVAL_TASK_SEED_BASE",
    "DESIGN_TASK_SEED_BASE",
]

WEIGHTINGS: tuple[str, ...] = ("uniform", "linear")
EVAL_LR_GRID: tuple[float, ...] = tuple(10 ** (k / 2) for k in range(-8, 0))  # 1e-4 … 0.32
EVAL_TASK_SEED_BASE = 2**31  # meta-validation task seeds: above the training range [0, 2^30)
# design-run task seeds (selection rounds' design runs, benchmarks/lopt_steptrack.py): above
# the meta-validation seeds, so neither meta-training nor keep-best ever draws them
DESIGN_TASK_SEED_BASE = EVAL_TASK_SEED_BASE + 10**6


class TaskDistributionProblem:
    """Meta-train one modifier on a distribution of tasks.

    Args:
        net: how to build the self-referential net for a task — a ``describe()`` dict of a
            :class:`~selfref.net.SelfReferentialNet` (core, core options, analyzer and
            evaluation configs); the normal model is each sampled task.
        distribution: the task distribution (default :class:`DistributionConfig`).
        meta_loss: ``"log_sum"`` (default) or ``"sum"``.
        loss_floor: ε added to Q inside the log (meta-loss and evaluation score).
        weighting: ``"uniform"`` or ``"linear"`` step weights.
        outer_split: the split the meta-objective reads (never shown to the optimizer).
        outer_examples: at most this many of its examples (the first ones) per step.
        eval_tasks, eval_instances, eval_steps: the held-out evaluation.
        device, dtype: where the tasks live.
        cache_size: tasks kept built (a task is rebuilt from its seed when evicted).
        packed: build every net with ``packed=True`` (:class:`~selfref.net.SelfReferentialNet`:
            the analyzer and core run once on all parameter tensors packed into one vector;
            the same step to float rounding, faster on small nets; the ``lopt`` core). How
            the step is computed, not what is meta-trained: the exported optimizer is the
            same kind either way.
    """

    name = "task_distribution"

    def __init__(
        self,
        net: dict[str, Any],
        distribution: DistributionConfig | None = None,
        *,
        meta_loss: str = "log_sum",
        loss_floor: float = 1e-3,
        weighting: str = "uniform",
        outer_split: str = "test",
        outer_examples: int = 512,
        eval_tasks: int = 8,
        eval_instances: int = 4,
        eval_steps: int = 200,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_size: int = 4,
        packed: bool = False,
    ) -> None:
        if meta_loss not in META_LOSSES:
            raise ValueError(f"unknown meta_loss {meta_loss!r}; valid: {', '.join(META_LOSSES)}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        check_split(outer_split)
        if loss_floor < 0:
            raise ValueError(f"loss_floor must be >= 0, got {loss_floor}")
        self.loss_floor = loss_floor
        if outer_split == "train":
            raise ValueError("outer_split must be a held-out split (val or test), got 'train'")
        for name, v in (("eval_tasks", eval_tasks), ("eval_instances", eval_instances),
                        ("eval_steps", eval_steps), ("cache_size", cache_size),
                        ("outer_examples", outer_examples)):  # fmt: skip
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.net_description = dict(net)
        self.distribution = TaskDistribution(distribution)
        self.meta_loss, self.weighting, self.outer_split = meta_loss, weighting, outer_split
        self.outer_examples = outer_examples
        self.eval_tasks, self.eval_instances, self.eval_steps = (
            eval_tasks,
            eval_instances,
            eval_steps,
        )
        self.device, self.dtype = torch.device(device), dtype
        self.cache_size = cache_size
        self.packed = bool(packed)
        self._cache: OrderedDict[int, tuple[Any, SelfReferentialNet, TaskFamily]] = OrderedDict()
        self._reference: dict[int, float] | None = None
        self._reference_cost = 0.0
        # a net on task 0: what checkpoints describe (MetaTrainer.state_dict reads .net)
        self.net = self.task(0)[1]

    @classmethod
    def from_config(
        cls,
        problem: dict[str, Any],
        net: dict[str, Any],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TaskDistributionProblem:
        """Build from plain data (a preset's ``[problem]`` and ``[net]`` tables).

        ``net`` holds ``core``, ``core_options``, ``analyzer`` (AnalyzerConfig fields) and
        ``evaluation`` (EvaluationConfig fields) (``SelfReferentialNet.from_task`` builds it:
        the ``lopt`` core's feature columns default to the analyzer's).

        Raises:
            ValueError: an unknown key (naming the valid ones) or a bad value.
        """
        from selfref.net.analyzing import AnalyzerConfig
        from selfref.net.evaluation import EvaluationConfig

        problem = dict(problem)
        if problem.pop("kind", cls.name) != cls.name:
            raise ValueError(f"problem kind must be {cls.name!r}, got {problem.get('kind')!r}")
        valid = {"distribution", "meta_loss", "loss_floor", "weighting", "outer_split",
                 "outer_examples", "eval_tasks",
                 "eval_instances", "eval_steps", "cache_size", "packed"}  # fmt: skip
        bad = sorted(set(problem) - valid)
        if bad:
            raise ValueError(f"unknown problem option(s) {bad}; valid: {sorted(valid)}")
        bad = sorted(set(net) - {"core", "core_options", "analyzer", "evaluation"})
        if bad:
            raise ValueError(
                f"unknown net key(s) {bad}; valid: core, core_options, analyzer, evaluation"
            )
        an = dict(net.get("analyzer", {}))
        an["momentum_decays"] = tuple(an.get("momentum_decays", ()))
        analyzer = AnalyzerConfig(**an)
        core = str(net.get("core", "lopt"))
        core_options = dict(net.get("core_options", {}))
        task = build_task(TaskDistribution().sample(0), device=device, dtype=dtype)
        ref = SelfReferentialNet.from_task(
            task,
            core=core,
            analyzer=analyzer,
            evaluation=EvaluationConfig(**net.get("evaluation", {})),
            **core_options,
        )
        dist = problem.pop("distribution", None)
        return cls(
            ref.describe(),
            DistributionConfig.from_dict(dist) if dist else None,
            device=device,
            dtype=dtype,
            **problem,
        )

    @classmethod
    def from_spec(
        cls,
        spec: dict[str, Any],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TaskDistributionProblem:
        """Build from a ``selfref meta-train`` spec with a ``[problem]`` table (e.g. the
        ``lopt`` preset): ``core``, ``core_options``, ``analyzer`` and ``evaluation`` describe
        the net, ``problem`` this problem (``meta`` is the trainer's, not read here)."""
        keys = ("core", "core_options", "analyzer", "evaluation")
        net: dict[str, Any] = {k: spec[k] for k in keys if k in spec}
        return cls.from_config(spec["problem"], net, device=device, dtype=dtype)

    # -- tasks -----------------------------------------------------------------------------

    def task(self, seed: int) -> tuple[Any, SelfReferentialNet, TaskFamily]:
        """(task, net, family) of task ``seed``, built once and cached."""
        seed = int(seed)
        if seed in self._cache:
            self._cache.move_to_end(seed)
            return self._cache[seed]
        task = build_task(self.distribution.sample(seed), device=self.device, dtype=self.dtype)
        net = SelfReferentialNet.from_description(task, self.net_description, self.packed)
        entry = (task, net, TaskFamily(task))
        self._cache[seed] = entry
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return entry

    def batch(self, net: SelfReferentialNet, family: TaskFamily, t: int, seeds: list[int]) -> Batch:
        """Training minibatch t of the instances, with a val one when the net reads it."""
        b: Any = family.batch("train", t, seeds)
        if net.evaluation.reads_heldout(t):
            b = {**b, "heldout": family.batch("val", t, seeds)}
        return b

    # -- the protocol ----------------------------------------------------------------------

    def init_meta_params(self, generator: torch.Generator) -> Params:
        phi = self.net.init_meta_params(generator)
        return {k: v.to(device=self.device, dtype=self.dtype) for k, v in phi.items()}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "net": self.net_description,
            "distribution": self.distribution.config.to_dict(),
            "meta_loss": self.meta_loss,
            "loss_floor": self.loss_floor,
            "weighting": self.weighting,
            "outer_split": self.outer_split,
            "outer_examples": self.outer_examples,
            "eval": [self.eval_tasks, self.eval_instances, self.eval_steps],
            **({"packed": True} if self.packed else {}),
        }

    def init_inner(
        self, meta_params: Params, generator: torch.Generator, n: int, horizon: int, step: int
    ) -> Inner:
        """n instances of one task drawn from ``generator`` (task and instance seeds in
        [0, 2^30)); the horizon is ``horizon`` times the task's ``horizon_frac``."""
        task_seed = int(torch.randint(0, 2**30, (1,), generator=generator))
        seeds = torch.randint(0, 2**30, (n,), generator=generator).tolist()
        task, net, family = self.task(task_seed)
        h = max(1, round(horizon * task.spec.horizon_frac))
        return self._start(net, family, detach_tree(meta_params), task_seed, seeds, h)

    def _start(
        self,
        net: SelfReferentialNet,
        family: TaskFamily,
        phi: Params,
        task_seed: int,
        seeds: list[int],
        horizon: int,
    ) -> Inner:
        params = family.init_params(seeds)
        state = vmap(lambda p: net.init_state(phi, p, horizon=horizon))(params)
        task_ids = torch.full((len(seeds),), task_seed, dtype=torch.int64)
        return Inner({"params": params, "state": state, "task": task_ids}, seeds, 0, horizon)

    def unroll(
        self, meta_params: Params, inner: Inner, length: int, per_instance: bool = False
    ) -> Truncation:
        inner.check_truncation(length)
        task_ids = inner.data["task"]
        task_seed = int(task_ids[0])
        task, net, family = self.task(task_seed)
        seeds = inner.seeds
        params, state = inner.data["params"], inner.data["state"]
        x, y = task.data[self.outer_split]
        outer_batch = {"x": x[: self.outer_examples], "y": y[: self.outer_examples]}
        losses, train, upd = [], [], []
        reads = 0
        metrics: dict[str, Tensor] = {}
        for t in range(inner.t, inner.t + length):
            batch = self.batch(net, family, t, seeds)
            reads += int("heldout" in batch)
            params, state, metrics = net.step_many(meta_params, params, state, batch, per_instance)
            outer = vmap(task.loss, in_dims=(0, None))(params, outer_batch)  # (n,)
            losses.append(outer)
            train.append(metrics["loss"].detach())
            upd.append(metrics["update_norm"])
        traj = torch.stack(losses, dim=1)  # (n, K): Q_outer(θ_{t+1})
        if self.weighting == "linear":
            w = torch.arange(inner.t + 1, inner.t + length + 1, dtype=traj.dtype) / inner.horizon
        else:
            w = torch.ones(length, dtype=traj.dtype)
        w = w.to(traj.device)
        per_step = torch.log(traj + self.loss_floor) if self.meta_loss == "log_sum" else traj
        loss = (per_step * w).sum(dim=1)  # (n,)
        n = inner.n
        out = {
            "inner/final_loss": float(train[-1].mean()),
            "outer/final_loss": float(traj[:, -1].detach().mean()),
            "modify/update_norm": float(torch.stack(upd).mean()),
            "task/horizon": float(inner.horizon),
            "task/params": float(sum(v[0].numel() for v in params.values())),
        }
        for k, v in metrics.items():
            if k.startswith(("lopt/", "hypernet/")) and isinstance(v, Tensor):
                out[f"core/{k.split('/', 1)[1]}"] = float(v.double().mean())
        new_data = {"params": params, "state": state, "task": task_ids}
        return Truncation(
            loss=loss,
            inner=Inner(new_data, seeds, inner.t + length, inner.horizon),
            grad_evals=float(
                n * length * (1 + 0.5 * len(y) / task.batch_size)
                + n * reads * net.evaluation.config.heldout_cost
            ),
            backward_evals=float(n * length),
            metrics=out,
            per_step=traj.detach(),
        )

    # -- held-out evaluation ---------------------------------------------------------------

    def _eval_seeds(self) -> list[int]:
        return [EVAL_TASK_SEED_BASE + i for i in range(self.eval_tasks)]

    def _instances(self) -> list[int]:
        return [EVAL_TASK_SEED_BASE + 7919 * (i + 1) for i in range(self.eval_instances)]

    def rollout(self, meta_params: Params, task_seed: int, steps: int | None = None) -> Tensor:
        """Final outer-split loss (eval_instances,) of φ on meta-validation task ``task_seed``."""
        steps = steps or self.eval_steps
        task, net, family = self.task(task_seed)
        phi = detach_tree(meta_params)
        seeds = self._instances()
        inner = self._start(net, family, phi, task_seed, seeds, steps)
        params, state = inner.data["params"], inner.data["state"]
        with torch.no_grad():
            for t in range(steps):
                params, state, _ = net.step_many(
                    phi, params, state, self.batch(net, family, t, seeds)
                )
        return family.final_loss(params, self.outer_split, steps, seeds)

    def reference(self) -> dict[int, float]:
        """{task seed: mean log10 outer loss of Adam tuned on val} (computed once)."""
        if self._reference is None:
            from selfref.meta.baselines import best_setting, run_grid

            ref = {}
            for s in self._eval_seeds():
                _, _, family = self.task(s)
                settings = [{"lr": lr} for lr in EVAL_LR_GRID]
                run = run_grid(family, "adam", settings, self._instances(), self.eval_steps)
                best = best_setting(run)
                outer = run.test if self.outer_split == "test" else run.val
                ref[s] = float(torch.log10(outer[best] + self.loss_floor).mean())
            runs = len(EVAL_LR_GRID) * self.eval_instances * self.eval_steps
            self._reference_cost = float(self.eval_tasks * runs)
            self._reference = ref
        return self._reference

    def evaluate(self, meta_params: Params) -> dict[str, float]:
        ref = self.reference()
        diffs = []
        for s in self._eval_seeds():
            final = self.rollout(meta_params, s)
            v = float(torch.log10(final + self.loss_floor).mean())
            diffs.append(v - ref[s] if math.isfinite(v) else math.inf)
        score = sum(diffs) / len(diffs)
        per_task = self.eval_instances * self.eval_steps
        ref_cost, self._reference_cost = self._reference_cost, 0.0  # charged once
        return {
            "score": score,
            "log10_ratio_vs_tuned_adam": score,
            "win_frac": sum(d < 0 for d in diffs) / len(diffs),
            "grad_evals": float(len(diffs) * per_task * 1.5) + ref_cost,
        }
