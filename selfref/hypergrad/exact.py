"""Exactly reversible arithmetic for RMAD: fixed-point numbers and an information buffer.

Maclaurin, Duvenaud & Adams 2015, "Gradient-based Hyperparameter Optimization through
Reversible Learning", section 2.3 and Algorithm 3. Parameters and velocities are held as
int64 fixed-point numbers with radix 2^52, so that adding a (rounded) float is exactly undone
by subtracting the same rounded float. Multiplying by a decay γ destroys information; γ is
taken as a rational n/d with d = 2^16 (the authors' choice, ``d ≤ 2^16``) and the bits that
the multiplication would destroy are pushed into an :class:`InfoBuffer` on the way up and
popped on the way down (Algorithm 3)::

    i ← i·d + (c mod d);  c ← c div d;  c ← c·n + (i mod n);  i ← i div n

Here ``i`` is an unbounded integer per element. We hold it the way a range-coder does: an
rANS state ``x`` in [2^31, 2^63) per element (one int64) whose low 32 bits spill into a
growing stack of int32 word tensors when it would overflow and are refilled when it runs low
(Duda 2013, "Asymmetric numeral systems"; the standard 64-bit-state / 32-bit-word variant).
``i·d + r`` with d = 2^16 is an rANS *encode* of r with uniform frequencies (exact), and
``(i mod n, i div n)`` is an rANS *decode* of a symbol in [0, n) with near-uniform
frequencies over 2^24 slots (slot ``j·n + s`` is the j-th slot of symbol s, so decoding is
one division by n, done as a multiply and a shift). Every step is a bijection, so the reverse
pass restores the state bit for bit; the stack grows by ≈ log2(d/n) = log2(1/γ) bits per
element per step (plus < 0.001 bits of table rounding, plus at most 32 bits of slack in the
state).

Everything is vectorized: one int64 state per element, one (words, elements) int32 stack
and one int64 height per element, on the parameters' device. No Python object per element.
On CPU the integer coding runs on numpy views of the same tensors (the same operators, a
fraction of torch's per-call overhead on these small vectors).

Notation: p – number of elements (flattened parameters), k – stack words.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RADIX_BITS",
    "RADIX",
    "GAMMA_DENOM",
    "FixedPointOverflow",
    "to_fixed",
    "from_fixed",
    "add_checked",
    "rational_gamma",
    "quantize_gamma",
    "InfoBuffer",
    "RangeLog",
    "ExactRep",
    "UniformTable",
    "uniform_table",
]

RADIX_BITS = 52  # fixed point: value = int / 2^52; values kept in |x| < 2^10 = 1024
RADIX = 2**RADIX_BITS
GAMMA_DENOM_BITS = 16  # γ ≈ n / 2^16 (Maclaurin et al.'s float_to_rational uses d = 2^16)
GAMMA_DENOM = 2**GAMMA_DENOM_BITS

_INT_LIMIT = 2**62  # |held integer| < 2^62, so the sum of two never wraps int64
_MAX_ABS_VALUE = _INT_LIMIT / RADIX  # 1024.0: the representable range of values

# rANS coder constants: state x ∈ [L, L·2^32) = [2^31, 2^63); words of 32 bits.
_WORD_BITS = 32
_WORD_MASK = 2**_WORD_BITS - 1
_STATE_LOW_BITS = 31
_STATE_LOW = 2**_STATE_LOW_BITS
_DECODE_PREC_BITS = 24  # slots of the near-uniform table for decoding a symbol in [0, n)


class FixedPointOverflow(OverflowError):
    """A value left the fixed-point range (|x| ≥ 2^10 at radix 2^52 in int64); never wrapped."""


def to_fixed(x: Tensor) -> Tensor:
    """Round a float tensor to int64 fixed point (radix 2^52), raising instead of wrapping.

    Args:
        x: float tensor (any float dtype; converted to float64 first, which is exact).

    Returns:
        int64 tensor ``round(x · 2^52)`` (round half to even).

    Raises:
        FixedPointOverflow: an element is not finite or ``|x| ≥ 2^10``.
    """
    y = torch.round(x.to(torch.float64) * RADIX)
    bad = ~(y.abs() < _INT_LIMIT)  # also catches NaN
    if bool(bad.any()):
        worst = float(x.to(torch.float64)[bad].abs().max())
        raise FixedPointOverflow(
            f"value {worst:.6g} does not fit the fixed-point range |x| < {_MAX_ABS_VALUE:g} "
            f"(int64, radix 2^{RADIX_BITS}); lower the learning rates or the init scale"
        )
    return y.to(torch.int64)


def from_fixed(c: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Float value of int64 fixed point (nearest float64, then ``dtype``)."""
    return (c.to(torch.float64) / RADIX).to(dtype)


