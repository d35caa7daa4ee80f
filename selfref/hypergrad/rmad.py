"""Reverse-mode hypergradients through SGD with momentum (RMAD), exact and unrolled.

Maclaurin, Duvenaud & Adams 2015, "Gradient-based Hyperparameter Optimization through
Reversible Learning". The inner loop is their Algorithm 1 (SGD with momentum in the
"decay" form)::

    g_t = ∇_w L(w_t, λ, t);  v_{t+1} = γ_t v_t − (1 − γ_t) g_t;  w_{t+1} = w_t + α_t v_{t+1}

and :func:`hypergradient` with ``method="rmad"`` is their Algorithm 2: run forward holding w
and v exactly (:class:`~selfref.hypergrad.exact.ExactRep`, Algorithm 3), then walk the
trajectory backwards, undoing each update bit for bit, recomputing the same gradient and
accumulating the hypergradients with one Hessian-vector product per step::

    dα_t = dwᵀ v_t;  w ← w − α_t v_t;  g = ∇L(w, t);  v ← (v + (1 − γ_t) g) / γ_t
    dv += α_t dw;  dγ_t = dvᵀ (v + g);  dw −= (1 − γ_t) H dv;  dλ −= (1 − γ_t) ∂²L/∂λ∂w dv;
    dv ← γ_t dv

Memory is O(parameters + the information buffer), i.e. ≈ log2(1/γ) bits per parameter per
step instead of a whole stored trajectory. After the reverse pass the initial weights are
checked to be recovered exactly (a RuntimeError otherwise). ``method="unrolled"`` is plain
autograd through the unrolled loop (memory linear in T), for comparison and tests.

Metaparameters (a dict of float64 tensors, all unconstrained; see :func:`init_meta`):

- ``log_alpha`` (T, G): per-step, per-group log learning rates α;
- ``logit_gamma`` (T, G): per-step, per-group logit momentum decays γ = sigmoid(·);
- ``log_l2`` (G,): per-group log L2 coefficients, penalty ``Σ_g 0.5·λ_g‖W_g‖²`` on the
  group's weights (tensors not named ``*bias``, the convention of :mod:`selfref.train`);
- ``log_init_scale`` (G,): per-group log scale s of the initial weights, w_0 = s·w_base,
  with w_base = ``task.init_params(Generator(seed))``.

A *group* is one layer: the tensors ``l{i}.weight`` and ``l{i}.bias`` share metaparameters
(``by="layer"``, the default; the prefix before the first dot), or one group per tensor
(``by="tensor"``). γ is used as the rational n/2^16 the exact arithmetic needs in both
methods; its gradient is taken straight through that rounding (d γ_q / d γ = 1).

Notation: T – inner steps, G – metaparameter groups, p – number of parameters.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from selfref.budget import CostCounter
from selfref.hypergrad.exact import (
    RADIX,
    ExactRep,
    RangeLog,
    UniformTable,
    quantize_gamma,
    rational_gamma,
    uniform_table,
)
from selfref.params import Params, flatten, unflatten
from selfref.tasks.base import Batch, Task

__all__ = [
    "Groups",
    "Hypergrad",
    "META_KINDS",
    "METHODS",
    "param_groups",
    "init_meta",
    "meta_objective_batch",
    "hypergradient_cost",
    "hypergradient",
    "sgd_momentum",
    "deterministic",
]

META_KINDS: tuple[str, ...] = ("log_alpha", "logit_gamma", "log_l2", "log_init_scale")
METHODS: tuple[str, ...] = ("rmad", "unrolled")


@dataclass(frozen=True)
class Groups:
    """Which metaparameter group each parameter element belongs to.

    Attributes:
        names: group names, e.g. ``("l0", "l1")``.
        keys: parameter names in flat order.
        index: (p,) int64 group of each element of the flattened parameters.
        decay: (p,) float64, 1 where the L2 penalty applies (weights), 0 for biases.
        onehot: (G, p) float64 membership matrix (for per-group sums).
        counts: (G,) group sizes if every group is one contiguous block of the flat order.
    """

    names: tuple[str, ...]
    keys: tuple[str, ...]
    index: Tensor
    decay: Tensor
    onehot: Tensor
    counts: tuple[int, ...] | None = None  # group sizes when each group is one contiguous block

    @property
    def num_groups(self) -> int:
        return len(self.names)

    def expand(self, per_group: Tensor) -> Tensor:
        """(..., G) -> (..., p): each element takes its group's value."""
        if self.counts is not None:  # contiguous groups: one broadcast block per group
            lead = per_group.shape[:-1]
            blocks = [per_group[..., i : i + 1].expand(*lead, c) for i, c in enumerate(self.counts)]
            return torch.cat(blocks, dim=-1)
        return torch.index_select(per_group, -1, self.index)

    def sum(self, x: Tensor) -> Tensor:
        """(p,) -> (G,): sum of x over each group's elements."""
        return self.onehot @ x.to(self.onehot.dtype)


