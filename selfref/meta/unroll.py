"""One truncation of the unrolled modification loop, differentiable in the meta-parameters.

Andrychowicz et al. 2016, section 2: the meta-loss of a trajectory is
L(φ) = Σ_{t=1}^{T} w_t f(θ_t) with w_t = 1, θ_{t+1} = θ_t + g_t(∇f(θ_t), φ), and the
optimizer is trained by truncated backpropagation through time over unrolls of T = 20 steps
(section 3). :func:`unroll` runs ``length`` steps of ``SelfReferentialNet.step`` from a
(detached) carry and returns the meta-loss over θ_1 … θ_T of this truncation: Q(θ_k) for
k ≥ 1 comes out of step k+1 (which evaluates Q at its incoming weights) and Q(θ_T) from one
extra forward pass on the next batch.

Two execution modes give the same numbers: ``"vmap"`` runs all m instances at once through
``SelfReferentialNet.step_many`` (``torch.func.vmap`` over instances); ``"loop"`` runs the
same code on one instance at a time in a Python loop (the reference the throughput benchmark
compares against).

Notation: m – instances, T – unroll length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from selfref.meta.family import index_tree, stack_trees
from selfref.net.network import NetState, SelfReferentialNet
from selfref.params import Params
from selfref.tasks.base import Batch

# metrics every step reports; anything else in a step's metrics comes from the core
_STEP_METRICS = ("loss", "update_norm", "grad_norm")

__all__ = ["UnrollOutput", "unroll", "META_LOSSES", "MODES", "OBJECTIVES"]

META_LOSSES: tuple[str, ...] = ("sum", "log_sum")
MODES: tuple[str, ...] = ("vmap", "loop")
OBJECTIVES: tuple[str, ...] = ("train", "heldout")


def _end_loss(net: SelfReferentialNet, params: Params, batch: Batch, heldout: bool) -> Tensor:
    """Q(θ_T) per instance on the batch after the last step (its held-out part if asked)."""
    if heldout:
        held: Any = batch["heldout"]  # a minibatch (dict) under the "heldout" key
        return vmap(net.normal.loss)(params, held)
    train = {k: v for k, v in batch.items() if k != "heldout"}
    return vmap(net.normal.loss)(params, train)


@dataclass
class UnrollOutput:
    """What one truncation returns.

    Attributes:
        meta_loss: scalar, mean over instances of Σ_t w_t·ℓ(Q(θ_t)), differentiable in φ.
        per_instance_loss: (m,) each instance's Σ_t w_t·ℓ(Q(θ_t)).
        params, state: the carry after the truncation (still attached to the graph).
        losses: (m, T+1) Q(θ_start) … Q(θ_end), detached.
        update_norm: (m, T) ‖Δθ‖ per step, detached.
        grad_norm: (m,) ‖∇θQ‖ at the last step, detached.
        final_loss: (m,) Q(θ_T) on the next batch, detached.
        core_metrics: the modifier core's own metrics at the last step (e.g. SRWM |ΔW| per
            sub-matrix, β, q/k entropy; hypernet direction/magnitude), detached, leading dim
            m ("vmap" mode only; empty in "loop" mode).
    """

    meta_loss: Tensor
    per_instance_loss: Tensor
    params: Params
    state: NetState
    losses: Tensor
    update_norm: Tensor
    grad_norm: Tensor
    final_loss: Tensor
    core_metrics: dict[str, Tensor] = field(default_factory=dict)


def _slice(tree: dict, i: int) -> dict:
    """Instance ``i`` of a stacked tree, keeping a leading dimension of 1."""
    return {k: _slice(v, i) if isinstance(v, dict) else v[i : i + 1] for k, v in tree.items()}


def _check(meta_loss: str, mode: str) -> None:
    if meta_loss not in META_LOSSES:
        raise ValueError(f"unknown meta_loss {meta_loss!r}; valid: {', '.join(META_LOSSES)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")


def unroll(
    net: SelfReferentialNet,
    meta_params: Params,
    params: Params,
    state: NetState,
    batch_fn: Callable[[int], Batch],
    start: int,
    length: int,
    meta_loss: str = "sum",
    mode: str = "vmap",
    per_instance: bool = False,
    objective: str = "train",
) -> UnrollOutput:
    """Run ``length`` steps from step index ``start`` on stacked instances.

    Args:
        net: the self-referential network.
        meta_params: φ (leaves that require grad when a meta-gradient is wanted).
        params, state: stacked carry {name: (m, *S)} and net state with leading dim m.
        batch_fn: ``t -> stacked batch`` of step t.
        start, length: first step index and number of steps (T).
        meta_loss: ``"sum"`` — Σ_t Q(θ_t) (paper); ``"log_sum"`` — Σ_t log Q(θ_t), which
            weighs late, small losses as much as early ones (an option beside the paper).
        mode: ``"vmap"`` or ``"loop"``.
        per_instance: φ has a leading dimension m; instance i runs φ_i (ES/PES particles).
        objective: ``"train"`` — the meta-loss reads Q on the training minibatches (paper);
            ``"heldout"`` — it reads Q(θ_t) on held-out minibatches (the batches must carry
            one under ``"heldout"``), so φ is meta-trained on generalization (Metz et al.
            2020, "Tasks, stability, architecture, and compute", section 4), an option
            beside the paper.

    Returns:
        :class:`UnrollOutput`.
    """
    _check(meta_loss, mode)
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if length < 1:
        raise ValueError(f"unroll length must be >= 1, got {length}")
    heldout = objective == "heldout"
    if mode == "vmap":
        losses, upd = [], []
        grad_norm = None
        core_metrics: dict[str, Tensor] = {}
        for t in range(start, start + length):
            params, state, metrics = net.step_many(
                meta_params, params, state, batch_fn(t), per_instance
            )
            losses.append(metrics["heldout_loss" if heldout else "loss"])  # (m,)
            upd.append(metrics["update_norm"])
            grad_norm = metrics["grad_norm"]
        core_metrics = {
            k: v.detach()
            for k, v in metrics.items()
            if k not in _STEP_METRICS and isinstance(v, Tensor)
        }
        q_end = _end_loss(net, params, batch_fn(start + length), heldout)  # (m,)
    else:
        m = next(iter(params.values())).shape[0]
        per_inst = []
        for i in range(m):
            p_i, s_i = _slice(params, i), _slice(state, i)
            phi_i = _slice(meta_params, i) if per_instance else meta_params
            l_i, u_i = [], []
            for t in range(start, start + length):
                b_i = _slice(batch_fn(t), i)
                p_i, s_i, met = net.step_many(phi_i, p_i, s_i, b_i, per_instance)
                l_i.append(met["heldout_loss" if heldout else "loss"][0])
                u_i.append(met["update_norm"][0])
            q_i = _end_loss(net, p_i, _slice(batch_fn(start + length), i), heldout)[0]
            p_i, s_i = index_tree(p_i, 0), index_tree(s_i, 0)
            per_inst.append(
                (p_i, s_i, torch.stack(l_i), torch.stack(u_i), met["grad_norm"][0], q_i)
            )
        params = stack_trees([x[0] for x in per_inst])
        state = stack_trees([x[1] for x in per_inst])
        loss_mat = torch.stack([x[2] for x in per_inst])  # (m, T)
        losses = list(loss_mat.T)
        upd = list(torch.stack([x[3] for x in per_inst]).T)
        grad_norm = torch.stack([x[4] for x in per_inst])
        q_end = torch.stack([x[5] for x in per_inst])
    traj = torch.stack([*losses[1:], q_end], dim=1)  # (m, T): Q(θ_1) … Q(θ_T)
    if meta_loss == "sum":
        per_instance_loss = traj.sum(dim=1)
    else:
        per_instance_loss = torch.log(traj.clamp_min(1e-30)).sum(dim=1)
    return UnrollOutput(
        meta_loss=per_instance_loss.mean(),
        per_instance_loss=per_instance_loss,
        params=params,
        state=state,
        losses=torch.stack([*losses, q_end], dim=1).detach(),  # (m, T+1)
        update_norm=torch.stack(upd, dim=1).detach(),  # (m, T)
        grad_norm=grad_norm.detach(),  # type: ignore[union-attr]
        final_loss=q_end.detach(),
        core_metrics=core_metrics if mode == "vmap" else {},
    )
