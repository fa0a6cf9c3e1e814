"""The benchmarks measure what they say: the ledger benchmark a TAFT-1-sized Δ added and removed
durably, the resolution benchmark the frozen backbone's pooled features of preprocessed images."""
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


def test_resolution_features_are_the_pooled_features_of_preprocessed_images():
    import torch

    from benchmarks.resolution import features
    from tangent.data.sets import preprocess
    from tests.helpers import tiny_vit, uint8_images

    model, images = tiny_vit(dtype=torch.float32), uint8_images(5)
    out = features(model, images, 28, batch_size=2)  # batches of 2, 2 and 1
    assert out.shape == (5, 32)
    with torch.no_grad():
        np.testing.assert_allclose(out, model(preprocess(images, 28)).numpy(), rtol=1e-5, atol=1e-6)
