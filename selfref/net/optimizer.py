"""``LearnedOptimizer``: a meta-trained modifier as a drop-in ``torch.optim.Optimizer``.

Andrychowicz et al. 2016 train an LSTM that maps gradients to updates; once trained, it is
an optimizer like any other. This wrapper loads the analyzer and core of a meta-training
checkpoint (``selfref meta-train`` / :class:`~selfref.meta.MetaTrainer`) and applies them,
coordinatewise, to the ``.grad`` of ordinary ``nn.Module`` parameters:
Δθ = core(φ, analyzer(θ, ∇θ)). The pure functional core does the arithmetic; only this thin
object wrapper keeps state (the analyzer's and core's state, under ``state_dict()``) and
writes the parameters in place, outside any differentiable loop.

With no checkpoint it loads the shipped ``lopt`` optimizer (``pretrained/lopt.pt``: two
restarts of the ``lopt`` core meta-trained on a task distribution with a held-out objective,
issue 14, whose updates the ``ensemble`` core averages; ``selfref meta-train --preset
lopt-ensemble`` remakes it). That optimizer reads training progress —
tell it the run's length with ``total_steps`` (default: its meta-training horizon) — and
the training and held-out losses: pass ``step(closure)`` (the closure's loss is read) or
``step(loss=...)``, and ``step(heldout_loss=...)`` whenever a validation loss is measured
(it was meta-trained seeing one every ``heldout_every`` steps, :attr:`heldout_every`);
without them those features stay neutral. An optimizer meta-trained with the held-out
gradient (:attr:`heldout_grad`: the ``lopt`` core's held-out decay) wants
``step(heldout_closure=fn)`` instead, ``fn`` returning the loss of a validation minibatch:
the optimizer reads that loss and its gradient (``.grad`` is left alone).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = LearnedOptimizer(model.parameters(), total_steps=100)  # the shipped lopt
    >>> loss = model(torch.ones(2, 4)).pow(2).mean()
    >>> loss.backward(); opt.step(loss=loss); opt.zero_grad()
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from selfref import checkpoints
from selfref.net.network import (
    can_run_packed,
    init_modify_state,
    modify,
    modifying_parts,
    split_meta_params,
)
from selfref.params import Params

__all__ = [
    "LearnedOptimizer",
    "pretrained_checkpoint",
    "default_checkpoint",
    "with_core_options",
    "edited_checkpoint",
    "PRETRAINED_DIR",
]

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
DEFAULT_CHECKPOINT = "lopt.pt"  # the shipped learned optimizer (issue 14)


def default_checkpoint() -> Path:
    """The checkpoint ``LearnedOptimizer(params)`` loads: ``pretrained/lopt.pt``."""
    return PRETRAINED_DIR / DEFAULT_CHECKPOINT


def pretrained_checkpoint(task: str = "digits-mlp", core: str = "lstm") -> Path:
    """Path of a meta-trained checkpoint shipped in the package.

    Raises:
        ValueError: none shipped for (core, task); the message lists those that are.
    """
    p = PRETRAINED_DIR / f"{core}_{task}.pt"
    if not p.is_file():
        have = sorted(x.stem for x in PRETRAINED_DIR.glob("*.pt"))
        raise ValueError(
            f"no pretrained {core!r} checkpoint for task {task!r}; shipped: {', '.join(have)}"
        )
    return p


def with_core_options(net: dict[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a learned optimizer's ``net`` (a :meth:`SelfReferentialNet.describe` dict,
    a checkpoint's ``ck["net"]``) with its core's options updated by ``options``; for an
    ``ensemble`` core, every member's. A config edit of a meta-trained optimizer: φ stays as
    it is, so an option that changes φ's shapes or adds a meta-parameter is refused.

    Raises:
        ValueError: an option the core does not take, a value it refuses, or one that would
            change the meta-parameters.
    """
    out = copy.deepcopy(net)
    opts = out.setdefault("core_options", {})
    target = opts.setdefault("member_options", {}) if out["core"] == "ensemble" else opts
    before = modifying_parts(net)[1].core
    target.update(copy.deepcopy(dict(options)))
    after = modifying_parts(out)[1].core
    gen = torch.Generator()
    shapes = {k: v.shape for k, v in before.init_meta_params(gen.manual_seed(0)).items()}
    if {k: v.shape for k, v in after.init_meta_params(gen.manual_seed(0)).items()} != shapes:
        raise ValueError(
            f"core options {sorted(options)} change the meta-parameters; a config edit keeps φ"
        )
    return out