def param_groups(params: Mapping[str, Tensor], by: str = "layer") -> Groups:
    """Group parameters for per-layer metaparameters.

    Args:
        params: a parameter dict (its key order is the flat order).
        by: ``"layer"`` — tensors sharing the prefix before the first ``.`` (``l0.weight``,
            ``l0.bias``) form one group; ``"tensor"`` — one group per tensor.

    Raises:
        ValueError: unknown ``by``.
    """
    if by not in ("layer", "tensor"):
        raise ValueError(f"unknown grouping {by!r}; valid: layer, tensor")
    names: list[str] = []
    index_parts, decay_parts = [], []
    device = next(iter(params.values())).device
    for k, v in params.items():
        name = k.split(".")[0] if by == "layer" else k
        if name not in names:
            names.append(name)
        gi = names.index(name)
        index_parts.append(torch.full((v.numel(),), gi, dtype=torch.int64, device=device))
        decay_parts.append(
            torch.full(
                (v.numel(),), 0.0 if k.endswith("bias") else 1.0, dtype=torch.float64, device=device
            )
        )
    index = torch.cat(index_parts)
    onehot = torch.nn.functional.one_hot(index, len(names)).T.to(torch.float64)  # (G, p)
    counts = tuple(int(c) for c in torch.bincount(index, minlength=len(names)))
    contiguous = bool((index[1:] >= index[:-1]).all())
    return Groups(
        tuple(names),
        tuple(params),
        index,
        torch.cat(decay_parts),
        onehot,
        counts if contiguous else None,
    )


