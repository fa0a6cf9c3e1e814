"""The ledger benchmark measures what it says: a TAFT-1-sized Δ added and removed durably."""
from __future__ import annotations

import math

import numpy as np

from benchmarks.ledger import bench_size, taft1_shapes


def test_the_benchmarked_delta_has_the_size_the_docs_quote():
    shapes = taft1_shapes()
    assert len(shapes) == 18 and sum(math.prod(s) for s in shapes.values()) == 1_779_850


def test_one_add_and_remove_against_a_small_ledger(tmp_path):
    result = bench_size(tmp_path, num_held=1, repeats=1, rng=np.random.default_rng(0))
    timings = [v for v in result.values() if isinstance(v, float)]
    assert timings and all(t > 0 for t in timings), result
