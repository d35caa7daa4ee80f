"""SRWM layer and core (Irie et al. 2022): equations, fast path, layer, stateful mode, core."""

from __future__ import annotations

import math

import pytest
import torch

from selfref.net.cores.srwm import (
    SRWMCore,
    SRWMLayer,
    SRWMLayerConfig,
    srwm_init,
    srwm_layer,
    srwm_recurrence_fused,
    srwm_recurrence_reference,
    srwm_stats,
)

D64 = torch.float64


def _rand(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=D64) * scale


def _naive(x, W_y, W_q, W_k, W_b):
    """Independent transcription: one (sequence, head) at a time with mv/outer."""
    b, h, n, e = x.shape
    ys = torch.zeros(b, h, n, e, dtype=x.dtype)
    finals = [w.clone() for w in (W_y, W_q, W_k, W_b)]
    for bi in range(b):
        for hi in range(h):
            Wy, Wq, Wk, Wb = (w[bi, hi].clone() for w in (W_y, W_q, W_k, W_b))
            for t in range(n):
                xt = x[bi, hi, t]
                ys[bi, hi, t] = torch.mv(Wy, xt)
                q = torch.softmax(torch.mv(Wq, xt), 0)
                k = torch.softmax(torch.mv(Wk, xt), 0)
                beta = torch.sigmoid(torch.mv(Wb, xt))
                Wy = Wy + beta[0] * torch.outer(torch.mv(Wy, q) - torch.mv(Wy, k), k)
                Wq = Wq + beta[1] * torch.outer(torch.mv(Wq, q) - torch.mv(Wq, k), k)
                Wk = Wk + beta[2] * torch.outer(torch.mv(Wk, q) - torch.mv(Wk, k), k)
                Wb = Wb + beta[3] * torch.outer(torch.mv(Wb, q) - torch.mv(Wb, k), k)
            for f, w in zip(finals, (Wy, Wq, Wk, Wb)):
                f[bi, hi] = w
    return ys, tuple(finals)


def _inputs(seed: int = 0, b: int = 2, h: int = 3, n: int = 6, e: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = _rand(g, b, h, n, e)
    W = [_rand(g, b, h, e, e, scale=0.7) for _ in range(3)] + [_rand(g, b, h, 4, e)]
    return x, W


def test_reference_matches_direct_equations_float64():
    x, W = _inputs()
    y, finals, aux = srwm_recurrence_reference(x, *W)
    y_n, finals_n = _naive(x, *W)
    torch.testing.assert_close(y, y_n, rtol=1e-12, atol=1e-12)
    for a, b in zip(finals, finals_n):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the weights really moved, so the test is not vacuous
    assert all(float((a - w).abs().max()) > 1e-3 for a, w in zip(finals, W))
    assert aux["beta"].shape == (2, 3, 6, 4)


def test_fused_matches_reference_outputs_and_gradients():
    x, W = _inputs(seed=1, n=9, e=5)
    leaves = [t.clone().requires_grad_(True) for t in (x, *W)]
    leaves2 = [t.clone().requires_grad_(True) for t in (x, *W)]
    y1, f1, _ = srwm_recurrence_reference(*leaves)
    y2, f2, _ = srwm_recurrence_fused(*leaves2)
    torch.testing.assert_close(y1, y2, rtol=1e-11, atol=1e-11)
    for a, b in zip(f1, f2):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    g = torch.Generator().manual_seed(5)
    cot = _rand(g, *y1.shape)
    (y1 * cot).sum().add(sum((f * f).sum() for f in f1)).backward()
    (y2 * cot).sum().add(sum((f * f).sum() for f in f2)).backward()
    for a, b in zip(leaves, leaves2):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)


def test_outputs_use_weights_before_the_update():
    x, W = _inputs(seed=2, n=1)
    y, _, _ = srwm_recurrence_fused(x, *W)
    torch.testing.assert_close(y[..., 0, :], torch.einsum("bhij,bhj->bhi", W[0], x[..., 0, :]))


