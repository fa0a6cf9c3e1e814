"""Exact fixed-point accumulation of weighted weight changes.

Every received Δw entry ``x`` (float32) is put on the grid ``2**-FRAC_BITS``::

    q = round_half_even(x * 2**FRAC_BITS)            # an integer, |q| <= 2**40

and the server keeps, per entry, the exact integer ``S = Σ wᵢ·qᵢ`` together with the exact
integer ``W = Σ wᵢ`` (``wᵢ`` = num_examples, or 1 under uniform weighting). Integer addition
is associative and commutative, so adding and subtracting contributions in any order gives the
same ``S`` bit for bit, and removing a contribution leaves exactly what a ledger that never saw
it would hold. The composed Δ is a fixed, deterministic function of ``(S, W)``::

    composed = float32( float64(S) * 2**-FRAC_BITS / float64(W) )

(computed as ``(float64(hi) + float64(lo) * 2**-32) / float64(W)``, see below).

Grid, range and bounds
----------------------
- Grid: ``GRID = 2**-32``. float32 values with ``|x| >= 2**-9`` already lie on the grid; smaller
  ones are rounded to it, so the quantization error is at most ``GRID / 2 = 2**-33`` per entry.
- Range: ``|x| <= MAX_ABS_VALUE = 2**8``. Values outside are **rejected**, never clipped.
- Weights: ``1 <= wᵢ <= MAX_WEIGHT = 2**24`` per contribution and ``W <= MAX_TOTAL_WEIGHT = 2**53``.

Error bound of the composed Δ against the exact weighted mean ``m = Σ wᵢxᵢ / Σ wᵢ`` of the
float32 inputs, per entry: the weighted mean of the quantization errors is at most ``2**-33``;
the float64 sum and division add at most ``2**-52 · |m|`` (plus ``2**-53·2**-33``); the final
float32 rounding adds at most half a float32 ulp, ``2**-24 · |composed|``. In short
``|composed − m| <= 2**-33 + 2**-24·|m| + tiny`` — below float32 resolution for any entry with
``|m| >= 2**-9``.

Representation (why it never overflows)
---------------------------------------
``S`` can exceed 64 bits (``|S| <= W · 2**40 <= 2**93``), so it is held in two int64 limbs,
``S = hi · 2**32 + lo`` with ``0 <= lo < 2**32`` after every operation (a unique, canonical
form, which is what makes stored accumulator bytes comparable). Each quantized value is split
the same way, ``q = q_hi · 2**32 + q_lo`` with ``|q_hi| <= 2**8`` and ``0 <= q_lo < 2**32``.
One add/subtract changes ``lo`` by ``w·q_lo < 2**24 · 2**32 = 2**56`` and ``hi`` by
``w·|q_hi| <= 2**32``; the carry is then normalised back, so ``lo`` stays below ``2**57`` in
magnitude and ``|hi| <= W · 2**8 + 1 <= 2**61 + 1 < 2**63``. Neither limb can overflow while the
weight bounds above hold, and the ledger enforces them.
"""
from __future__ import annotations

import numpy as np

FRAC_BITS = 32
GRID = 2.0 ** -FRAC_BITS
RANGE_BITS = 8
MAX_ABS_VALUE = 2.0 ** RANGE_BITS
MAX_WEIGHT = 2 ** 24
MAX_TOTAL_WEIGHT = 2 ** 53