def add_checked(a: Tensor, b: Tensor) -> Tensor:
    """``a + b`` of fixed-point integers, raising if the sum leaves |x| < 2^62 (never wraps)."""
    s = a + b
    # two's-complement overflow (both operands have the sign the result lacks) or out of range
    wrapped = ((a ^ s) & (b ^ s)) < 0
    if bool((wrapped | (s.abs() >= _INT_LIMIT)).any()):
        raise FixedPointOverflow(
            f"fixed-point addition overflowed |x| < {_MAX_ABS_VALUE:g}; lower the learning "
            "rates or the init scale"
        )
    return s


def rational_gamma(gamma: Tensor) -> Tensor:
    """Numerator n of the rational γ ≈ n / 2^16 used by the exact arithmetic.

    Args:
        gamma: decays in [0, 1] (any shape, float).

    Returns:
        int64 tensor of numerators, ``round(γ · 2^16)`` clamped to [1, 2^16]; the decay the
        trajectory actually uses is ``n / 2^16`` (see :func:`quantize_gamma`).

    Raises:
        ValueError: a γ outside [0, 1] or not finite.
    """
    g = gamma.detach().to(torch.float64)
    if not bool(((g >= 0) & (g <= 1)).all()):
        raise ValueError(f"momentum decay gamma must be in [0, 1], got {g.min():g}..{g.max():g}")
    return torch.round(g * GAMMA_DENOM).clamp(1, GAMMA_DENOM).to(torch.int64)


def quantize_gamma(gamma: Tensor) -> Tensor:
    """The decay the exact trajectory really uses: ``rational_gamma(γ) / 2^16`` (float64)."""
    return rational_gamma(gamma).to(torch.float64) / GAMMA_DENOM


class UniformTable(NamedTuple):
    """A near-uniform 2^24-slot frequency table over n symbols, per element.

    Slot ``j·n + s`` (for ``j·n + s < 2^24``) belongs to symbol s, so the first
    ``rem = 2^24 mod n`` symbols get ``q + 1`` slots and the rest ``q = 2^24 div n``. A slot's
    symbol and rank are ``slot mod n`` and ``slot div n``; the division is exact as
    ``(slot · magic) >> shift`` with ``shift = 24 + ⌈log2 n⌉`` and ``magic = ⌈2^shift / n⌉``
    (Granlund & Montgomery 1994: the error ``slot·(magic·n − 2^shift) / (n·2^shift)`` stays
    below 1/n for slot < 2^24, and ``slot · magic < 2^49`` cannot overflow).
    Build once per distinct n with :func:`uniform_table` and reuse it (saves divisions).
    """

    n: Tensor  # number of symbols, int64 in [1, 2^16]
    q: Tensor  # 2^24 div n
    rem: Tensor  # 2^24 mod n
    magic: Tensor | None = None  # ⌈2^shift / n⌉ (decoding only)
    shift: Tensor | None = None  # 24 + ⌈log2 n⌉ (decoding only)


def uniform_table(n: Tensor | int, device: torch.device | str | None = None) -> UniformTable:
    """The :class:`UniformTable` of base ``n`` (int64 tensor or int)."""
    n = torch.as_tensor(n, dtype=torch.int64, device=device)
    q = (2**_DECODE_PREC_BITS) // n
    ceil_log2 = torch.frexp((n - 1).to(torch.float64)).exponent.to(torch.int64)  # bit length
    shift = _DECODE_PREC_BITS + ceil_log2
    top = torch.bitwise_left_shift(torch.ones_like(n), shift)  # 2^shift
    magic = torch.div(top + n - 1, n, rounding_mode="floor")
    return UniformTable(n, q, 2**_DECODE_PREC_BITS - q * n, magic, shift)