@pytest.mark.parametrize("fused", [True, False])
def test_layer_gradcheck_float64(fused):
    cfg = SRWMLayerConfig(dim=4, heads=2, fused=fused)
    params = srwm_init(cfg, torch.Generator().manual_seed(0), dtype=D64)
    names = list(params)
    h = _rand(torch.Generator().manual_seed(1), 2, 3, 4)

    def f(*leaves):
        out, state, _ = srwm_layer(dict(zip(names, leaves)), h, cfg)
        return out.sum() + sum((s**2).sum() for s in state.values())

    leaves = tuple(params[k].clone().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


def test_layer_structure_residual_layernorm_and_output_projection():
    cfg = SRWMLayerConfig(dim=8, heads=2)
    params = srwm_init(cfg, torch.Generator().manual_seed(0), dtype=D64)
    h = _rand(torch.Generator().manual_seed(1), 3, 5, 8)
    zero_out = dict(params, out=torch.zeros(8, 8, dtype=D64))
    out, _, _ = srwm_layer(zero_out, h, cfg)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(h, (8,)))
    no_ln = SRWMLayerConfig(dim=8, heads=2, layer_norm=False)
    p2 = srwm_init(no_ln, torch.Generator().manual_seed(0), dtype=D64)
    out2, _, _ = srwm_layer(dict(p2, out=torch.zeros(8, 8, dtype=D64)), h, no_ln)
    torch.testing.assert_close(out2, h)
    # heads are independent: the output of head 0's y only depends on head 0's input slice
    y_full, _, _ = srwm_layer(params, h, cfg)
    h2 = h.clone()
    h2[..., 4:] += 1.0
    y_pert, _, _ = srwm_layer(dict(params, out=torch.eye(8, dtype=D64)), h2, cfg)
    y_base, _, _ = srwm_layer(dict(params, out=torch.eye(8, dtype=D64)), h, cfg)
    ln_delta = torch.nn.functional.layer_norm(h2, (8,)) - torch.nn.functional.layer_norm(h, (8,))
    torch.testing.assert_close(
        (y_pert - y_base - ln_delta)[..., :4], torch.zeros(3, 5, 4, dtype=D64)
    )
    assert y_full.shape == (3, 5, 8)


def test_base_weights_copied_per_sequence_and_stateful_mode_carries_on():
    cfg = SRWMLayerConfig(dim=8, heads=2)
    params = srwm_init(cfg, torch.Generator().manual_seed(0), dtype=D64)
    h = _rand(torch.Generator().manual_seed(1), 2, 10, 8)
    full, state_full, _ = srwm_layer(params, h, cfg)
    # stateless: a sequence's output does not depend on the other sequences or earlier calls
    alone, _, _ = srwm_layer(params, h[1:], cfg)
    torch.testing.assert_close(full[1:], alone)
    # stateful: two halves with the state carried == the whole sequence
    a, st, _ = srwm_layer(params, h[:, :4], cfg)
    b, st2, _ = srwm_layer(params, h[:, 4:], cfg, state=st)
    torch.testing.assert_close(torch.cat([a, b], 1), full)
    for k in state_full:
        torch.testing.assert_close(st2[k], state_full[k])
    # without the state the second half differs (self-modifications are real)
    b0, _, _ = srwm_layer(params, h[:, 4:], cfg)
    assert float((b0 - b).abs().max()) > 1e-4


def test_stats_ranges():
    cfg = SRWMLayerConfig(dim=8, heads=2)
    params = srwm_init(cfg, torch.Generator().manual_seed(0))
    h = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(3))
    _, _, aux = srwm_layer(params, h, cfg)
    s = srwm_stats(aux)
    for m in ("y", "q", "k", "b"):
        assert float(s[f"dW/{m}"]) > 0
        assert s[f"beta/{m}"].numel() == 2 * 2 * 7
        assert 0 < float(s[f"beta/{m}"].min()) and float(s[f"beta/{m}"].max()) < 1
    for name in ("q_entropy", "k_entropy"):
        assert 0 < float(s[name]) <= math.log(4) + 1e-6


def test_module_wrapper_and_low_precision():
    layer = SRWMLayer(SRWMLayerConfig(dim=8, heads=2), torch.Generator().manual_seed(0))
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    out, state = layer(x)
    out.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    assert state["W_b"].shape == (3, 2, 4, 4)
    bf = SRWMLayer(
        SRWMLayerConfig(dim=8, heads=2), torch.Generator().manual_seed(0), torch.bfloat16
    )
    out_bf, _ = bf(x.to(torch.bfloat16))
    assert out_bf.dtype == torch.bfloat16 and bool(torch.isfinite(out_bf).all())
    torch.testing.assert_close(out_bf.float(), out.detach(), atol=0.1, rtol=0.1)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="multiple of heads"):
        SRWMLayerConfig(dim=10, heads=4)
    cfg = SRWMLayerConfig(dim=8, heads=2)
    params = srwm_init(cfg, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="expected input"):
        srwm_layer(params, torch.zeros(2, 3, 6), cfg)
    x, W = _inputs(e=5)
    with pytest.raises(ValueError, match="W_b"):
        srwm_recurrence_fused(x, W[0], W[1], W[2], W[0])
    with pytest.raises(ValueError, match="feature_dim"):
        SRWMCore(feature_dim=0)
    with pytest.raises(ValueError, match="unknown SRWM core option"):
        SRWMCore(feature_dim=3, heads_=3)


# --- the core (self-referential mode) --------------------------------------------------


def _core_setup(dtype=D64, read_own_stats=True):
    core = SRWMCore(feature_dim=3, dim=4, heads=2, read_own_stats=read_own_stats)
    meta = {
        k: v.to(dtype) for k, v in core.init_meta_params(torch.Generator().manual_seed(0)).items()
    }
    params = {"w": torch.zeros(2, 3, dtype=dtype), "b": torch.zeros(3, dtype=dtype)}
    g = torch.Generator().manual_seed(1)
    feats = [{"w": _rand(g, 2, 3, 3).to(dtype), "b": _rand(g, 3, 3).to(dtype)} for _ in range(3)]
    return core, meta, params, feats


