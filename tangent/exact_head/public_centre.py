"""A public centre for the DP head's rows: the mean φ of seeded synthetic images.

Centring before the rows are scaled to unit norm raises the signal of every released block (the
uncentred rows share a large common direction that carries no class information); measured on the
φ cache it is worth 3 to 5 points at ε = 1..8 (docs/privacy.md). The centre must not come from any
site's data, or removing a site would not remove its influence: these images are a function of a
seed only (smooth random fields under smooth random masks, 28 × 28 grey, like the data sets'
inputs), so the centre is public and every machine that runs it gets it from the seed.
"""
from __future__ import annotations

import numpy as np

COUNT, SEED = 512, 0


def synthetic_images(count: int = COUNT, seed: int = SEED, size: int = 28) -> np.ndarray:
    """uint8 [count, size, size]: a seeded Gaussian field, blurred, under a blurred random mask."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    out = np.empty((count, size, size), np.uint8)
    for i in range(count):
        field = gaussian_filter(rng.normal(size=(size, size)), sigma=rng.uniform(1, 4))
        mask = gaussian_filter((rng.random((size, size)) < rng.uniform(0.2, 0.6)).astype(float), 2)
        image = (field - field.min()) / (np.ptp(field) + 1e-9) * mask * rng.uniform(0.5, 1.5) * 255
        out[i] = np.clip(image, 0, 255).astype(np.uint8)
    return out


def public_centre(extractor, count: int = COUNT, seed: int = SEED) -> np.ndarray:
    """float64 [p]: the mean φ of :func:`synthetic_images` (computed on the CPU, one thread)."""
    from tangent.data.sets import preprocess

    phi = extractor.compute(preprocess(synthetic_images(count, seed), extractor.img_size), tokens=False)
    return phi.astype(np.float64).mean(axis=0)