def _as_table(base: Tensor | int | UniformTable, device: torch.device) -> UniformTable:
    return base if isinstance(base, UniformTable) else uniform_table(base, device)


def _host(x: Tensor) -> Any:
    """A CPU tensor as a numpy view of the same memory (numpy's per-call overhead on small
    integer vectors is a fraction of torch's); tensors on other devices as they are. The
    coding below uses only operators that mean the same on both (in place where written
    so, int64 wrap-around, floor division, arithmetic shifts)."""
    return x.numpy() if x.device.type == "cpu" else x


def _tensor(x: Any) -> Tensor:
    """Inverse of :func:`_host` (zero copy)."""
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def _host_table(tab: UniformTable, decode: bool = False) -> tuple[Any, ...]:
    if not decode:
        return _host(tab.n), _host(tab.q), _host(tab.rem)
    if tab.magic is None or tab.shift is None:
        raise ValueError("decoding needs the table's magic and shift (uniform_table)")
    return tuple(_host(x) for x in (tab.n, tab.q, tab.rem, tab.magic, tab.shift))


class InfoBuffer:
    """Per-element lossless store of integers (Algorithm 3's ``i``), as tensors.

    Two operations, each exactly inverted by the other:

    - :meth:`push` ``(r, base)`` — store r ∈ [0, base) (``i ← i·base + r``);
    - :meth:`pop` ``(base)`` — take a value in [0, base) out (``r = i mod base; i ← i div base``).

    ``base`` is either ``2^16`` (``exact_base=True``: the encode is exactly ``x·2^16 + r``) or
    any integer in [1, 2^16] per element (near-uniform 2^24-slot table). The state of each
    element is an int64 ``x ∈ [2^31, 2^63)``; its low 32 bits spill onto ``words`` (int32,
    shape (k, p)) before a push would overflow it, and come back when a pop leaves it below
    2^31. An empty stack reads as zeros and zero words are never stored at its bottom, so the
    buffer returns to exactly its initial (empty) state after all pushes are popped.

    Args:
        numel: number of elements p.
        device: where the tensors live (the parameters' device).
        capacity: initial stack capacity in words per element (grows by doubling).
    """

    def __init__(self, numel: int, device: torch.device | str = "cpu", capacity: int = 16) -> None:
        if numel < 1:
            raise ValueError(f"numel must be >= 1, got {numel}")
        self.numel = numel
        self.device = torch.device(device)
        self.state = torch.full((numel,), _STATE_LOW, dtype=torch.int64, device=self.device)  # (p,)
        self.words = torch.zeros(max(1, capacity), numel, dtype=torch.int32, device=self.device)
        self.height = torch.zeros(numel, dtype=torch.int64, device=self.device)  # (p,)
        self._max_height = 0  # host-side upper bound of height.max() (grows by ≤ 1 per push)

    # -- stack of words -------------------------------------------------------------------
    def _ensure_capacity(self) -> None:
        if self._max_height + 1 >= self.words.shape[0]:
            self._max_height = int(self.height.max())  # exact value (one sync)
            if self._max_height + 1 >= self.words.shape[0]:
                grow = torch.zeros_like(self.words)
                self.words = torch.cat([self.words, grow], dim=0)  # (2k, p)

    def _spill(self, mask: Tensor) -> None:
        """Move the low 32 bits of ``state`` onto the stack where ``mask``; state >>= 32.

        Only the few elements that spill are touched (indices from ``mask.nonzero()``).
        """
        idx = mask.nonzero().squeeze(1)  # (s,)
        if idx.numel() == 0:
            return
        self._ensure_capacity()
        state = self.state[idx]
        height = self.height[idx]
        low = state & _WORD_MASK  # (s,) in [0, 2^32)
        # canonical form: a zero word on an empty stack is the implicit zero below it
        store = (height > 0) | (low != 0)
        word32 = torch.where(low >= 2**31, low - 2**32, low).to(torch.int32)
        self.words[height[store], idx[store]] = word32[store]
        self.height[idx] = height + store.to(torch.int64)
        self._max_height += 1
        self.state[idx] = state >> _WORD_BITS

    def _refill(self, mask: Tensor) -> None:
        """Where ``mask``: state ← state·2^32 + top word (0 on an empty stack); pop it."""
        idx = mask.nonzero().squeeze(1)  # (s,)
        if idx.numel() == 0:
            return
        height = self.height[idx]
        take = height > 0
        top = (height - 1).clamp_min(0)
        word = self.words[top, idx].to(torch.int64) & _WORD_MASK  # (s,) in [0, 2^32)
        word = torch.where(take, word, torch.zeros_like(word))
        self.height[idx] = height - take.to(torch.int64)
        self.state[idx] = (self.state[idx] << _WORD_BITS) | word

    # -- coding ---------------------------------------------------------------------------
    def push(self, r: Tensor, base: Tensor | int | UniformTable, exact_base: bool = False) -> None:
        """Store ``r`` (int64, (p,), values in [0, base)) — the ``i ← i·base + r`` of Alg. 3.

        Args:
            r: the values to store.
            base: per-element (or scalar) base in [1, 2^16], or its :class:`UniformTable`.
            exact_base: True when ``base`` is exactly 2^16 everywhere (exact uniform coding).
        """
        self._push(_host(r), None if exact_base else _host_table(_as_table(base, self.device)))

    def pop(self, base: Tensor | int | UniformTable, exact_base: bool = False) -> Tensor:
        """Take a value in [0, base) out — the ``r = i mod base; i ← i div base`` of Alg. 3.

        Exactly inverts the :meth:`push` with the same ``base`` (and vice versa).

        Returns:
            int64 tensor (p,) of values in [0, base).
        """
        tab = None if exact_base else _host_table(_as_table(base, self.device), decode=True)
        return _tensor(self._pop(tab))

    # The coding itself, on _host arrays (numpy views on CPU; tensors elsewhere), in place.
    def _push(self, r: Any, tab: tuple[Any, ...] | None) -> None:
        x = _host(self.state)
        if tab is None:  # exact base 2^16: uniform over 2^16 slots, f = 1: x_max = 2^(31-16+32)
            self._spill(_tensor(x >= 2 ** (_STATE_LOW_BITS - GAMMA_DENOM_BITS + _WORD_BITS)))
            x <<= GAMMA_DENOM_BITS
            x |= r
            return
        n, q, rem = tab[:3]
        f = q + (r < rem)  # slots of symbol r
        # spill when x ≥ (L / M)·2^32·f = f·2^39, written so that f = 2^24 cannot overflow
        self._spill(_tensor((x >> (_STATE_LOW_BITS - _DECODE_PREC_BITS + _WORD_BITS)) >= f))
        xq = x // f  # x ≥ 0
        # x ← (x div f)·2^24 + slot, slot = (x mod f)·n + r: the (x mod f)-th slot of r
        x -= xq * f
        x *= n
        x += r
        xq <<= _DECODE_PREC_BITS
        x += xq

    def _pop(self, tab: tuple[Any, ...] | None) -> Any:
        x = _host(self.state)
        if tab is None:  # exact base 2^16
            r = x & (GAMMA_DENOM - 1)
            x >>= GAMMA_DENOM_BITS
        else:
            n, q, rem, magic, shift = tab
            r = x & (2**_DECODE_PREC_BITS - 1)  # the slot
            rank = r * magic
            rank >>= shift  # slot div n
            r -= rank * n  # slot mod n: the symbol
            f = q + (r < rem)  # its number of slots
            x >>= _DECODE_PREC_BITS
            x *= f
            x += rank
        self._refill(_tensor(x < _STATE_LOW))
        return r

    # -- accounting -----------------------------------------------------------------------
    def bits(self) -> float:
        """Information held, in bits summed over elements: 32·words + log2(state / 2^31)."""
        words = float(self.height.sum()) * _WORD_BITS
        slack = float((torch.log2(self.state.to(torch.float64)) - _STATE_LOW_BITS).sum())
        return words + slack

    def stored_bytes(self) -> int:
        """Bytes of the words actually used (int32 each) plus the int64 states and heights."""
        return int(self.height.sum()) * 4 + 16 * self.numel

    def allocated_bytes(self) -> int:
        """Bytes allocated: the whole word stack (capacity) plus states and heights."""
        return self.words.numel() * 4 + 16 * self.numel

    def is_empty(self) -> bool:
        """True when the buffer is back in its initial state (all information popped)."""
        return bool((self.height == 0).all()) and bool((self.state == _STATE_LOW).all())