def test_core_single_coordinate_is_one_srwm_step():
    core, meta, _, _ = _core_setup(read_own_stats=False)
    params = {"s": torch.zeros(1, dtype=D64)}
    f = {"s": _rand(torch.Generator().manual_seed(4), 1, 3)}
    state = core.init_state(meta, params)
    _, new_state, _ = core(meta, f, state)
    x = f["s"] @ meta["in.weight"].T + meta["in.bias"]  # (1, d)
    xh = x.reshape(1, 2, 1, 2)  # (b, h, n, e)
    W = [meta[f"srwm.W_{m}"].unsqueeze(0) for m in ("y", "q", "k", "b")]
    _, finals, _ = srwm_recurrence_reference(xh, *W)
    for m, fin in zip(("y", "q", "k", "b"), finals):  # the state is the shift W - W_0
        torch.testing.assert_close(new_state[f"s/W_{m}"] + meta[f"srwm.W_{m}"], fin[0])


def test_core_modifies_params_and_itself_and_grads_reach_every_meta_param():
    core, meta, params, feats = _core_setup()
    leaves = {k: v.clone().requires_grad_(True) for k, v in meta.items()}
    state = core.init_state(leaves, params)
    total = 0.0
    ups = []
    for f in feats:
        upd, state, metrics = core(leaves, f, state)
        ups.append(upd)
        assert upd["w"].shape == (2, 3) and upd["b"].shape == (3,)
        total = total + sum((u**2).sum() for u in upd.values())
    # the same features give a different update once the fast weights have changed
    upd_again, _, _ = core(leaves, feats[0], core.init_state(leaves, params))
    torch.testing.assert_close(upd_again["w"], ups[0]["w"])
    upd_later, _, _ = core(leaves, feats[0], state)
    assert float((upd_later["w"] - ups[0]["w"]).detach().abs().max()) > 1e-8
    assert float(metrics["srwm/dW/y"]) > 0 and "srwm/q_entropy" in metrics
    stats = core.fast_weight_stats(leaves, state)
    assert set(stats) == {"w", "b"} and bool((stats["w"] > 0).all())
    total.backward()
    for k, v in leaves.items():
        assert v.grad is not None and float(v.grad.abs().sum()) > 0, k


def test_core_gradcheck_float64():
    core, meta, params, feats = _core_setup()
    names = list(meta)

    def f(*leaves):
        mp = dict(zip(names, leaves))
        state = core.init_state(mp, params)
        out = 0.0
        for fe in feats[:2]:
            upd, state, _ = core(mp, fe, state)
            out = out + sum((u**2).sum() for u in upd.values())
        return out

    leaves = tuple(meta[k].clone().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


def test_core_interface_smoke():
    from core_smoke import check_core

    check_core(SRWMCore(feature_dim=2, dim=4, heads=2))


def test_analyzing_model_reads_the_srwm_fast_weight_statistics():
    # self-referential mode with the analyzer reading the core's self-modifications: the
    # last 4 features of every coordinate are ‖W^M − W^M_0‖ of the incoming core state
    from selfref.net import AnalyzerConfig, SelfReferentialNet
    from selfref.tasks import make

    task = make("quadratic", dtype=torch.float64)
    net = SelfReferentialNet.from_task(task, core="srwm", analyzer=AnalyzerConfig(core_stats=4))
    assert net.core.config.read_own_stats is False  # one copy of the numbers, in the analyzer
    assert net.analyzer.feature_dim == 2 + 4 == net.core.feature_dim
    phi = {
        k: v.double().requires_grad_(True)
        for k, v in net.init_meta_params(torch.Generator().manual_seed(0)).items()
    }
    theta = task.init_params(torch.Generator().manual_seed(1))
    state = net.init_state(phi, theta)
    seen = []

    class Spy(type(net.analyzer)):  # type: ignore[misc]
        def __call__(self, params, grads, an_state, core_stats=None):  # type: ignore[no-untyped-def]
            feats, new = super().__call__(params, grads, an_state, core_stats)
            seen.append((feats, core_stats))
            return feats, new

    net.analyzer = Spy(net.analyzer.config)
    loss = 0.0
    for t in range(3):
        theta, state, m = net.step(phi, theta, state, task.batch("train", t, seed=1))
        loss = loss + m["loss"]
    first, second = seen[0], seen[1]
    assert float(first[1]["theta"].detach().abs().max()) == 0.0  # fresh fast weights: no change yet
    assert float(second[1]["theta"].detach().min()) > 0  # after one step every sub-matrix has moved
    want = second[1]["theta"].expand(1, 10, 4)
    torch.testing.assert_close(second[0]["theta"][..., -4:], want)
    loss.backward()  # type: ignore[union-attr]
    assert all(v.grad is not None and float(v.grad.abs().sum()) > 0 for v in phi.values())
    with pytest.raises(ValueError, match="state_stats"):
        SelfReferentialNet.from_task(task, core="lstm", analyzer=AnalyzerConfig(core_stats=4))
