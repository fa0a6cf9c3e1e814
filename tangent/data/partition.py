"""Reproducible, disjoint, covering partitions of a data set over simulated clients."""
from __future__ import annotations

import hashlib

import numpy as np


def partition_iid(num_samples: int, num_partitions: int, seed: int = 0) -> list[np.ndarray]:
    """Uniform sampling without replacement under a fixed seed (as in the paper): a seeded
    permutation cut into near-equal shards. Each shard's indices are sorted."""
    _check(num_samples, num_partitions)
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(shard) for shard in np.array_split(order, num_partitions)]


def partition_dirichlet(labels: np.ndarray, num_partitions: int, alpha: float = 1.0,
                        seed: int = 0, min_size: int = 1) -> list[np.ndarray]:
    """Non-IID: for each class, the share of each partition is drawn from Dirichlet(alpha).
    Small alpha → strong label skew. Redraws (same seed stream) until every partition holds
    at least ``min_size`` samples."""
    labels = np.asarray(labels)
    _check(len(labels), num_partitions)
    if not alpha > 0:
        raise ValueError(f"Dirichlet concentration alpha must be > 0, got {alpha}")
    if min_size * num_partitions > len(labels):
        raise ValueError(f"cannot give {num_partitions} partitions {min_size} samples each "
                         f"out of {len(labels)}")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for part, chunk in enumerate(np.split(members, cuts)):
                shards[part].append(chunk)
        result = [np.sort(np.concatenate(parts)) for parts in shards]
        if min(len(shard) for shard in result) >= min_size:
            return result
    raise RuntimeError("could not draw a Dirichlet partition with non-empty shards; raise alpha")


def partition(labels: np.ndarray, num_partitions: int, scheme: str = "iid",
              alpha: float = 1.0, seed: int = 0) -> list[np.ndarray]:
    """Dispatch on ``scheme`` ('iid' or 'dirichlet')."""
    if scheme == "iid":
        return partition_iid(len(labels), num_partitions, seed)
    if scheme == "dirichlet":
        return partition_dirichlet(labels, num_partitions, alpha, seed)
    raise ValueError(f"unknown partition scheme {scheme!r}; use 'iid' or 'dirichlet'")


def partition_fingerprint(data_digest: str, indices: np.ndarray) -> str:
    """sha256 over the data set digest and the sorted sample indices: exactly which data a
    contribution was trained on."""
    digest = hashlib.sha256(data_digest.encode())
    digest.update(np.sort(np.asarray(indices, dtype=np.int64)).astype("<i8").tobytes())
    return digest.hexdigest()


def _check(num_samples: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_samples < num_partitions:
        raise ValueError(f"cannot split {num_samples} samples into {num_partitions} partitions")