def edited_checkpoint(
    ck: dict[str, Any], options: Mapping[str, Any], source: str
) -> dict[str, Any]:
    """A copy of a learned-optimizer checkpoint with a config edit (:func:`with_core_options`)
    recorded under ``ck["edits"]`` (``source`` and the options, after any edits ``ck``
    already held); φ, the meta-training config and the provenance are kept as they are.

    Raises:
        ValueError: no options, a checkpoint without a learned optimizer, or an option
            :func:`with_core_options` refuses.
    """
    if not options:
        raise ValueError("a config edit needs at least one core option")
    if "net" not in ck:
        raise ValueError("the checkpoint holds no learned optimizer")
    out = dict(ck)
    out["net"] = with_core_options(ck["net"], options)
    out["edits"] = [*ck.get("edits", []), {"source": source, "core_options": dict(options)}]
    return out


class LearnedOptimizer(torch.optim.Optimizer):
    """Applies a meta-trained modifier to ordinary parameters.

    Args:
        params: parameters (or parameter groups) to optimize.
        checkpoint: a meta-training checkpoint; None uses the shipped ``lopt`` optimizer
            (:func:`default_checkpoint`).
        which: ``"best"`` (φ chosen by held-out loss, default) or ``"last"``.
        meta_params, net: instead of a checkpoint, φ and a ``describe()`` dict of a
            :class:`~selfref.net.SelfReferentialNet`.
        update_scale: multiplies every update (1.0 = as meta-trained).
        lr: another multiplier of every update, 1.0 by default: the learned optimizer has no
            learning rate of its own (its step comes out of the core), but torch's learning
            rate schedulers (``torch.optim.lr_scheduler``) read and write a group's ``lr``,
            so a scheduler attached to this optimizer scales the learned update by its factor
            (on top of the schedule the core learned). The core reads its own update, not
            the scaled one.
        total_steps: steps the run will take, for analyzers that read training progress;
            default the checkpoint's meta-training horizon (``inner_steps``).
        core_options: options of the core to change, with φ as it is
            (:func:`with_core_options`), e.g. ``{"decay_gate": "gap"}`` on the shipped one.
        packed: take each step with all parameters packed into one vector
            (:mod:`selfref.net.packing`; the ``lopt`` core and ensembles of it): the same
            update to float rounding, about twice as fast on small nets. None (the default):
            packed when the checkpoint's core runs packed (the shipped one does). The state
            is saved in its layout; under the default, :meth:`load_state_dict` takes the
            layout of the state it loads, and a state saved before packed steps existed is
            per tensor; with ``packed`` given, a state of the other layout is refused.
    """

    def __init__(
        self,
        params: Iterable[Any],
        checkpoint: str | Path | None = None,
        *,
        which: str = "best",
        meta_params: Params | None = None,
        net: dict[str, Any] | None = None,
        update_scale: float = 1.0,
        lr: float = 1.0,
        total_steps: int | None = None,
        core_options: Mapping[str, Any] | None = None,
        packed: bool | None = None,
    ) -> None:
        if which not in ("best", "last"):
            raise ValueError(f"which must be 'best' or 'last', got {which!r}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not lr >= 0:
            raise ValueError(f"lr (a multiplier of the learned update) must be >= 0, got {lr}")
        super().__init__(params, {"update_scale": update_scale, "lr": lr})
        horizon = None
        if meta_params is None or net is None:
            if meta_params is not None or net is not None:
                raise ValueError("give both meta_params and net, or a checkpoint")
            ck = checkpoints.load_meta(checkpoint or default_checkpoint())
            if "net" not in ck:
                raise ValueError(
                    f"checkpoint {str(checkpoint)!r} holds no learned optimizer (a "
                    f"{ck.get('problem', {}).get('kind', 'different')} meta-training)"
                )
            meta_params = checkpoints.meta_params_of(ck, which)
            net = ck["net"]
            horizon = int(ck.get("config", {}).get("inner_steps", 0)) or None
        if core_options:
            net = with_core_options(net, core_options)
        self.analyzer, self.modifier, evaluation = modifying_parts(net)
        self.heldout_every = evaluation.heldout_every
        self.heldout_grad = evaluation.heldout_grad
        self.total_steps = total_steps or horizon
        if self.analyzer.config.needs_horizon and self.total_steps is None:
            raise ValueError("this optimizer reads training progress: give total_steps")
        self.core = self.modifier.core
        can_pack = can_run_packed(self.analyzer, self.modifier)
        if packed and not can_pack:
            raise ValueError(
                f"packed=True needs a core that runs packed (lopt, or an ensemble of it; got "
                f"{self.core.name!r}) and an analyzer without core_stats"
            )
        self._layout_fixed, self._can_pack = packed is not None, can_pack
        self.packed = can_pack if packed is None else packed
        self._phi, _ = split_meta_params({k: v.detach() for k, v in meta_params.items()})
        self._net_state: dict[str, Any] | None = None

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor] | None = None,
        *,
        loss: Tensor | float | None = None,
        heldout_loss: Tensor | float | None = None,
        heldout_closure: Callable[[], Tensor] | None = None,
    ) -> Tensor | None:
        """One learned update of every parameter (a missing ``.grad`` counts as zero).

        Args:
            closure: re-evaluates the model and returns the loss (which is also read).
            loss: the training loss at the current parameters, if no closure gives it.
            heldout_loss: a held-out (validation) loss at the current parameters.
            heldout_closure: instead of ``heldout_loss``, returns the loss of a held-out
                minibatch at the current parameters; an optimizer with :attr:`heldout_grad`
                also reads its gradient (taken here, ``.grad`` untouched).

        Returns:
            the closure's loss (or ``loss``), as ``torch.optim`` optimizers do.
        """
        if heldout_closure is not None and heldout_loss is not None:
            raise ValueError("give heldout_loss or heldout_closure, not both")
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ps = self._all_params()
        held_grads = None
        if heldout_closure is not None:
            with torch.enable_grad():
                heldout_loss = heldout_closure()
                if self.heldout_grad:
                    gs = torch.autograd.grad(heldout_loss, ps, allow_unused=True)
                    held_grads = {
                        f"p{i}": torch.zeros_like(p) if g is None else g.detach()
                        for i, (p, g) in enumerate(zip(ps, gs))
                    }
            heldout_loss = heldout_loss.detach()
        theta = {f"p{i}": p.detach() for i, p in enumerate(ps)}
        grads = {
            f"p{i}": (p.grad.detach() if p.grad is not None else torch.zeros_like(p))
            for i, p in enumerate(ps)
        }
        ref = ps[0]
        phi = {k: v.to(device=ref.device, dtype=ref.dtype) for k, v in self._phi.items()}
        st = self._net_state
        if (
            st is None
            or set(st["shapes"]) != set(theta)
            or any(tuple(st["shapes"][k]) != tuple(theta[k].shape) for k in theta)
        ):
            an_state, core_state = init_modify_state(
                self.analyzer, self.modifier, phi, theta, self.total_steps, self.packed
            )
            st = {
                "analyzer": an_state,
                "core": core_state,
                "shapes": {k: list(v.shape) for k, v in theta.items()},
            }
        ctx: dict[str, Any] = {}
        for name, value in (("loss", loss), ("heldout_loss", heldout_loss)):
            if value is not None:
                ctx[name] = torch.as_tensor(value).detach().to(device=ref.device, dtype=ref.dtype)
        if held_grads is not None:
            ctx["heldout_grad"] = held_grads
        _, updates, an_state, core_state, _ = modify(
            self.analyzer,
            self.modifier,
            phi,
            theta,
            grads,
            st["analyzer"],
            st["core"],
            ctx,
            self.packed,
        )
        i = 0
        for g in self.param_groups:
            for p in g["params"]:
                p.add_(updates[f"p{i}"], alpha=g["update_scale"] * g["lr"])
                i += 1
        self._net_state = {"analyzer": an_state, "core": core_state, "shapes": st["shapes"]}
        return None if loss is None else torch.as_tensor(loss)

    def state_dict(self) -> dict[str, Any]:
        d = super().state_dict()
        d["learned_net_state"] = self._net_state
        d["learned_net_packed"] = self.packed
        return d

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        packed = bool(state_dict.pop("learned_net_packed", False))  # absent: per tensor
        net_state = state_dict.pop("learned_net_state", None)
        if net_state is not None and packed != self.packed:
            if self._layout_fixed or (packed and not self._can_pack):
                raise ValueError(
                    f"this state was saved by a LearnedOptimizer with packed={packed}; load "
                    f"it into one with packed={packed} or packed=None (the two keep their "
                    "state in other layouts)"
                )
            self.packed = packed  # the default follows the state's layout
        self._net_state = net_state
        super().load_state_dict(state_dict)
        for g in self.param_groups:  # a state saved before groups carried the multiplier
            g.setdefault("lr", 1.0)
