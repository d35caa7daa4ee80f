"""``LearnedOptimizer``: a meta-trained modifier as a drop-in ``torch.optim.Optimizer``.

Andrychowicz et al. 2016 train an LSTM that maps gradients to updates; once trained, it is
an optimizer like any other. This wrapper loads the analyzer and core of a meta-training
checkpoint (``selfref meta-train`` / :class:`~selfref.meta.MetaTrainer`) and applies them,
coordinatewise, to the ``.grad`` of ordinary ``nn.Module`` parameters:
Δθ = core(φ, analyzer(θ, ∇θ)). The pure functional core does the arithmetic; only this thin
object wrapper keeps state (the analyzer's and core's state, under ``state_dict()``) and
writes the parameters in place, outside any differentiable loop.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = LearnedOptimizer(model.parameters())  # the packaged digits-mlp LSTM
    >>> loss = model(torch.ones(2, 4)).pow(2).mean()
    >>> loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from selfref import checkpoints
from selfref.net.network import modify, modifying_parts, split_meta_params
from selfref.params import Params

__all__ = ["LearnedOptimizer", "pretrained_checkpoint", "PRETRAINED_DIR"]

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


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


class LearnedOptimizer(torch.optim.Optimizer):
    """Applies a meta-trained modifier to ordinary parameters.

    Args:
        params: parameters (or parameter groups) to optimize.
        checkpoint: a meta-training checkpoint; None uses the packaged LSTM meta-trained on
            digits-mlp (:func:`pretrained_checkpoint`).
        which: ``"best"`` (φ chosen by held-out loss, default) or ``"last"``.
        meta_params, net: instead of a checkpoint, φ and a ``describe()`` dict of a
            :class:`~selfref.net.SelfReferentialNet`.
        update_scale: multiplies every update (1.0 = as meta-trained).
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
    ) -> None:
        if which not in ("best", "last"):
            raise ValueError(f"which must be 'best' or 'last', got {which!r}")
        super().__init__(params, {"update_scale": update_scale})
        if meta_params is None or net is None:
            if meta_params is not None or net is not None:
                raise ValueError("give both meta_params and net, or a checkpoint")
            ck = checkpoints.load_meta(checkpoint or pretrained_checkpoint())
            if "net" not in ck:
                raise ValueError(
                    f"checkpoint {str(checkpoint)!r} holds no learned optimizer (a "
                    f"{ck.get('problem', {}).get('kind', 'different')} meta-training)"
                )
            meta_params = checkpoints.meta_params_of(ck, which)
            net = ck["net"]
        self.analyzer, self.modifier, _ = modifying_parts(net)
        self.core = self.modifier.core
        self._phi, _ = split_meta_params({k: v.detach() for k, v in meta_params.items()})
        self._net_state: dict[str, Any] | None = None

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One learned update of every parameter (a missing ``.grad`` counts as zero)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ps = self._all_params()
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
            st = {
                "analyzer": self.analyzer.init_state(theta),
                "core": self.core.init_state(phi, theta),
                "shapes": {k: list(v.shape) for k, v in theta.items()},
            }
        _, updates, an_state, core_state, _ = modify(
            self.analyzer, self.modifier, phi, theta, grads, st["analyzer"], st["core"]
        )
        i = 0
        for g in self.param_groups:
            for p in g["params"]:
                p.add_(updates[f"p{i}"], alpha=g["update_scale"])
                i += 1
        self._net_state = {"analyzer": an_state, "core": core_state, "shapes": st["shapes"]}
        return loss

    def state_dict(self) -> dict[str, Any]:
        d = super().state_dict()
        d["learned_net_state"] = self._net_state
        return d

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self._net_state = state_dict.pop("learned_net_state", None)
        super().load_state_dict(state_dict)