class RangeLog:
    """Deferred range checks for fixed-point integers, in grid units (multiples of 2^-52).

    :meth:`record` keeps the min and max of a tensor without a device sync (every
    :attr:`FOLD_AT` kept values are folded into their min and max, so memory does not grow
    with the number of steps); :meth:`check`
    raises :class:`FixedPointOverflow` if anything recorded since the last check reached
    ``|x| ≥ 2^62`` or was NaN. Record every addend before it is converted to int64 and every
    held integer after it changed: then the first out-of-range value is always recorded
    before anything can wrap, and a check at the end of a pass raises if, and only if, some
    step left the range. (A float64 record of an integer can round up to 2^62 from just
    below: that errs on the safe side.)
    """

    # Entries kept per list before they are folded into their own min and max: memory stays
    # O(1) in the number of records (a few per step), at one stack per 512 records.
    FOLD_AT = 1024

    def __init__(self) -> None:
        self._floats: list[Tensor] = []  # min, max, min, max, ...
        self._ints: list[Tensor] = []

    def record(self, x: Tensor) -> Tensor:
        """Note the range of ``x`` (float64 or int64 grid units); returns ``x``."""
        kept = self._floats if x.is_floating_point() else self._ints
        kept.extend(torch.aminmax(x))
        if len(kept) >= self.FOLD_AT:  # NaN survives the fold: aminmax propagates it
            kept[:] = torch.aminmax(torch.stack(kept))
        return x

    @property
    def held(self) -> int:
        """Number of min/max values kept: below ``2 * FOLD_AT`` however many records."""
        return len(self._floats) + len(self._ints)

    def check(self) -> None:
        """Raise :class:`FixedPointOverflow` if a recorded value left ``|x| < 2^62``."""
        worst = 0.0
        if self._floats:
            worst = float(torch.stack(self._floats).abs().max())
        if self._ints:
            ints = torch.stack(self._ints)  # |int64| itself could wrap: compare both ends
            if bool(((ints <= -_INT_LIMIT) | (ints >= _INT_LIMIT)).any()):
                worst = max(worst, float(ints.to(torch.float64).abs().max()))
        self._floats, self._ints = [], []
        if not worst < _INT_LIMIT:  # also NaN
            raise FixedPointOverflow(
                f"value {worst / RADIX:.6g} does not fit the fixed-point range "
                f"|x| < {_MAX_ABS_VALUE:g} (int64, radix 2^{RADIX_BITS}); lower the learning "
                "rates or the init scale"
            )


