"""A reusable smoke test for modifier cores (the Core protocol of selfref/net/cores/base.py).

Every core's test module calls :func:`check_core` once; it checks what the meta-loop relies
on, whatever the core does inside:

- ``init_meta_params`` is deterministic in the generator; ``init_state`` gives a dict of
  tensors; the call returns updates shaped like the parameters, a state with the same keys
  and shapes, finite values, and a dict of metrics;
- the call is pure: inputs are not mutated and the same inputs give the same outputs;
- gradients of a loss on several chained steps reach every meta-parameter (the classic bug
  of a weight that is created but never used), in float64;
- ``torch.func.vmap`` over a leading instance dimension matches a Python loop.

Example:
    from tests.core_smoke import check_core
    def test_my_core():
        check_core(MyCore(feature_dim=2))
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torch.func import vmap

__all__ = ["check_core", "default_params"]


def default_params(dtype: torch.dtype = torch.float64, seed: int = 0) -> dict[str, Tensor]:
    """A small parameter dict with a matrix, a vector and a scalar-like tensor."""
    g = torch.Generator().manual_seed(seed)
    return {
        "l0.weight": torch.randn(3, 4, generator=g, dtype=dtype),
        "l0.bias": torch.randn(3, generator=g, dtype=dtype),
        "scale": torch.randn(1, generator=g, dtype=dtype),
    }


def _features(params: Mapping[str, Tensor], f: int, g: torch.Generator) -> dict[str, Tensor]:
    return {k: torch.randn(*v.shape, f, generator=g, dtype=v.dtype) for k, v in params.items()}


def _cast(tree: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tree.items()}


def _clone(tree: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in tree.items()}


def _assert_same(a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ {sorted(a)} vs {sorted(b)}"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k!r} differs"


def check_core(
    core: object,
    params: Mapping[str, Tensor] | None = None,
    steps: int = 3,
    instances: int = 3,
    seed: int = 0,
    check_vmap: bool = True,
    atol: float = 1e-10,
) -> None:
    """Assert the Core protocol's contract for ``core`` (see the module docstring).

    Args:
        core: the core under test.
        params: normal-model parameters to modify (default :func:`default_params`, float64).
        steps: chained calls for the gradient check (>= 2 so recurrent weights matter).
        instances: leading dimension for the vmap check.
        seed: seeds every random input.
        check_vmap: skip the vmap comparison for a core that documents it cannot be vmapped.
        atol: tolerance of vmap-vs-loop agreement.
    """
    f = core.feature_dim  # type: ignore[attr-defined]
    assert isinstance(f, int) and f >= 1, f"feature_dim must be a positive int, got {f!r}"
    params = dict(params) if params is not None else default_params(seed=seed)
    dtype = next(iter(params.values())).dtype

    # init is deterministic in the generator
    phi = _cast(core.init_meta_params(torch.Generator().manual_seed(seed)), dtype)  # type: ignore[attr-defined]
    phi2 = _cast(core.init_meta_params(torch.Generator().manual_seed(seed)), dtype)  # type: ignore[attr-defined]
    _assert_same(phi, phi2, "init_meta_params with the same generator")
    assert phi, "a core needs at least one meta-parameter"

    state = core.init_state(phi, params)  # type: ignore[attr-defined]
    assert isinstance(state, dict) and all(isinstance(v, Tensor) for v in state.values()), (
        "init_state must return a dict of tensors"
    )

    g = torch.Generator().manual_seed(seed + 1)
    feats = _features(params, f, g)
    inputs = (_clone(phi), _clone(feats), _clone(state))
    upd, new_state, metrics = core(phi, feats, state)  # type: ignore[operator]
    _assert_same(phi, inputs[0], "meta_params mutated by the call")
    _assert_same(feats, inputs[1], "features mutated by the call")
    _assert_same(state, inputs[2], "state mutated by the call")
    assert isinstance(metrics, dict), "metrics must be a dict"
    assert upd.keys() == params.keys(), f"updates keys {sorted(upd)} != params {sorted(params)}"
    for k, v in params.items():
        assert upd[k].shape == v.shape, f"update {k!r} has shape {upd[k].shape}, want {v.shape}"
        assert torch.isfinite(upd[k]).all(), f"update {k!r} is not finite"
    assert new_state.keys() == state.keys(), "state keys changed across a step"
    for k in state:
        assert new_state[k].shape == state[k].shape, f"state {k!r} changed shape"
        assert torch.isfinite(new_state[k]).all(), f"state {k!r} is not finite"
    upd_again, state_again, _ = core(phi, feats, state)  # type: ignore[operator]
    _assert_same(upd, upd_again, "same inputs, different updates")
    _assert_same(new_state, state_again, "same inputs, different state")

    # gradients reach every meta-parameter through several chained steps
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items()}
    st = core.init_state(leaves, params)  # type: ignore[attr-defined]
    w = {k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in params.items()}
    total = torch.zeros((), dtype=dtype)
    for _ in range(max(2, steps)):
        fe = _features(params, f, g)
        u, st, _ = core(leaves, fe, st)  # type: ignore[operator]
        total = total + sum((u[k] * w[k]).sum() for k in u)
    grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    dead = [k for k, gr in zip(leaves, grads) if gr is None or not bool(gr.abs().sum() > 0)]
    assert not dead, f"no gradient reaches meta-parameters {dead}"

    if not check_vmap:
        return
    stacked_p = {
        k: torch.stack([v * (1 + 0.1 * i) for i in range(instances)]) for k, v in params.items()
    }
    stacked_f = {
        k: torch.randn(instances, *v.shape, f, generator=g, dtype=dtype) for k, v in params.items()
    }
    per = [core.init_state(phi, {k: v[i] for k, v in stacked_p.items()}) for i in range(instances)]  # type: ignore[attr-defined]
    stacked_s = {k: torch.stack([s[k] for s in per]) for k in per[0]}
    vu, vs, _ = vmap(core, in_dims=(None, 0, 0))(phi, stacked_f, stacked_s)
    for i in range(instances):
        lu, ls, _ = core(phi, {k: v[i] for k, v in stacked_f.items()}, per[i])  # type: ignore[operator]
        for k in lu:
            torch.testing.assert_close(vu[k][i], lu[k], atol=atol, rtol=1e-7)
        for k in ls:
            torch.testing.assert_close(vs[k][i], ls[k], atol=atol, rtol=1e-7)
