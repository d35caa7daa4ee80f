"""Exact arithmetic for RMAD: fixed point, overflow, the information buffer, bit-exact reversal."""

from __future__ import annotations

import math

import pytest
import torch

from selfref.hypergrad.exact import (
    GAMMA_DENOM,
    RADIX,
    ExactRep,
    FixedPointOverflow,
    InfoBuffer,
    RangeLog,
    add_checked,
    from_fixed,
    quantize_gamma,
    rational_gamma,
    to_fixed,
    uniform_table,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_fixed_point_round_trip_is_within_half_an_ulp_of_the_grid() -> None:
    x = torch.randn(1000, generator=_gen(0), dtype=torch.float64) * 10
    back = from_fixed(to_fixed(x))
    assert float((back - x).abs().max()) <= 0.5 / RADIX * (1 + 1e-12)
    grid = torch.tensor([0.5, -0.25, 3.0], dtype=torch.float64)  # exactly representable
    assert torch.equal(from_fixed(to_fixed(grid)), grid)


@pytest.mark.parametrize("bad", [1024.0, -5000.0, math.inf, math.nan])
def test_to_fixed_raises_outside_the_range(bad: float) -> None:
    with pytest.raises(FixedPointOverflow):
        to_fixed(torch.tensor([0.0, bad], dtype=torch.float64))


def test_add_checked_raises_instead_of_wrapping() -> None:
    a = to_fixed(torch.tensor([1000.0], dtype=torch.float64))
    with pytest.raises(FixedPointOverflow):
        add_checked(a, a)
    big = torch.tensor([2**62 + 5], dtype=torch.int64)
    with pytest.raises(FixedPointOverflow):
        add_checked(big, big)  # would wrap int64
    assert int(add_checked(a, -a)) == 0


def test_exact_rep_overflow_raises_on_check_and_never_wraps() -> None:
    w = ExactRep(torch.full((4,), 1000.0, dtype=torch.float64), buffer=False)
    w.add(torch.full((4,), 30.0, dtype=torch.float64))  # 1030 > 1024: out of range
    with pytest.raises(FixedPointOverflow):
        w.check()
    w2 = ExactRep(torch.zeros(3, dtype=torch.float64), buffer=False)
    w2.add(torch.tensor([0.0, math.nan, 1.0], dtype=torch.float64))
    with pytest.raises(FixedPointOverflow):
        w2.add(torch.zeros(3, dtype=torch.float64))  # the next add checks the pending one


def test_rational_gamma() -> None:
    g = torch.tensor([0.0, 0.5, 0.9, 0.99, 1.0], dtype=torch.float64)
    n = rational_gamma(g)
    assert n.tolist() == [1, 32768, round(0.9 * GAMMA_DENOM), round(0.99 * GAMMA_DENOM), 65536]
    assert float((quantize_gamma(g[1:4]) - g[1:4]).abs().max()) <= 0.5 / GAMMA_DENOM
    with pytest.raises(ValueError, match="gamma"):
        rational_gamma(torch.tensor([1.5]))


def test_uniform_table_divides_every_slot_exactly() -> None:
    """(slot · magic) >> shift == slot div n for every base n and the hardest slots."""
    n = torch.arange(1, GAMMA_DENOM + 1)
    tab = uniform_table(n)
    slots = 2**24
    assert torch.equal(tab.q * n + tab.rem, torch.full_like(n, slots))
    assert bool((tab.rem < n).all())
    q = slots // n
    hard = [q * n - 1, (q * n).clamp_max(slots - 1), torch.full_like(n, slots - 1), n - 1, n]
    hard.append(torch.randint(0, slots, n.shape, generator=_gen(6)))
    for s in hard:
        assert torch.equal((s * tab.magic) >> tab.shift, s // n)
    for base in (1, 3, 255, 256, 257, 58982, GAMMA_DENOM):  # exhaustively
        s = torch.arange(slots)
        t = uniform_table(base)
        assert torch.equal((s * t.magic) >> t.shift, s // base), base


def test_range_log_raises_only_when_a_recorded_value_left_the_range() -> None:
    log = RangeLog()
    log.record(torch.tensor([-(2.0**61), 2.0**61], dtype=torch.float64))
    log.record(torch.tensor([2**62 - 1, -(2**62) + 1], dtype=torch.int64))
    log.check()  # in range
    log.check()  # nothing recorded: nothing to raise
    for bad in (2.0**62, -(2.0**62), math.nan, math.inf):
        log.record(torch.tensor([0.0, bad], dtype=torch.float64))
        with pytest.raises(FixedPointOverflow):
            log.check()
    for big in (2**62, -(2**62), -(2**63)):  # |-2^63| wraps in int64
        log.record(torch.tensor([0, big], dtype=torch.int64))
        with pytest.raises(FixedPointOverflow):
            log.check()


def test_exact_rep_grid_additions_defer_to_the_log() -> None:
    w = ExactRep(torch.tensor([1.0, -2.0], dtype=torch.float64), buffer=False)
    start = w.intrep.clone()
    log = RangeLog()
    y = torch.round(torch.tensor([0.3, 0.7], dtype=torch.float64) * RADIX)
    w.add_grid(y, log)
    assert torch.allclose(w.val, torch.tensor([1.3, -1.3], dtype=torch.float64))
    w.sub_grid(y, log)
    assert torch.equal(w.intrep, start)
    log.check()
    w.add_grid(torch.full((2,), 1000.0 * RADIX, dtype=torch.float64), log)  # 1001, -1000
    w.add_grid(torch.full((2,), 30.0 * RADIX, dtype=torch.float64), log)  # 1031: out of range
    with pytest.raises(FixedPointOverflow):
        log.check()


def test_buffer_push_pop_round_trip_mixed_bases() -> None:
    """Random values in random per-element bases, pushed 300 times, come back in reverse."""
    p, steps = 257, 300
    g = _gen(1)
    buf = InfoBuffer(p, capacity=1)
    pushed = []
    for _ in range(steps):
        if bool(torch.rand((), generator=g) < 0.5):
            r = torch.randint(0, GAMMA_DENOM, (p,), generator=g)
            buf.push(r, GAMMA_DENOM, exact_base=True)
            pushed.append((r, None))
        else:
            n = torch.randint(1, GAMMA_DENOM + 1, (p,), generator=g)
            r = (torch.rand(p, generator=g, dtype=torch.float64) * n).long().clamp_max(n - 1)
            buf.push(r, n)
            pushed.append((r, n))
    assert buf.words.shape[0] > 1  # the stack grew
    for r, n in reversed(pushed):
        out = buf.pop(GAMMA_DENOM, exact_base=True) if n is None else buf.pop(n)
        assert torch.equal(out, r)
    assert buf.is_empty()


def test_buffer_pop_then_push_is_identity_from_any_state() -> None:
    """Decode-then-encode (the reverse pass's order for the n-base) restores the state."""
    p = 500
    g = _gen(2)
    buf = InfoBuffer(p)
    for _ in range(40):  # put information in
        buf.push(torch.randint(0, GAMMA_DENOM, (p,), generator=g), GAMMA_DENOM, exact_base=True)
    state, height = buf.state.clone(), buf.height.clone()
    n = torch.randint(1, GAMMA_DENOM + 1, (p,), generator=g)
    s = buf.pop(n)
    assert bool(((s >= 0) & (s < n)).all())
    buf.push(s, n)
    assert torch.equal(buf.state, state) and torch.equal(buf.height, height)


def _trajectory(p: int, steps: int, n: torch.Tensor, device: str = "cpu") -> dict[str, float]:
    """Forward/reverse 'SGD with momentum' on a synthetic deterministic gradient field."""
    w0 = torch.randn(p, generator=_gen(3), dtype=torch.float64).to(device)
    noise_gen = torch.Generator(device=device)
    gamma = n.to(torch.float64) / GAMMA_DENOM

    def grad(w: torch.Tensor, t: int) -> torch.Tensor:
        noise_gen.manual_seed(1000 + t)
        return torch.sin(3 * w) + torch.randn(
            p, generator=noise_gen, dtype=torch.float64, device=device
        )

    alpha = 0.05
    w = ExactRep(w0, buffer=False)
    v = ExactRep(torch.zeros_like(w0))
    start = w.intrep.clone()
    for t in range(steps):
        g = grad(w.val, t)
        v.mul_gamma(n)
        v.sub((1 - gamma) * g)
        w.add(alpha * v.val)
        v.check()
        w.check()
    assert v.aux is not None
    bits = v.aux.bits() / (p * steps)
    moved = float((w.val - w0).abs().max())
    for t in reversed(range(steps)):
        w.sub(alpha * v.val)
        g = grad(w.val, t)
        v.add((1 - gamma) * g)
        v.div_gamma(n)
    return {
        "bits": bits,
        "moved": moved,
        "w_exact": float(torch.equal(w.intrep, start)),
        "v_zero": float(bool((v.intrep == 0).all())),
        "empty": float(v.aux.is_empty()),
    }


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_1000_step_trajectory_reverses_bit_for_bit(gamma: float) -> None:
    p, steps = 400, 1000
    n = rational_gamma(torch.tensor(gamma)).expand(p)
    out = _trajectory(p, steps, n)
    assert out["moved"] > 0.1  # the weights really moved
    assert out["w_exact"] == 1.0 and out["v_zero"] == 1.0 and out["empty"] == 1.0
    # buffer within its bound: ≈ log2(1/γ) bits per parameter per step, never 1 bit more
    ideal = -math.log2(float(n[0]) / GAMMA_DENOM)
    assert ideal - 32 / steps <= out["bits"] <= ideal + 1.0
    assert abs(out["bits"] - ideal) < 0.02


def test_per_element_gammas_reverse_exactly() -> None:
    p = 300
    n = rational_gamma(torch.rand(p, generator=_gen(4), dtype=torch.float64) * 0.98 + 0.01)
    out = _trajectory(p, 300, n)
    assert out["w_exact"] == 1.0 and out["v_zero"] == 1.0 and out["empty"] == 1.0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_1000_step_trajectory_reverses_bit_for_bit_cuda(gamma: float) -> None:
    p, steps = 4096, 1000
    n = rational_gamma(torch.tensor(gamma)).expand(p).cuda()
    out = _trajectory(p, steps, n, device="cuda")
    assert out["w_exact"] == 1.0 and out["v_zero"] == 1.0 and out["empty"] == 1.0
    ideal = -math.log2(float(n[0]) / GAMMA_DENOM)
    assert out["bits"] <= ideal + 1.0


def test_range_log_memory_stays_bounded_and_keeps_an_early_overflow() -> None:
    # rmad records a few ranges per step: the log folds them, so its size does not grow with
    # T, and a value out of range (or NaN) recorded before thousands of others still raises
    log = RangeLog()
    for i in range(5000):
        log.record(torch.tensor([float(i), -float(i)], dtype=torch.float64))
        log.record(torch.tensor([i, -i], dtype=torch.int64))
        assert log.held < 2 * RangeLog.FOLD_AT
    log.check()
    for bad in (2.0**62, math.nan):
        log.record(torch.tensor([bad], dtype=torch.float64))
        for _ in range(3000):
            log.record(torch.tensor([1.0, -1.0], dtype=torch.float64))
        with pytest.raises(FixedPointOverflow):
            log.check()
    log.record(torch.tensor([2**62], dtype=torch.int64))
    for _ in range(3000):
        log.record(torch.tensor([1, -1], dtype=torch.int64))
    with pytest.raises(FixedPointOverflow):
        log.check()
