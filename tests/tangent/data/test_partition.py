import numpy as np
import pytest

from tangent.data.sets import dataset_digest, load_fashion_mnist
from tangent.data.partition import partition, partition_dirichlet, partition_fingerprint, partition_iid


@pytest.fixture(scope="module")
def labels():
    return load_fashion_mnist("train")[1]


def _disjoint_and_covering(shards, n):
    merged = np.concatenate(shards)
    assert len(merged) == n and len(np.unique(merged)) == n  # each index exactly once


@pytest.mark.parametrize("num_partitions", [1, 7, 50])
def test_iid_disjoint_covering_reproducible(labels, num_partitions):
    shards = partition_iid(len(labels), num_partitions, seed=3)
    _disjoint_and_covering(shards, len(labels))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    again = partition_iid(len(labels), num_partitions, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    if num_partitions > 1:
        other = partition_iid(len(labels), num_partitions, seed=4)
        assert not np.array_equal(shards[0], other[0])


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_dirichlet_disjoint_covering_reproducible(labels, alpha):
    shards = partition_dirichlet(labels, 20, alpha=alpha, seed=1)
    _disjoint_and_covering(shards, len(labels))
    again = partition_dirichlet(labels, 20, alpha=alpha, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))


def _mean_label_skew(labels, shards):
    """Mean total-variation distance between a shard's label histogram and the global one."""
    global_hist = np.bincount(labels, minlength=10) / len(labels)
    return np.mean([0.5 * np.abs(np.bincount(labels[s], minlength=10) / len(s) - global_hist).sum()
                    for s in shards])


def test_dirichlet_skew_visible(labels):
    iid = _mean_label_skew(labels, partition_iid(len(labels), 20, seed=0))
    strong = _mean_label_skew(labels, partition_dirichlet(labels, 20, alpha=0.1, seed=0))
    mild = _mean_label_skew(labels, partition_dirichlet(labels, 20, alpha=100.0, seed=0))
    assert iid < 0.05 and mild < 0.1
    assert strong > 0.5 > mild


def test_fingerprint_stable_and_specific(labels):
    images, labels_ = load_fashion_mnist("test")
    digest = dataset_digest(images, labels_)
    shards = partition(labels_, 10, "iid", seed=0)
    first = partition_fingerprint(digest, shards[0])
    assert first == partition_fingerprint(digest, shards[0][::-1].copy())  # order-free
    assert first != partition_fingerprint(digest, shards[1])
    assert first != partition_fingerprint("0" * 64, shards[0])
    assert len(first) == 64


def test_bad_arguments(labels):
    with pytest.raises(ValueError):
        partition(labels, 10, "by-magic")
    with pytest.raises(ValueError):
        partition_iid(5, 10)
    with pytest.raises(ValueError):
        partition_dirichlet(labels, 10, alpha=0)