def _logged(x: Tensor, log: RangeLog | None) -> Tensor:
    return x if log is None else log.record(x)


class ExactRep:
    """A float vector held exactly as int64 fixed point, with an :class:`InfoBuffer`.

    The methods mutate the held integers in place (this is bookkeeping outside autograd, like
    Maclaurin et al.'s ``ExactRep``): :meth:`add` / :meth:`sub` of a float vector (rounded to
    the grid) and :meth:`mul_gamma` / :meth:`div_gamma` by γ = n/2^16 with the lost bits kept
    in the buffer, so that each operation is undone bit for bit by its partner.
    :meth:`add_grid` / :meth:`sub_grid` take addends already rounded to grid units and defer
    their range checks to a :class:`RangeLog` (one sync per pass instead of one per addition).

    Args:
        value: initial float values (p,), rounded to the fixed-point grid.
        buffer: whether to allocate an information buffer (needed for ``mul_gamma``).

    Example:
        >>> v = ExactRep(torch.tensor([0.5, -1.25], dtype=torch.float64))
        >>> n = rational_gamma(torch.tensor(0.9))
        >>> before = v.intrep.clone()
        >>> v.mul_gamma(n); v.div_gamma(n)
        >>> bool(torch.equal(v.intrep, before))
        True
    """

    def __init__(self, value: Tensor, buffer: bool = True) -> None:
        if value.dim() != 1:
            raise ValueError(f"ExactRep holds a flat vector, got shape {tuple(value.shape)}")
        self.intrep = to_fixed(value)  # (p,) int64, |intrep| < 2^62
        self.aux = InfoBuffer(value.numel(), value.device) if buffer else None
        self._worst = torch.zeros((), dtype=torch.float64, device=value.device)
        self._unchecked = False

    @property
    def val(self) -> Tensor:
        """The held values as float64 (p,)."""
        return from_fixed(self.intrep)

    def grid(self) -> Tensor:
        """The held integers as float64 (p,): the values in grid units (``val · 2^52``)."""
        return self.intrep.to(torch.float64)

    def check(self) -> None:
        """Raise :class:`FixedPointOverflow` if the last :meth:`add`/:meth:`sub` left the range.

        Additions defer their range check (one device sync per step instead of one per
        operation); at most one addition is ever pending, because the next one checks
        first, and both operands of a pending sum are below 2^62, so nothing wraps.
        """
        if not self._unchecked:
            return
        self._unchecked = False
        worst = float(torch.maximum(self._worst, self.intrep.abs().amax().to(torch.float64)))
        if not worst < _INT_LIMIT:  # also NaN
            raise FixedPointOverflow(
                f"value {worst / RADIX:.6g} does not fit the fixed-point range "
                f"|x| < {_MAX_ABS_VALUE:g} (int64, radix 2^{RADIX_BITS}); lower the learning "
                "rates or the init scale"
            )

    def _add_fixed(self, x: Tensor, sign: int) -> None:
        self.check()
        y = torch.round(x.to(torch.float64) * (sign * RADIX))  # (p,) integral float64
        self._worst = y.abs().amax()  # NaN propagates
        self._unchecked = True  # an out-of-range y casts to garbage, but check() will raise
        self.intrep = self.intrep + y.to(torch.int64)

    def add(self, x: Tensor) -> None:
        """``self += x`` (x rounded to the grid); see :meth:`check` for the range test."""
        self._add_fixed(x, 1)

    def sub(self, x: Tensor) -> None:
        """``self -= x``, the exact inverse of ``add(x)``."""
        self._add_fixed(x, -1)

    def add_grid(self, y: Tensor, log: RangeLog | None) -> None:
        """``intrep += y`` for ``y`` integral float64 in grid units (e.g. ``torch.round(x·2^52)``).

        The ranges of ``y`` and of the result go to ``log``; nothing is checked until
        ``log.check()``, and the integers may wrap before that (which it then reports).
        ``log=None`` records nothing: only for retracing additions that a checked pass
        already made (RMAD's reverse pass, whose result is compared bit for bit).
        """
        self.intrep.add_(_logged(y, log).to(torch.int64))
        _logged(self.intrep, log)

    def sub_grid(self, y: Tensor, log: RangeLog | None) -> None:
        """``intrep -= y``, the exact inverse of ``add_grid(y, log)``."""
        self.intrep.sub_(_logged(y, log).to(torch.int64))
        _logged(self.intrep, log)

    def mul_gamma(self, n: Tensor | UniformTable) -> None:
        """c ← c·n/2^16 exactly invertibly (Algorithm 3 with d = 2^16).

        Args:
            n: int64 numerators (p,) or scalar, or their :class:`UniformTable`.
        """
        if self.aux is None:
            raise ValueError("mul_gamma needs an information buffer (ExactRep(..., buffer=True))")
        tab = _host_table(_as_table(n, self.intrep.device), decode=True)
        c = _host(self.intrep)
        self.aux._push(c & (GAMMA_DENOM - 1), None)  # c mod d
        # c div d (floor), times n: |c div d|·n < 2^62 cannot overflow; plus i mod n
        c >>= GAMMA_DENOM_BITS
        c *= tab[0]
        c += self.aux._pop(tab)

    def div_gamma(self, n: Tensor | UniformTable) -> None:
        """Exact inverse of :meth:`mul_gamma` with the same ``n``."""
        if self.aux is None:
            raise ValueError("div_gamma needs an information buffer (ExactRep(..., buffer=True))")
        tab = _host_table(_as_table(n, self.intrep.device))
        c = _host(self.intrep)
        cq = c // tab[0]  # c div n (floor)
        c -= cq * tab[0]
        self.aux._push(c, tab)  # c mod n
        cq <<= GAMMA_DENOM_BITS
        cq |= self.aux._pop(None)
        c[...] = cq
