"""The ledger's exact sums (server/ledger/accumulators.py, server/ledger/fixedpoint.py) over tensors larger
than one accumulation chunk: the same integers as one pass, and no whole-tensor copy as limbs."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from server.ledger import fixedpoint
from server.ledger.accumulators import Accumulators, ExactIntegers


def test_chunked_sums_are_the_integers_of_one_pass():
    """2.5 chunks of int64 values (negative, large, carries across the limbs), added and subtracted
    with several weights, as exact integers and as limbs: both equal the int64 reference."""
    rng = np.random.default_rng(0)
    size = fixedpoint.CHUNK * 5 // 2
    draws = [rng.integers(-2 ** 50, 2 ** 50, size, dtype=np.int64) for _ in range(3)]
    weights = [1, -1, 3]
    expected = sum(w * v for w, v in zip(weights, draws))
    as_integers, as_limbs = Accumulators.zeros({"g": [size]}), Accumulators.zeros({"g": [size]})
    for w, v in zip(weights, draws):
        as_integers.add({"g": ExactIntegers(v)}, w)
        as_limbs.add({"g": (v >> fixedpoint.FRAC_BITS, v & ((1 << fixedpoint.FRAC_BITS) - 1))}, w)
    np.testing.assert_array_equal(as_integers.exact_sums(fixedpoint.FRAC_BITS)["g"], expected)
    assert as_integers.encoded() == as_limbs.encoded()
    as_integers.add({"g": ExactIntegers(draws[2])}, -3)  # removal leaves the bytes of never adding it
    two = Accumulators.zeros({"g": [size]})
    two.add({"g": ExactIntegers(draws[0])}, 1)
    two.add({"g": ExactIntegers(draws[1])}, -1)
    assert as_integers.encoded() == two.encoded()


def test_adding_a_large_tensor_holds_one_chunk_of_scratch():
    """A 4 M-entry tensor (a Gram's size): adding it allocates a few chunks at most, not its limbs
    (2 × 32 MB) and a whole-tensor scratch (32 MB) as one pass did."""
    size = 4 * fixedpoint.CHUNK
    values = np.arange(size, dtype=np.int64) << 20
    acc = Accumulators.zeros({"g": [size]})
    tracemalloc.start()
    acc.add({"g": ExactIntegers(values)}, 1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * fixedpoint.CHUNK * 8, f"{peak / 2 ** 20:.0f} MiB"
    np.testing.assert_array_equal(acc.exact_sums(fixedpoint.FRAC_BITS)["g"], values)


@pytest.mark.parametrize("size", [fixedpoint.CHUNK - 1, fixedpoint.CHUNK + 1])
def test_a_tensor_of_another_size_is_refused_and_changes_nothing(size):
    """Chunk by chunk, a longer tensor's tail would be dropped without a word: refused instead."""
    acc = Accumulators.zeros({"g": [fixedpoint.CHUNK]})
    before = acc.encoded()
    values = np.ones(size, dtype=np.int64)
    with pytest.raises(ValueError, match="shape"):
        acc.add({"g": ExactIntegers(values)}, 1)
    with pytest.raises(ValueError, match="shape"):
        acc.add({"g": (values, values)}, 1)
    assert acc.encoded() == before