_LO_MASK = (1 << FRAC_BITS) - 1
_LO_DTYPE = np.dtype("<u4")  # lo is canonical in [0, 2**32): four bytes suffice on disk


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split ``round(x · 2**32)`` into limbs ``(q_hi, q_lo)``; ``x`` must be finite and in range."""
    # float32 -> float64 and the power-of-two scaling are exact; rint rounds half to even.
    q = x.astype(np.float64).ravel()
    q *= 2.0 ** FRAC_BITS
    np.rint(q, out=q)
    q = q.astype(np.int64)
    q_hi = q >> FRAC_BITS
    q &= _LO_MASK
    return q_hi, q


def zeros(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(size, dtype=np.int64), np.zeros(size, dtype=np.int64)


#: entries per step of an accumulation: its scratch is one chunk (8 MiB), not another copy of the
#: tensor (a 3,072-feature Gram has 4.7 M entries: 38 MB a copy)
CHUNK = 1 << 20


def accumulate(hi: np.ndarray, lo: np.ndarray, q_hi: np.ndarray, q_lo: np.ndarray, weight: int) -> None:
    """In place ``S += weight · q`` (``weight`` may be negative to subtract); keeps the canonical form.
    Flat arrays; entry by entry, so chunk by chunk gives the same integers."""
    _check(hi, weight, q_hi, q_lo)
    for start in range(0, hi.size, CHUNK):
        part = slice(start, start + CHUNK)
        _accumulate(hi[part], lo[part], q_hi[part], q_lo[part], weight)


def accumulate_integers(hi: np.ndarray, lo: np.ndarray, values: np.ndarray, weight: int) -> None:
    """In place ``S += weight · v`` for exact int64 values on the grid (``v = q_hi·2**32 + q_lo``):
    their limbs are split one chunk at a time, never for the whole tensor at once."""
    _check(hi, weight, values)
    for start in range(0, hi.size, CHUNK):
        part = slice(start, start + CHUNK)
        v = values[part]
        _accumulate(hi[part], lo[part], v >> FRAC_BITS, v & _LO_MASK, weight)


def _check(hi: np.ndarray, weight: int, *added: np.ndarray) -> None:
    if not -MAX_WEIGHT <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight {weight} outside ±{MAX_WEIGHT}")
    if any(a.shape != hi.shape for a in added):  # a chunk of a longer array would drop its tail
        raise ValueError(f"adding shapes {[a.shape for a in added]} to a sum of shape {hi.shape}")


def _accumulate(hi: np.ndarray, lo: np.ndarray, q_hi: np.ndarray, q_lo: np.ndarray, weight: int) -> None:
    scratch = np.multiply(q_lo, weight)
    lo += scratch
    np.multiply(q_hi, weight, out=scratch)
    hi += scratch
    np.right_shift(lo, FRAC_BITS, out=scratch)  # arithmetic shift = floor division, also for negative lo
    lo &= _LO_MASK
    hi += scratch


_HI_WIDTHS = (np.dtype("<i1"), np.dtype("<i2"), np.dtype("<i4"), np.dtype("<i8"))


def encode(hi: np.ndarray, lo: np.ndarray) -> memoryview:
    """Canonical little-endian encoding of one accumulator tensor.

    One byte giving the width of the hi limbs, then the hi limbs in the narrowest of int8/16/32/64
    that holds them all, then the lo limbs as uint32. The width is a function of the values, so
    equal sums always encode to equal bytes; typical sums need 5–6 bytes per entry instead of 12.
    """
    low, high = (int(hi.min()), int(hi.max())) if hi.size else (0, 0)
    code = next(i for i, dt in enumerate(_HI_WIDTHS)
                if np.iinfo(dt).min <= low and high <= np.iinfo(dt).max)
    hi_dtype = _HI_WIDTHS[code]
    split = 1 + hi.size * hi_dtype.itemsize
    buf = np.empty(split + lo.size * _LO_DTYPE.itemsize, dtype=np.uint8)
    buf[0] = code
    buf[1:split].view(hi_dtype)[:] = hi
    buf[split:].view(_LO_DTYPE)[:] = lo
    return memoryview(buf)


def decode(data: bytes, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`encode` for a tensor of ``size`` entries."""
    if not data or data[0] >= len(_HI_WIDTHS):
        raise ValueError("accumulator bytes carry no valid width code")
    hi_dtype = _HI_WIDTHS[data[0]]
    split = 1 + size * hi_dtype.itemsize
    if len(data) != split + size * _LO_DTYPE.itemsize:
        raise ValueError(f"accumulator holds {len(data)} bytes, expected {split + size * _LO_DTYPE.itemsize}")
    hi = np.frombuffer(data, dtype=hi_dtype, count=size, offset=1).astype(np.int64)
    lo = np.frombuffer(data, dtype=_LO_DTYPE, count=size, offset=split).astype(np.int64)
    return hi, lo


def compose(hi: np.ndarray, lo: np.ndarray, total_weight: int) -> np.ndarray:
    """The float32 weighted mean ``S · 2**-32 / W``; zeros when nothing is accumulated."""
    if total_weight == 0:
        return np.zeros(hi.shape, dtype=np.float32)
    total = lo.astype(np.float64)
    total *= GRID
    total += hi  # hi converts exactly while |hi| < 2**53; either way the result is deterministic
    total /= float(total_weight)
    return total.astype(np.float32)
