"""Model inputs for rows of a data set: cached trunk tokens when a cache directory is given,
else preprocessed images. Shared by the sites (client/), the ServerApp's central evaluation
(server/) and the simulation driver, so it lives below all of them."""
from __future__ import annotations

import numpy as np


def model_inputs(model, base_digest, images, indices, img_size, directory, *, data_digest, split=None,
                 source=None):
    """(inputs, from_cache) for ``indices`` of a data set: cached token rows, or preprocessed images.

    ``images`` may be None: the data set is then loaded from ``source`` (a data set source,
    see tangent.data.sets; default Fashion-MNIST) and ``split``, but only if the cache must be built
    or there is no cache; ``data_digest`` is then the images digest the cache is keyed on.
    """
    from tangent.data.token_cache import MANIFEST_FILE, FeatureCache, cache_key
    from tangent.data.sets import FASHION_MNIST, load_dataset, preprocess

    def load():
        return load_dataset(source or FASHION_MNIST, split or "train")[0]

    if directory is not None:
        if data_digest is not None:
            existing = directory / cache_key(base_digest, img_size, data_digest, "float32")
            if (existing / MANIFEST_FILE).is_file():
                return FeatureCache(existing).subset(indices), True
        if images is None:
            images = load()
        cache = FeatureCache.build_or_open(model, images, img_size=img_size, cache_dir=directory,
                                           data_digest=data_digest, progress=False)
        return cache.subset(indices), True
    if images is None:
        images = load()
    return preprocess(np.ascontiguousarray(images[indices]), img_size), False
