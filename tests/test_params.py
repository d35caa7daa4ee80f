"""Parameter-dict utilities: tree maps, flatten/unflatten, norms, functional_call."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selfref.params import (
    all_finite,
    call,
    flatten,
    module_params,
    num_params,
    tree_add,
    tree_clone,
    tree_detach,
    tree_dot,
    tree_map,
    tree_map2,
    tree_norm,
    tree_scale,
    tree_sub,
    tree_to,
    tree_zeros_like,
    unflatten,
)


def _tree(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(3, 4, generator=g, dtype=dtype),
        "a.bias": torch.randn(4, generator=g, dtype=dtype),
        "z": torch.randn(2, 1, 5, generator=g, dtype=dtype),
    }


def test_flatten_unflatten_round_trip():
    t = _tree()
    vec = flatten(t)
    assert vec.shape == (3 * 4 + 4 + 10,) == (num_params(t),)
    back = unflatten(vec, t)
    assert list(back) == list(t)
    for k in t:
        assert back[k].shape == t[k].shape
        assert torch.equal(back[k], t[k])
    assert torch.equal(flatten(unflatten(vec * 2, t)), vec * 2)


def test_flatten_is_differentiable_through_unflatten():
    t = _tree()
    vec = flatten(t).requires_grad_(True)
    loss = sum((v**2).sum() for v in unflatten(vec, t).values())
    (g,) = torch.autograd.grad(loss, vec)
    assert torch.allclose(g, 2 * vec.detach())


def test_unflatten_wrong_size_raises():
    with pytest.raises(ValueError, match="has 3 elements, the parameter dict needs 26"):
        unflatten(torch.zeros(3), _tree())


def test_tree_arithmetic():
    a, b = _tree(0), _tree(1)
    s = tree_add(a, b, alpha=0.5)
    d = tree_sub(a, b)
    for k in a:
        assert torch.equal(s[k], a[k] + 0.5 * b[k])
        assert torch.equal(d[k], a[k] - b[k])
        assert torch.equal(tree_scale(a, 3.0)[k], 3.0 * a[k])
        assert torch.equal(tree_zeros_like(a)[k], torch.zeros_like(a[k]))
        assert torch.equal(tree_map(torch.neg, a)[k], -a[k])
        assert torch.equal(tree_map2(torch.mul, a, b)[k], a[k] * b[k])
    assert torch.allclose(tree_dot(a, b), flatten(a) @ flatten(b))
    assert torch.allclose(tree_norm(a), flatten(a).norm())


def test_tree_norm_keeps_dtype_and_gradient():
    a = {k: v.float().requires_grad_(True) for k, v in _tree().items()}
    n = tree_norm(a)
    assert n.dtype == torch.float32
    grads = torch.autograd.grad(n, list(a.values()))
    for g, v in zip(grads, a.values()):
        assert torch.allclose(g, v.detach() / n.detach(), atol=1e-6)


def test_tree_map2_key_mismatch_raises():
    with pytest.raises(ValueError, match="differ in keys"):
        tree_map2(torch.add, {"a": torch.zeros(1)}, {"b": torch.zeros(1)})


def test_detach_clone_to():
    a = {k: v.clone().requires_grad_(True) for k, v in _tree().items()}
    d = tree_detach(a)
    assert not any(v.requires_grad for v in d.values())
    c = tree_clone(d)
    c["z"].add_(1.0)
    assert not torch.equal(c["z"], d["z"])
    mixed = {"w": torch.ones(2, dtype=torch.float64), "idx": torch.arange(3)}
    moved = tree_to(mixed, "cpu", torch.float32)
    assert moved["w"].dtype == torch.float32
    assert moved["idx"].dtype == torch.int64  # non-floating leaves keep their dtype


def test_all_finite():
    a = _tree()
    assert all_finite(a)
    a["z"] = a["z"].clone()
    a["z"][0, 0, 1] = float("nan")
    assert not all_finite(a)
    assert not all_finite({"w": torch.tensor([1.0, float("inf")])})


def test_module_params_and_call_match_the_module():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    p = module_params(net)
    assert list(p) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert not any(v.requires_grad for v in p.values())
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(call(net, p, x), net(x))
    p2 = tree_scale(p, 0.0)
    assert torch.equal(call(net, p2, x), torch.zeros(5, 2, dtype=torch.float64))
    # the module itself is untouched by a functional call
    assert torch.allclose(net(x), call(net, p, x))