def init_meta(
    steps: int,
    groups: Groups | int,
    alpha: float = 0.1,
    gamma: float = 0.9,
    l2: float = 1e-4,
    init_scale: float = 1.0,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Constant schedules in unconstrained form (float64).

    Args:
        steps: T, the number of inner steps.
        groups: the groups (or their number G).
        alpha: learning rate α > 0 for every step and group.
        gamma: momentum decay γ in (0, 1).
        l2: L2 coefficient λ > 0.
        init_scale: initial-weight scale s > 0 (1 = the task's own initialization).

    Returns:
        ``{"log_alpha": (T, G), "logit_gamma": (T, G), "log_l2": (G,), "log_init_scale": (G,)}``.

    Raises:
        ValueError: a value outside its range.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not 0 < gamma < 1:
        raise ValueError(f"gamma must be in (0, 1), got {gamma}")
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0 (it is held as log l2), got {l2}")
    if not init_scale > 0:
        raise ValueError(f"init_scale must be > 0, got {init_scale}")
    g = groups if isinstance(groups, int) else groups.num_groups
    kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
    return {
        "log_alpha": torch.full((steps, g), math.log(alpha), **kw),
        "logit_gamma": torch.full((steps, g), math.log(gamma / (1 - gamma)), **kw),
        "log_l2": torch.full((g,), math.log(l2), **kw),
        "log_init_scale": torch.full((g,), math.log(init_scale), **kw),
    }


def _check_meta(meta: Mapping[str, Tensor], groups: Groups) -> int:
    missing = [k for k in META_KINDS if k not in meta]
    if missing:
        raise ValueError(f"metaparameters lack {missing}; need all of {', '.join(META_KINDS)}")
    unknown = sorted(set(meta) - set(META_KINDS))
    if unknown:
        raise ValueError(f"unknown metaparameters {unknown}; valid: {', '.join(META_KINDS)}")
    t, g = meta["log_alpha"].shape
    if g != groups.num_groups or meta["logit_gamma"].shape != (t, g):
        raise ValueError(
            f"schedules must be (T, {groups.num_groups}); got log_alpha "
            f"{tuple(meta['log_alpha'].shape)}, logit_gamma {tuple(meta['logit_gamma'].shape)}"
        )
    for k in ("log_l2", "log_init_scale"):
        if meta[k].shape != (g,):
            raise ValueError(f"{k} must have shape ({g},), got {tuple(meta[k].shape)}")
    return t


def meta_objective_batch(task: Task, split: str, seed: int) -> tuple[Batch, int]:
    """The batch the meta-objective is evaluated on, and its cost in gradient evaluations.

    Tasks holding their data set in memory (``task.full_batch(split)`` is not None) use the
    whole split (cost ``ceil(n / batch_size)``); others use ``task.batch(split, 0, seed)``
    (cost 1).
    """
    full = task.full_batch(split)
    if full is not None:
        return full, math.ceil(task.num_examples(split) / task.batch_size)
    return task.batch(split, 0, seed), 1


def hypergradient_cost(steps: int, meta_cost: int = 1) -> int:
    """Gradient evaluations of one hypergradient: T forward + T recomputed + T HVPs (2 each)
    + the meta-objective's gradient (``meta_cost``)."""
    return 4 * steps + meta_cost


@dataclass
class Hypergrad:
    """One hypergradient.

    Attributes:
        meta_loss: the meta-objective f(w_T) (the task's loss on ``meta_split``).
        grads: d meta_loss / d metaparameters, same keys and shapes as the metaparameters.
        params: the trained weights w_T (task dtype).
        train_loss: mean training minibatch loss over the T steps (before each update).
        grad_evals: gradient evaluations this hypergradient cost.
        stats: method-specific numbers (RMAD: buffer bits per parameter per step, bytes).
    """

    meta_loss: float
    grads: dict[str, Tensor]
    params: Params
    train_loss: float
    grad_evals: int
    stats: dict[str, float] = field(default_factory=dict)


@contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """Switch on deterministic algorithms for a block; restore the previous settings after.

    On CUDA, cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG``; it is set to ``:4096:8`` when absent
    (with a warning if CUDA was already initialized, when it may not take effect).
    """
    if device.type == "cuda" and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        if torch.cuda.is_initialized():
            warnings.warn(
                "CUBLAS_WORKSPACE_CONFIG was unset after CUDA initialized; setting it to "
                ":4096:8 may not make cuBLAS deterministic — export it before starting Python",
                RuntimeWarning,
                stacklevel=3,
            )
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    import torch.utils.deterministic as det

    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = det.fill_uninitialized_memory  # type: ignore[attr-defined]
    torch.use_deterministic_algorithms(True)
    # deterministic mode also NaN-fills every torch.empty by default, a debugging aid that
    # costs one extra write per op; the kernels used here never read uninitialized memory
    det.fill_uninitialized_memory = False  # type: ignore[attr-defined,misc]
    try:
        yield
    finally:
        det.fill_uninitialized_memory = prev_fill  # type: ignore[attr-defined,misc]
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


class _Problem:
    """Everything the inner loop needs, flattened: task, groups, base init, batches."""

    def __init__(self, task: Task, meta: Mapping[str, Tensor], seed: int, by: str) -> None:
        self.task = task
        self.seed = seed
        self.like = task.init_params(torch.Generator().manual_seed(seed))
        self.base = flatten(self.like).to(torch.float64)  # (p,)
        self.groups = param_groups(self.like, by)
        self.steps = _check_meta(meta, self.groups)
        self.dtype = task.dtype
        self.device = self.base.device
        self.sizes = [v.numel() for v in self.like.values()]

    def data_loss(self, w: Tensor, batch: Batch) -> Tensor:
        return self.task.loss(unflatten(w, self.like), batch)

    def _leaves(self, w: Tensor) -> dict[str, Tensor]:
        """Leaf tensors (task dtype), one per parameter tensor, viewing one converted copy of
        flat w: gradients come per tensor, so autograd does not scatter every tensor's
        gradient into a zero-filled flat vector, and the conversion is one kernel."""
        flat = w.detach().to(self.dtype, copy=True)  # (p,)
        return {  # detached views: leaves of their own, not views of w in the graph
            k: x.view(self.like[k].shape).detach().requires_grad_(True)
            for k, x in zip(self.like, flat.split(self.sizes))
        }

    def data_grad(self, w: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """(∇ data loss at w (p,) float64, loss) on training minibatch t."""
        leaves = self._leaves(w)
        loss = self.task.loss(leaves, self.task.batch("train", t, self.seed))
        grads = torch.autograd.grad(loss, list(leaves.values()))
        return torch.cat([x.reshape(-1) for x in grads]).to(torch.float64), loss.detach()

    def data_grad_hvp(self, w: Tensor, t: int, dv: Tensor) -> tuple[Tensor, Tensor]:
        """(∇ data loss, ∇² data loss · dv) at w on training minibatch t, both float64.

        The gradient is concatenated inside the graph, so the second backward has one
        output and takes dv flat; both results come out of one concatenation and one
        conversion, as views of a fresh (2p,) tensor (safe to update in place)."""
        leaves = self._leaves(w)
        loss = self.task.loss(leaves, self.task.batch("train", t, self.seed))
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
        g = torch.cat([x.reshape(-1) for x in grads])  # (p,) task dtype, in the graph
        hvs = torch.autograd.grad(g, list(leaves.values()), grad_outputs=dv.to(self.dtype))
        both = torch.cat([g.detach(), *[x.reshape(-1) for x in hvs]]).to(torch.float64)
        return both.split(w.numel())  # type: ignore[return-value]


def _schedules(meta: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Constrained values (float64, detached): α (T,G), γ_q and its numerator n (T,G), λ, s."""
    gamma = torch.sigmoid(meta["logit_gamma"].detach().to(torch.float64))
    return {
        "alpha": torch.exp(meta["log_alpha"].detach().to(torch.float64)),
        "gamma": gamma,
        "gamma_n": rational_gamma(gamma),
        "gamma_q": quantize_gamma(gamma),
        "l2": torch.exp(meta["log_l2"].detach().to(torch.float64)),
        "scale": torch.exp(meta["log_init_scale"].detach().to(torch.float64)),
    }


def hypergradient(
    task: Task,
    meta: Mapping[str, Tensor],
    seed: int = 0,
    *,
    method: str = "rmad",
    meta_split: str = "val",
    by: str = "layer",
    counter: CostCounter | None = None,
    round_gamma: bool = True,
) -> Hypergrad:
    """Hypergradient of the meta-objective after T steps of SGD with momentum.

    Args:
        task: the task; minibatch t is ``task.batch("train", t, seed)``.
        meta: metaparameters (see :func:`init_meta`); T is ``meta["log_alpha"].shape[0]``.
        seed: seeds the initial weights (``task.init_params(Generator(seed))``) and batches.
        method: ``"rmad"`` (exact reversal, Maclaurin et al. 2015, Algorithm 2) or
            ``"unrolled"`` (autograd through the stored unrolled loop).
        meta_split: split of the meta-objective: ``"val"`` or ``"train"`` (or ``"test"``).
        by: metaparameter grouping, ``"layer"`` or ``"tensor"`` (see :func:`param_groups`).
        counter: if given, charged :func:`hypergradient_cost` up front (raises
            :class:`~selfref.budget.BudgetExceeded` before any work when it does not fit).
        round_gamma: use γ rounded to n/2^16 (required by ``"rmad"``); ``False`` lets
            ``"unrolled"`` use the exact float γ (for finite-difference checks in γ).

    Returns:
        A :class:`Hypergrad`.

    Raises:
        ValueError: unknown method or split, malformed metaparameters.
        FixedPointOverflow: (rmad) a weight or velocity left |x| < 1024.
        RuntimeError: (rmad) the reverse pass did not recover the initial weights exactly.

    Example:
        >>> from selfref.tasks import make
        >>> task = make("digits-logreg", batch_size=20, dtype=torch.float64)
        >>> meta = init_meta(5, 1, alpha=0.1, gamma=0.9)
        >>> hg = hypergradient(task, meta, seed=0)
        >>> sorted(hg.grads) == sorted(META_KINDS)
        True
    """
    if method not in METHODS:
        raise ValueError(f"unknown hypergradient method {method!r}; valid: {', '.join(METHODS)}")
    if meta_split not in ("train", "val", "test"):
        raise ValueError(f"unknown meta_split {meta_split!r}; valid: train, val, test")
    if method == "rmad" and not round_gamma:
        raise ValueError("method 'rmad' needs round_gamma=True (γ must be a rational n/2^16)")
    prob = _Problem(task, meta, seed, by)
    meta_batch, meta_cost = meta_objective_batch(task, meta_split, seed)
    cost = hypergradient_cost(prob.steps, meta_cost)
    if counter is not None:
        counter.spend(cost)
    with deterministic(prob.device):
        if method == "rmad":
            out = _rmad(prob, meta, meta_batch)
        else:
            out = _unrolled(prob, meta, meta_batch, round_gamma)
    out.grad_evals = cost
    return out


class _StepValues:
    """Per-element step values, expanded from (T, G) one step at a time, per pass.

    :meth:`forward` ``(t)`` gives (2, p) float64 rows α_t and (1 − γ_t)·2^52 (the velocity
    update in grid units) and the :class:`~selfref.hypergrad.exact.UniformTable` of n_t;
    :meth:`reverse` ``(t)`` gives the rows α_t, 1 − γ_t, (1 − γ_t)·2^52 and the table
    without its decoding fields (the reverse pass only encodes). Each is one
    ``Groups.expand`` of an int64 (rows, G) block (the floats travel as their bit
    patterns): memory stays O(p), and only the rows a pass uses are written.
    """

    def __init__(self, sched: Mapping[str, Tensor], groups: Groups) -> None:
        omg = 1 - sched["gamma_q"]  # (T, G)
        tab = uniform_table(sched["gamma_n"])  # (T, G) each

        def rows(floats: list[Tensor], ints: list[Tensor]) -> Tensor:  # (T, rows, G) int64
            bits = torch.stack(floats, dim=1).view(torch.int64)
            return torch.cat([bits, torch.stack(ints, dim=1)], dim=1)

        assert tab.magic is not None and tab.shift is not None
        self._fwd = rows(
            [sched["alpha"], omg * RADIX], [tab.n, tab.q, tab.rem, tab.magic, tab.shift]
        )
        self._rev = rows([sched["alpha"], omg, omg * RADIX], [tab.n, tab.q, tab.rem])
        self.groups = groups

    def forward(self, t: int) -> tuple[Tensor, UniformTable]:
        r = self.groups.expand(self._fwd[t])  # (7, p)
        return r[:2].view(torch.float64), UniformTable(*r[2:].unbind())

    def reverse(self, t: int) -> tuple[Tensor, UniformTable]:
        r = self.groups.expand(self._rev[t])  # (6, p)
        n, q, rem = r[3:].unbind()
        return r[:3].view(torch.float64), UniformTable(n, q, rem)


_LOSS_BLOCK = 1024  # per-step losses kept before they are summed into one


def _rmad(prob: _Problem, meta: Mapping[str, Tensor], meta_batch: Batch) -> Hypergrad:
    """Algorithms 1-3 of Maclaurin et al. 2015 on flat vectors.

    The updates are rounded in grid units (``ExactRep.grid()``: the held integers as
    float64), ``round(g · (1 − γ)·2^52)`` and ``round(grid(v) · α)``, bit for bit the same
    as rounding ``(1 − γ) g`` and ``α v`` to the 2^-52 grid (powers of two scale exactly);
    the forward's range checks are deferred to its end (:class:`RangeLog`), and the buffer
    is updated in place.
    """
    s = _schedules(meta)
    grp = prob.groups
    steps = prob.steps
    lam_e = grp.expand(s["l2"]) * grp.decay  # (p,) L2 coefficient per element (0 for biases)
    w0 = grp.expand(s["scale"]) * prob.base  # (p,)
    w_exact = ExactRep(w0, buffer=False)
    v_exact = ExactRep(torch.zeros_like(w0))
    w0_fixed = w_exact.intrep.clone()

    has_l2 = bool((lam_e != 0).any())
    values = _StepValues(s, grp)
    log = RangeLog()

    # forward (Algorithm 1), exactly
    losses: list[Tensor] = []  # per-step losses, summed in blocks (memory O(1) in T)
    for t in range(steps):
        (alpha, one_minus_gamma_grid), n = values.forward(t)
        w = w_exact.grid().mul_(1 / RADIX)  # (p,) float64 values (range logged when added)
        g, loss = prob.data_grad(w, t)
        if has_l2:
            g.addcmul_(lam_e, w)
        losses.append(loss)
        if len(losses) >= _LOSS_BLOCK:
            losses[:] = [torch.stack(losses).to(torch.float64).sum()]
        v_exact.mul_gamma(n)
        v_exact.sub_grid(torch.round(g.mul_(one_minus_gamma_grid)), log)
        w_exact.add_grid(torch.round(v_exact.grid().mul_(alpha)), log)
    log.check()
    assert v_exact.aux is not None
    bits = v_exact.aux.bits()
    buffer_bytes = v_exact.aux.allocated_bytes()
    train_loss = torch.stack([x.to(torch.float64) for x in losses]).sum()

    # meta-objective and its gradient at w_T
    w_final = w_exact.val
    wt = w_final.to(prob.dtype).detach().requires_grad_(True)
    meta_loss = prob.data_loss(wt, meta_batch)
    (dw,) = torch.autograd.grad(meta_loss, wt)
    dw = dw.to(torch.float64)  # (p,)
    dv = torch.zeros_like(dw)
    d_alpha = torch.zeros(steps, grp.num_groups, dtype=torch.float64, device=prob.device)
    d_gamma = torch.zeros_like(d_alpha)
    acc_l2 = torch.zeros_like(dw)  # Σ_t (1 - γ_t) dv_t ⊙ w_t, times λ at the end

    # reverse (Algorithm 2)
    v_grid = v_exact.grid()  # (p,) v_T in grid units
    for t in reversed(range(steps)):
        (alpha, one_minus_gamma, one_minus_gamma_grid), n = values.reverse(t)
        torch.mv(grp.onehot, dw * v_grid, out=d_alpha[t])  # grid units: · 2^-52 at the end
        # the reverse retraces the forward's checked values bit for bit (compared at the
        # end), so its additions are not logged
        w_exact.sub_grid(torch.round(v_grid.mul_(alpha)), None)
        w = w_exact.grid().mul_(1 / RADIX)
        dv.addcmul_(alpha, dw)
        # (1 - γ) is per element, so it multiplies dv before the (symmetric) Hessian
        u = one_minus_gamma * dv
        g, hu = prob.data_grad_hvp(w, t, u)
        if has_l2:
            g.addcmul_(lam_e, w)
            hu.addcmul_(lam_e, u)
            acc_l2.addcmul_(u, w)
        dw.sub_(hu)
        v_exact.add_grid(torch.round(g * one_minus_gamma_grid), None)
        v_exact.div_gamma(n)
        v_grid = v_exact.grid()  # v_t
        torch.mv(grp.onehot, dv * torch.add(g, v_grid, alpha=1 / RADIX), out=d_gamma[t])
        dv.sub_(u)  # γ dv
    d_alpha.mul_(1 / RADIX)
    d_log_l2 = -grp.sum(acc_l2 * lam_e)  # ∂(λ w)/∂ log λ = λ w

    if not torch.equal(w_exact.intrep, w0_fixed) or bool((v_exact.intrep != 0).any()):
        raise RuntimeError(
            "RMAD reverse pass did not recover the initial weights bit for bit; the gradient "
            "recomputation is not deterministic on this device/task"
        )
    grads = {
        "log_alpha": d_alpha * s["alpha"],
        "logit_gamma": d_gamma * s["gamma"] * (1 - s["gamma"]),
        "log_l2": d_log_l2,
        "log_init_scale": grp.sum(dw * w0),
    }
    p = prob.base.numel()
    return Hypergrad(
        meta_loss=float(meta_loss.detach()),
        grads=grads,
        params=unflatten(w_final.to(prob.dtype), prob.like),
        train_loss=float(train_loss) / steps,
        grad_evals=0,
        stats={
            "buffer_bits_per_param_step": bits / (p * steps),
            "buffer_bytes": float(buffer_bytes),
            "exact_w0_recovered": 1.0,
        },
    )


def _unrolled(
    prob: _Problem, meta: Mapping[str, Tensor], meta_batch: Batch, round_gamma: bool = True
) -> Hypergrad:
    """Autograd through the whole unrolled loop (stores the trajectory; memory O(T))."""
    grp = prob.groups
    leaves = {
        k: meta[k].detach().to(torch.float64).clone().requires_grad_(True) for k in META_KINDS
    }
    alpha = torch.exp(leaves["log_alpha"])
    gamma = torch.sigmoid(leaves["logit_gamma"])
    if round_gamma:
        gamma = gamma + (quantize_gamma(gamma) - gamma).detach()  # straight through n/2^16
    lam_e = grp.expand(torch.exp(leaves["log_l2"])) * grp.decay
    w = grp.expand(torch.exp(leaves["log_init_scale"])) * prob.base  # (p,) float64
    w = w.to(prob.dtype)
    v = torch.zeros_like(w)
    train_loss = torch.zeros((), dtype=torch.float64, device=prob.device)
    for t in range(prob.steps):
        batch = prob.task.batch("train", t, prob.seed)
        data = prob.data_loss(w, batch)
        loss = data + 0.5 * (lam_e.to(prob.dtype) * w * w).sum()
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        train_loss = train_loss + data.detach().to(torch.float64)
        gt = grp.expand(gamma[t]).to(prob.dtype)
        v = gt * v - (1 - gt) * g
        w = w + grp.expand(alpha[t]).to(prob.dtype) * v
    meta_loss = prob.data_loss(w, meta_batch)
    grads = torch.autograd.grad(meta_loss, [leaves[k] for k in META_KINDS])
    return Hypergrad(
        meta_loss=float(meta_loss.detach()),
        grads={k: gk.detach() for k, gk in zip(META_KINDS, grads)},
        params=unflatten(w.detach(), prob.like),
        train_loss=float(train_loss) / prob.steps,
        grad_evals=0,
    )


def sgd_momentum(
    task: Task,
    meta: Mapping[str, Tensor],
    seed: int = 0,
    *,
    by: str = "layer",
    counter: CostCounter | None = None,
) -> tuple[Params, float]:
    """The plain (float, non-reversible) forward training run of Algorithm 1.

    Same schedules, same γ rounding and same minibatches as :func:`hypergradient`, without
    exact arithmetic or hypergradients: the reference cost of one training run (T gradient
    evaluations, charged to ``counter`` up front when given).

    Returns:
        (w_T, mean training minibatch loss over the steps).
    """
    prob = _Problem(task, meta, seed, by)
    if counter is not None:
        counter.spend(prob.steps)
    s = _schedules(meta)
    grp = prob.groups
    lam_e = grp.expand(s["l2"]) * grp.decay
    w = grp.expand(s["scale"]) * prob.base
    v = torch.zeros_like(w)
    total = torch.zeros((), dtype=torch.float64, device=prob.device)
    for t in range(prob.steps):
        g, loss = prob.data_grad(w, t)
        total = total + loss.to(torch.float64)
        gamma = grp.expand(s["gamma_q"][t])
        v = gamma * v - (1 - gamma) * (g + lam_e * w)
        w = w + grp.expand(s["alpha"][t]) * v
    return unflatten(w.to(prob.dtype), prob.like), float(total) / prob.steps
