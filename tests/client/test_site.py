"""client.site: a site's labels must fit the model's classes; simulated sites read the run
config's data set (here an .npz with 4 classes) and refuse to evaluate without a test set."""
from __future__ import annotations

import numpy as np
import pytest

from client.site import SiteError, load_split
from tests.helpers import tiny_model, uint8_images


def test_labels_beyond_the_models_classes_are_refused(tmp_path):
    path = tmp_path / "site.npz"
    np.savez(path, images=np.zeros((6, 8, 8), np.uint8), labels=np.array([0, 1, 2, 3, 11, 12]))
    with pytest.raises(SiteError, match="label 12 but the model has 10 classes") as err:
        load_split("train", tiny_model("avg"), "digest", 28, {"site-id": "a", "data-path": str(path)}, {})
    assert err.value.code == "bad_data"


def test_simulated_sites_cut_the_run_configs_data_set(tmp_path):
    path = tmp_path / "train.npz"
    labels = np.arange(40) % 4
    np.savez(path, images=np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8), labels=labels)
    run_config = {"dataset": str(path), "partition": "iid", "seed": 0}
    shards = [load_split("train", tiny_model("avg"), "digest", 28, {"partition-id": i, "num-partitions": 4}, run_config)
              for i in range(4)]
    assert sorted(np.concatenate([s.indices for s in shards]).tolist()) == list(range(40))
    assert all(s.num_examples == 10 and not s.from_cache and s.source.startswith(str(path)) for s in shards)
    with pytest.raises(SiteError, match="no test data set") as err:
        load_split("test", tiny_model("avg"), "digest", 28, {"partition-id": 0, "num-partitions": 4}, run_config)
    assert err.value.code == "no_test_split"


def test_a_test_split_that_is_the_training_data_is_refused(tmp_path):
    train = tmp_path / "train.npz"
    np.savez(train, images=uint8_images(12), labels=np.arange(12) % 10)
    (tmp_path / "copy.npz").write_bytes(train.read_bytes())
    (tmp_path / "link.npz").symlink_to(train)
    for test in ("train.npz", "copy.npz", "link.npz"):
        node = {"site-id": "a", "data-path": str(train), "test-data-path": str(tmp_path / test)}
        with pytest.raises(SiteError) as err:
            load_split("test", tiny_model("avg"), "digest", 28, node, {})
        assert err.value.code == "test_is_training_data", test
    other = tmp_path / "test.npz"
    np.savez(other, images=uint8_images(12, seed=1), labels=np.arange(12) % 10)
    node = {"site-id": "a", "data-path": str(train), "test-data-path": str(other)}
    assert load_split("test", tiny_model("avg"), "digest", 28, node, {}).num_examples == 12
