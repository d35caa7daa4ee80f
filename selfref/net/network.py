"""``SelfReferentialNet``: the four submodels composed into one pure modification step.

Schmidhuber (1993) splits a self-referential network into a normal model (does the task),
an evaluation model (measures the quality Q of the current weights), an analyzing model
(inspects the weights, their gradients and history) and a modifying model (changes the
weights). Andrychowicz et al. 2016 give the concrete instance implemented by default: Q is
the task loss, the analyzer preprocesses ∇θQ (appendix A), the modifier is a coordinatewise
LSTM, and θ_{t+1} = θ_t + g_t(∇θQ, φ).

Calling convention (chosen once, used everywhere): the meta-parameters are passed
explicitly as the first argument, ``net.step(meta_params, params, state, batch) ->
(params, state, metrics)``; ``net.bind(meta_params)`` returns the closure
``step(params, state, batch)`` of ../shared/DESIGN.md. Nothing is stored on ``self`` but the
submodels' configuration, so ``torch.func.vmap`` maps ``step`` over many task instances.

Meta-parameters are one flat ``Params`` dict: the core's under ``"core.<name>"`` and the
learned value model's (optional) under ``"eval.<name>"``. The state (``NetState``) is a
plain dict — ``{"core": CoreState, "analyzer": {...}, "step": 0-d int tensor}`` — never
mutated: every step builds a new one.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any

import torch
from torch import Tensor

from selfref.net.analyzing import Analyzer, AnalyzerConfig
from selfref.net.cores import make_core
from selfref.net.cores.base import Core
from selfref.net.evaluation import EvaluationConfig, EvaluationModel
from selfref.net.modifying import Modifier
from selfref.net.normal import NormalModel
from selfref.net.packing import PACKED, segments_of
from selfref.params import Params, flatten
from selfref.tasks.base import Batch, Task

__all__ = [
    "SelfReferentialNet",
    "NetState",
    "split_meta_params",
    "core_config_dict",
    "modify",
    "modify_packed_many",
    "init_modify_state",
    "modifying_parts",
    "can_run_packed",
    "runs_packed",
]

NetState = dict[str, Any]  # {"core": CoreState, "analyzer": dict[str, Tensor], "step": Tensor}


def split_meta_params(meta_params: Params) -> tuple[Params, Params]:
    """``{"core.a": x, "eval.b": y}`` -> (``{"a": x}``, ``{"b": y}``)."""
    core = {k[5:]: v for k, v in meta_params.items() if k.startswith("core.")}
    ev = {k[5:]: v for k, v in meta_params.items() if k.startswith("eval.")}
    if len(core) + len(ev) != len(meta_params):
        bad = [k for k in meta_params if not k.startswith(("core.", "eval."))]
        raise ValueError(f"meta-parameter names must start with 'core.' or 'eval.', got {bad}")
    return core, ev


def core_config_dict(core: Core) -> dict[str, Any]:
    """The keyword options that rebuild ``core`` with ``make_core(core.name, **options)``."""
    cfg = getattr(core, "config", None)
    if cfg is None:
        return {}
    if not is_dataclass(cfg) or isinstance(cfg, type):
        raise ValueError(f"core {core.name!r} has a config that is not a dataclass: {cfg!r}")
    return asdict(cfg)


def modify(
    analyzer: Analyzer,
    modifier: Modifier,
    core_phi: Params,
    params: Params,
    grads: Params,
    analyzer_state: dict[str, Tensor],
    core_state: Any,
    context: dict[str, Any] | None = None,
    packed: bool = False,
) -> tuple[Params, Params, dict[str, Tensor], Any, dict[str, Any]]:
    """The analyzing and modifying models on one instance, defined once.

    Features from (θ, ∇θQ, the analyzer's history and — with ``AnalyzerConfig(core_stats=K)``
    — the core's own state statistics; with ``context`` the evaluation model's measurements,
    the training and held-out loss), then the core's Δθ. ``SelfReferentialNet.step``,
    ``step_many`` (under ``vmap``) and :class:`~selfref.net.optimizer.LearnedOptimizer` all
    go through this function, so a checkpoint behaves the same on every path.

    With ``packed`` every parameter tensor is packed into one vector
    (:mod:`selfref.net.packing`) and the analyzer and the core take each op once over all
    coordinates instead of once per tensor: the same mathematics to float rounding, the
    analyzer's state that of the packed params (``analyzer.init_state({PACKED: θ})``). For a
    core that runs packed (``Modifier.packs``: the ``lopt`` core) and an analyzer without
    ``core_stats``.

    Returns:
        (θ + Δθ, Δθ, new analyzer state, new core state, the core's metrics).
    """
    if packed:
        return _modify_packed(
            analyzer, modifier, core_phi, params, grads, analyzer_state, core_state, context
        )
    stats = None
    if analyzer.config.core_stats:
        stats = modifier.core.state_stats(core_phi, core_state)  # type: ignore[attr-defined]
    if analyzer.config.reads_context:  # only analyzers that read losses get the context
        feats, analyzer_state = analyzer(params, grads, analyzer_state, stats, context)
    else:
        feats, analyzer_state = analyzer(params, grads, analyzer_state, stats)
    new_params, updates, core_state, metrics = modifier(core_phi, params, feats, core_state)
    return new_params, updates, analyzer_state, core_state, metrics


def init_modify_state(
    analyzer: Analyzer,
    modifier: Modifier,
    core_phi: Params,
    params: Params,
    horizon: int | None = None,
    packed: bool = False,
) -> tuple[dict[str, Tensor], Any]:
    """The analyzer's and the core's state before :func:`modify`'s first step on one
    instance; with ``packed``, those of the packed params (every 0-d tensor as (1,), so that
    m instances' read (m, 1) and broadcast over each instance's coordinates)."""
    core = modifier.init_state(core_phi, params)
    if not packed:
        return analyzer.init_state(params, horizon=horizon), core
    flat = {PACKED: flatten(params)}
    an = _scalars_as_vectors(analyzer.init_state(flat, horizon=horizon))
    return an, _scalars_as_vectors(core)


def _modify_packed(
    analyzer: Analyzer, modifier: Modifier, core_phi: Params, params: Params, grads: Params,
    analyzer_state: dict[str, Tensor], core_state: Any, context: dict[str, Any] | None,
) -> tuple[Params, Params, dict[str, Tensor], Any, dict[str, Any]]:  # fmt: skip
    """:func:`modify` with ``packed=True`` on one instance: as a batch of one."""
    one = _tree(lambda v: v.unsqueeze(0))
    new_params, updates, an_state, core_state, metrics = modify_packed_many(
        analyzer, modifier, core_phi, one(params), one(grads), one(analyzer_state),
        one(core_state), one(context or {}),
    )  # fmt: skip
    out = _tree(lambda v: v.squeeze(0))
    return out(new_params), out(updates), out(an_state), out(core_state), out(metrics)


def _grad_norm(grads: Params, dtype: torch.dtype, packed: bool, batched: bool = False) -> Tensor:
    """‖∇θQ‖ (detached, summed in float64) for the metrics: per tensor, or over the packed
    vector (``packed``); with ``batched`` of each of m instances, (m,)."""
    if batched:
        flat = torch.cat([x.detach().flatten(1) for x in grads.values()], dim=1)
        sq = (flat.to(torch.float64) ** 2).sum(-1)
    elif packed:
        sq = (flatten({k: x.detach() for k, x in grads.items()}).to(torch.float64) ** 2).sum()
    else:
        sq = torch.stack([(x.detach().to(torch.float64) ** 2).sum() for x in grads.values()]).sum()
    return torch.sqrt(sq).to(dtype)


def _scalars_as_vectors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A packed net's state: every 0-d tensor as (1,)."""
    return {k: v.reshape(1) if v.dim() == 0 else v for k, v in state.items()}


def _tree(fn: Any) -> Any:
    """``fn`` on every tensor of a dict of tensors and dicts of tensors."""

    def apply(tree: dict) -> dict:
        return {k: apply(v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}

    return apply


def modify_packed_many(
    analyzer: Analyzer,
    modifier: Modifier,
    core_phi: Params,
    params: Params,
    grads: Params,
    analyzer_state: dict[str, Tensor],
    core_state: Any,
    context: dict[str, Any] | None = None,
) -> tuple[Params, Params, dict[str, Tensor], Any, dict[str, Any]]:
    """:func:`modify` with ``packed=True`` on m instances that share φ, as one batch.

    Every tensor has a leading instance dimension m (the states' scalars are (m, 1), as
    :meth:`SelfReferentialNet.init_state` makes them for a packed net); the m instances'
    tensors are packed into (m, n) and the analyzer and core run once on all of them,
    without ``torch.func.vmap`` (whose per-op cost is most of a small step's). Returns
    :func:`modify`'s outputs, each with the leading m (metrics (m,))."""
    segments = segments_of(params)
    flat_params = {PACKED: segments.pack(params)}
    flat_grads = {PACKED: segments.pack(grads)}
    if analyzer.config.reads_context:
        ctx = dict(context or {})
        if "heldout_grad" in ctx:
            ctx["heldout_grad"] = {PACKED: segments.pack(ctx["heldout_grad"])}
        feats, analyzer_state = analyzer(
            flat_params, flat_grads, analyzer_state, None, ctx, segments=segments
        )
    else:
        feats, analyzer_state = analyzer(flat_params, flat_grads, analyzer_state, segments=segments)
    new_params, updates, core_state, metrics = modifier.packed(
        core_phi, params, feats[PACKED], core_state, segments
    )
    return new_params, updates, analyzer_state, core_state, metrics


def modifying_parts(desc: dict[str, Any]) -> tuple[Analyzer, Modifier, EvaluationConfig]:
    """The analyzer, modifier and evaluation config of a :meth:`SelfReferentialNet.describe`
    dict — everything of the network but the task (what a learned optimizer needs)."""
    an = dict(desc.get("analyzer", {}))
    an["momentum_decays"] = tuple(an.get("momentum_decays", ()))
    analyzer = Analyzer(AnalyzerConfig(**an))
    opts = {k: v for k, v in desc.get("core_options", {}).items() if k != "feature_dim"}
    opts = {"feature_dim": analyzer.feature_dim, **opts}
    if desc["core"] == "srwm" and analyzer.config.core_stats:
        opts.setdefault("read_own_stats", False)
    modifier = Modifier(make_core(desc["core"], **opts))
    return analyzer, modifier, EvaluationConfig(**desc.get("evaluation", {}))


def can_run_packed(analyzer: Analyzer, modifier: Modifier) -> bool:
    """Whether an analyzer and a modifier can take packed steps (``packed=True``): a core
    that runs packed and an analyzer without core_stats."""
    return not analyzer.config.core_stats and modifier.packs


def runs_packed(desc: dict[str, Any]) -> bool:
    """:func:`can_run_packed` of the network of a :meth:`SelfReferentialNet.describe` dict."""
    analyzer, modifier, _ = modifying_parts(desc)
    return can_run_packed(analyzer, modifier)


def _lopt_columns(names: tuple[str, ...], opts: dict[str, Any]) -> dict[str, Any]:
    """``opts`` with the ``lopt`` core's feature columns defaulting to the analyzer's
    (``base_index``: momentum 0.9, ``param_index``: θ, ``progress_index``, ``decay_index``:
    the held-out gradient, which turns the held-out decay on; ``trend_index`` and
    ``heldout_trend_index``: the two loss trends), -1 where it has none."""
    out = dict(opts)
    for key, col in (
        ("base_index", "momentum0.9.value"),
        ("param_index", "param"),
        ("progress_index", "progress"),
        ("decay_index", "heldout_grad"),  # never fed to a per-coordinate rule
        ("trend_index", "loss_trend"),  # the bold driver's and the decay gate's
        ("heldout_trend_index", "heldout_trend"),  # the decay gate's
    ):
        out.setdefault(key, names.index(col) if col in names else -1)
    return out


class SelfReferentialNet:
    """A network that modifies its own (normal-model) weights, one pure step at a time.

    Args:
        normal: the task network (weights θ).
        evaluation: Q and ∇θQ (and the optional learned value model).
        analyzer: per-coordinate features for the modifier.
        modifier: the core that emits Δθ.
        packed: compute the analyzer and the core on all parameter tensors packed into one
            vector (``modify(..., packed=True)``; the ``lopt`` core): the same step to float
            rounding, with each op dispatched once instead of once per tensor, which is most
            of a meta-step's time on small nets; :meth:`step_many` then runs the m
            instances as one batch, without ``vmap``. The analyzer's state then holds
            packed vectors, and every scalar of the state is (1,) in place of 0-d.
            Meta-training turns it on with the task distribution's ``packed`` option;
            :class:`~selfref.net.optimizer.LearnedOptimizer` runs per tensor.

    Example:
        >>> from selfref.tasks import make
        >>> task = make("quadratic")
        >>> net = SelfReferentialNet.from_task(task, core="lstm")
        >>> phi = net.init_meta_params(torch.Generator().manual_seed(0))
        >>> theta = task.init_params(torch.Generator().manual_seed(1))
        >>> state = net.init_state(phi, theta)
        >>> theta, state, m = net.step(phi, theta, state, task.batch("train", 0, seed=1))
        >>> int(state["step"])
        1
    """

    def __init__(
        self,
        normal: NormalModel,
        evaluation: EvaluationModel,
        analyzer: Analyzer,
        modifier: Modifier,
        packed: bool = False,
    ) -> None:
        if packed and not can_run_packed(analyzer, modifier):
            raise ValueError(
                f"packed=True needs a core that runs packed (lopt; got {modifier.core.name!r}) "
                "and an analyzer without core_stats"
            )
        if analyzer.config.core_stats and not hasattr(modifier.core, "state_stats"):
            raise ValueError(
                f"the analyzer reads core statistics but core {modifier.core.name!r} has no "
                "state_stats (the SRWM core has)"
            )
        if analyzer.feature_dim != modifier.feature_dim:
            raise ValueError(
                f"the analyzer emits {analyzer.feature_dim} features per coordinate but core "
                f"{modifier.core.name!r} expects {modifier.feature_dim}"
            )
        self.normal = normal
        self.evaluation = evaluation
        self.analyzer = analyzer
        self.modifier = modifier
        self.packed = packed

    @classmethod
    def from_task(
        cls,
        task: Task,
        core: str | Core = "lstm",
        analyzer: AnalyzerConfig | None = None,
        evaluation: EvaluationConfig | None = None,
        packed: bool = False,
        **core_options: Any,
    ) -> SelfReferentialNet:
        """Compose the default network for ``task``.

        A core given by name is built with ``feature_dim`` set to the analyzer's feature
        size (every registered core takes that option) plus ``core_options``. When the
        analyzer reads the core's statistics (``core_stats``), the SRWM core's own copy of
        them (``read_own_stats``) is switched off unless ``core_options`` says otherwise.
        The ``lopt`` core's feature columns (``base_index``: momentum 0.9, ``param_index``:
        θ, ``progress_index``, and ``decay_index``: the held-out gradient, which turns the
        held-out decay on) default to the analyzer's, -1 where it has none — the ``ensemble``
        core's ``lopt`` members' too.
        """
        normal = NormalModel(task)
        an = Analyzer(analyzer)
        if isinstance(core, str):
            opts = {"feature_dim": an.feature_dim, **core_options}
            if core == "srwm" and an.config.core_stats:
                opts.setdefault("read_own_stats", False)
            if core == "lopt":
                opts = _lopt_columns(an.config.feature_names, opts)
            if core == "ensemble" and opts.get("member", "lopt") == "lopt":
                member = {"feature_dim": an.feature_dim, **opts.get("member_options", {})}
                opts["member_options"] = _lopt_columns(an.config.feature_names, member)
            core = make_core(core, **opts)
        elif core_options:
            raise ValueError("core_options only apply when the core is given by name")
        return cls(normal, EvaluationModel(normal, evaluation), an, Modifier(core), packed)

    @property
    def core(self) -> Core:
        return self.modifier.core

    def describe(self) -> dict[str, Any]:
        """Everything needed to rebuild this network for a task (goes in checkpoints)."""
        return {
            "core": self.core.name,
            "core_options": core_config_dict(self.core),
            "analyzer": asdict(self.analyzer.config),
            "evaluation": asdict(self.evaluation.config),
        }

    @classmethod
    def from_description(
        cls, task: Task, desc: dict[str, Any], packed: bool = False
    ) -> SelfReferentialNet:
        """Inverse of :meth:`describe` for a (possibly different) task (``packed``: see
        :class:`SelfReferentialNet`; how the step is computed, not what the net is)."""
        an = dict(desc.get("analyzer", {}))
        an["momentum_decays"] = tuple(an.get("momentum_decays", ()))
        return cls.from_task(
            task,
            core=desc["core"],
            analyzer=AnalyzerConfig(**an),
            evaluation=EvaluationConfig(**desc.get("evaluation", {})),
            packed=packed,
            **{k: v for k, v in desc.get("core_options", {}).items() if k != "feature_dim"},
        )

    # -- meta-parameters and state ---------------------------------------------------------

    def init_meta_params(self, generator: torch.Generator) -> Params:
        """φ: the core's weights (``core.*``) and the value model's (``eval.*``, optional)."""
        phi = {f"core.{k}": v for k, v in self.modifier.init_meta_params(generator).items()}
        phi.update({f"eval.{k}": v for k, v in self.evaluation.init_meta_params(generator).items()})
        return phi

    def init_state(
        self, meta_params: Params, params: Params, horizon: int | None = None
    ) -> NetState:
        """The state before the first step; ``horizon`` (steps of the run) is required by
        analyzers that read training progress (``AnalyzerConfig.needs_horizon``)."""
        core_phi, _ = split_meta_params(meta_params)
        ref = next(iter(params.values()))
        analyzer, core = init_modify_state(
            self.analyzer, self.modifier, core_phi, params, horizon, self.packed
        )
        step = torch.zeros((), dtype=torch.int64, device=ref.device)
        return {"core": core, "analyzer": analyzer, "step": step}

    # -- the pure step ---------------------------------------------------------------------

    def step(
        self, meta_params: Params, params: Params, state: NetState, batch: Batch
    ) -> tuple[Params, NetState, dict[str, Tensor]]:
        """One self-modification: Q and ∇θQ on ``batch``, features, Δθ, θ + Δθ.

        Returns:
            (new params, new state, metrics) where ``metrics["loss"]`` is Q at the *incoming*
            params (differentiable in φ through earlier steps), ``"grad_norm"`` is ‖∇θQ‖
            (detached) and ``"update_norm"`` is ‖Δθ‖ (detached).
        """
        core_phi, _ = split_meta_params(meta_params)
        q, grads = self.evaluation.value_and_grad(params, batch)
        ctx = {"loss": q.detach(), **self.evaluation.heldout_value_and_grad(params, batch)}
        new_params, _, an_state, core_state, metrics = modify(
            self.analyzer,
            self.modifier,
            core_phi,
            params,
            grads,
            state["analyzer"],
            state["core"],
            ctx,
            self.packed,
        )
        metrics = {**metrics, "loss": q, "grad_norm": _grad_norm(grads, q.dtype, self.packed)}
        new_state = {"core": core_state, "analyzer": an_state, "step": state["step"] + 1}
        return new_params, new_state, metrics

    def step_many(
        self,
        meta_params: Params,
        params: Params,
        state: NetState,
        batch: Batch,
        per_instance: bool = False,
    ) -> tuple[Params, NetState, dict[str, Tensor]]:
        """``vmap(step)`` over a leading instance dimension m, computed faster.

        Same mathematics as ``torch.func.vmap(self.step, in_dims=(None, 0, 0, 0))``, but Q
        and ∇θQ come from the evaluation model's batched path
        (:meth:`EvaluationModel.value_and_grad_many`: one reverse pass of Σ_i Q_i(θ_i), each
        instance's gradient its own since the instances share no weights) instead of a
        ``torch.func.grad`` per instance under ``vmap``, which costs far more per step; the
        analyzer and core are vmapped. Works under ``torch.no_grad`` too (the gradient is
        taken with grad enabled).

        Args:
            meta_params: φ, shared by all instances; with ``per_instance`` every tensor has
                a leading dimension m and instance i runs φ_i (ES/PES particles, evaluated
                together under ``vmap``).
            params, state, batch: stacked, leading dimension m.
            per_instance: see ``meta_params``.

        Returns:
            As :meth:`step`, every tensor with a leading dimension m; the evaluation model's
            extra measurements (e.g. ``heldout_loss``) are in the metrics.
        """
        core_phi, _ = split_meta_params(meta_params)
        q, grads, extra, ps = self.evaluation.value_and_grad_many(params, batch)

        ctx = {"loss": q.detach(), **extra}  # what the evaluation model measured, (m,) each
        new_params, an_state, core_state, metrics = self.modify_many(
            core_phi, ps, grads, state["analyzer"], state["core"], ctx, per_instance
        )
        shown = {k: v for k, v in extra.items() if k != "heldout_grad"}  # scalars only
        metrics = {**metrics, **shown, "loss": q}
        new_state = {"core": core_state, "analyzer": an_state, "step": state["step"] + 1}
        return new_params, new_state, metrics

    def modify_many(
        self,
        core_phi: Params,
        params: Params,
        grads: Params,
        analyzer_state: dict,
        core_state: dict,
        ctx: dict,
        per_instance: bool = False,
    ) -> tuple[Params, dict, dict, dict[str, Tensor]]:
        """The analyzer-plus-core half of :meth:`step_many`, over the instances.

        Reads the gradients and the evaluation model's measurements ``ctx`` (``ctx["loss"]``
        among them) and returns the new params, analyzer state, core state and metrics
        (``grad_norm`` added), every tensor with a leading dimension m. A packed net runs the
        m instances as one batch (:func:`modify_packed_many`) unless each has its own φ
        (``per_instance``). A method of its own so that ``benchmarks/lopt_compile.py`` can
        time it compiled and eager.
        """

        def one(phi: Params, p: Params, gr: Params, an: dict, cs: dict, c: dict) -> Any:
            new_p, _, an, cs, metrics = modify(
                self.analyzer, self.modifier, phi, p, gr, an, cs, c, self.packed
            )
            norm = _grad_norm(gr, c["loss"].dtype, self.packed)
            return new_p, an, cs, {**metrics, "grad_norm": norm}

        if self.packed and not per_instance:  # one batch, no vmap
            new_p, _, an, cs, metrics = modify_packed_many(
                self.analyzer, self.modifier, core_phi, params, grads, analyzer_state,
                core_state, ctx,
            )  # fmt: skip
            norm = _grad_norm(grads, ctx["loss"].dtype, True, batched=True)
            return new_p, an, cs, {**metrics, "grad_norm": norm}
        return torch.func.vmap(one, in_dims=(0 if per_instance else None, 0, 0, 0, 0, 0))(
            core_phi, params, grads, analyzer_state, core_state, ctx
        )

    def bind(self, meta_params: Params) -> Any:
        """``step(params, state, batch) -> (params, state, metrics)`` with φ fixed."""

        def step(params: Params, state: NetState, batch: Batch) -> tuple[Params, NetState, Any]:
            return self.step(meta_params, params, state, batch)

        return step
