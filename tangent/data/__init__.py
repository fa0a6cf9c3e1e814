"""Data a site or the server reads: data sets, partitions, the trunk-token cache, the device.

- :mod:`.sets` — Fashion-MNIST, own data (.npz / ImageFolder), validation, preprocessing, digests.
- :mod:`.partition` — reproducible disjoint partitions over simulated sites.
- :mod:`.token_cache` — on-disk cache of the frozen trunk's output tokens.
- :mod:`.inputs` — model inputs for rows of a data set (cached tokens or images).
- :mod:`.device` — the ``device`` setting (``auto | cpu | cuda[:i]``).
"""
