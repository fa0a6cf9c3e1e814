"""A site's identity and local data, as the ClientApp sees them.

Two sources:

- **simulation**: the node config holds ``partition-id``/``num-partitions`` (set by Flower's
  simulation engine); the site's shard of the run config's data set (``dataset`` for train,
  ``test-dataset`` for evaluate; Fashion-MNIST by default, see ``tangent.data.sets.dataset_source``)
  is cut with the run config's partition scheme and seed (``tangent.data.partition``), optionally
  after a seeded ``train-subset``.
- **deployment**: the node config holds ``site-id`` and ``data-path`` (``.npz`` or ImageFolder,
  ``tangent.data.sets.load_site_data``), and optionally ``test-data-path`` for evaluation.

Inputs are cached trunk tokens whenever a cache directory is configured (node config
``cache-dir``, else run config ``cache-dir``): the cache covers the *whole* data set and a site
reads only its own rows through the memory map, so a Ray worker holds neither the data set nor
the trunk outputs in memory. In simulation the driver builds the cache before any client
starts; a client only builds one itself when none exists (one process builds, the rest wait).
Without a cache the site's images are preprocessed and go through the trunk at every step.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tangent.data.inputs import model_inputs
from tangent.protocol.config import ConfigError, NodeConfig, RunConfig, TrainRequest, as_run_config


#: the file in a site's state-dir holding the spec of the last exact-head train request it accepted
RUN_SPEC_FILE = "run-spec.json"


class SiteError(Exception):
    """A refusal the server must hear about: ``code`` is machine-readable, the text is for people."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def parse_node_config(node_config: Mapping[str, Any]) -> NodeConfig:
    """The node config, parsed by the one parser; refused (``bad_node_config``) naming the key."""
    try:
        return NodeConfig.parse(node_config)
    except ConfigError as err:
        raise SiteError("bad_node_config", f"node config {err}") from None


def parse_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """The run config as Flower hands it to the ClientApp, parsed as the server parses it
    (``bad_run_config`` naming the key)."""
    try:
        return RunConfig.parse(run_config)
    except ConfigError as err:
        raise SiteError("bad_run_config", f"run config {err}") from None


def parse_train_request(config: Mapping[str, Any]) -> TrainRequest:
    """A train message's ``config`` record (``bad_request`` naming the key)."""
    try:
        return TrainRequest.parse(config)
    except ConfigError as err:
        raise SiteError("bad_request", f"train request {err}") from None


@dataclass
class SiteData:
    inputs: Any  # TokenDataset (cached tokens) or float32 tensor [N, 3, H, W]
    labels: np.ndarray
    from_cache: bool
    data_digest: str  # of the whole data set the indices point into
    indices: np.ndarray  # rows of that data set this site holds
    source: str
    #: where caches of this data set live (token cache, φ cache), and the images digest they are
    #: keyed on; None without a cache directory
    cache_dir: Path | None = None
    images_digest: str | None = None

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    @property
    def shard_fingerprint(self) -> str:
        from tangent.data.partition import partition_fingerprint
        return partition_fingerprint(self.data_digest, self.indices)


def is_simulation(node_config: Mapping[str, Any]) -> bool:
    return "data-path" not in node_config and "partition-id" in node_config


def site_id(node_config: Mapping[str, Any]) -> str:
    """The stable id the ledger keys on: node config ``site-id``, else the partition id."""
    if "site-id" in node_config and str(node_config["site-id"]):
        return str(node_config["site-id"])
    if "partition-id" in node_config:
        return str(int(node_config["partition-id"]))
    raise SiteError("no_site_id", "node config has neither 'site-id' nor 'partition-id' "
                                  "(start the SuperNode with --node-config \"site-id=... data-path=...\")")


def cache_dir(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> Path | None:
    value = node_config.get("cache-dir") or as_run_config(run_config).cache_dir
    return Path(value).expanduser() if value else None


def load_split(split: str, model, base_digest: str, img_size: int, node_config: Mapping[str, Any],
               run_config: Mapping[str, Any], *, drop_unusable: bool = False) -> SiteData:
    """This site's ``"train"`` or ``"test"`` data as model inputs. Raises SiteError.

    ``drop_unusable`` (a DP site's training data): rows whose label the model has no class for
    are left out, one record at a time, instead of refusing the whole data set. Whether such a
    row exists then changes nothing the server sees but the DP mechanism's output, which its
    (ε, δ) covers; a refusal would tell the server that one record exists, for free.
    """
    directory = cache_dir(node_config, run_config)
    if is_simulation(node_config):
        return _simulated(split, model, base_digest, img_size, node_config, run_config, directory)
    key = "data-path" if split == "train" else "test-data-path"
    if key not in node_config or not str(node_config[key]):
        if split == "train":
            raise SiteError("missing_data", "node config has no 'data-path': this SuperNode has no "
                                            "local data (start it with --node-config \"data-path=...\")")
        raise SiteError("no_test_split", "node config has no 'test-data-path': no local test split to evaluate on")
    path = Path(str(node_config[key])).expanduser()
    if split == "test":
        _check_not_training_data(path, node_config)
    return _site_file(path, key, model, base_digest, img_size, directory, drop_unusable=drop_unusable)


def _check_not_training_data(test_path: Path, node_config: Mapping[str, Any]) -> None:
    """Refuse a test split that is the training data: the same file, or the same rows and labels
    under another name (by data set digest). Metrics on it would be training metrics."""
    from tangent.data.sets import DataError, dataset_digest, load_site_data

    if "data-path" not in node_config or not str(node_config["data-path"]):
        return
    train_path = Path(str(node_config["data-path"])).expanduser()
    if not (train_path.exists() and test_path.exists()):
        return  # the split that is read reports its own absence
    same = train_path.resolve() == test_path.resolve()
    if not same:
        try:
            same = dataset_digest(*load_site_data(train_path)) == dataset_digest(*load_site_data(test_path))
        except DataError:
            return  # the split that is read reports its own problem
    if same:
        raise SiteError("test_is_training_data", f"test-data-path {test_path} holds the training data "
                                                 f"(data-path {train_path}): refusing to evaluate on it")


def _site_file(path: Path, key: str, model, base_digest: str, img_size: int,
               directory: Path | None, *, drop_unusable: bool = False) -> SiteData:
    from tangent.data.token_cache import images_digest
    from tangent.data.sets import DataError, dataset_digest, load_site_data

    if not path.exists():
        raise SiteError("missing_data", f"{key} {path} does not exist on this site")
    try:
        images, labels = load_site_data(path)
    except DataError as err:
        raise SiteError("bad_data", f"{key} {path}: {err}") from err
    if drop_unusable:
        indices = np.flatnonzero(usable_labels(labels, model))
    else:
        _check_labels(labels, model, f"{key} {path}")
        indices = np.arange(len(labels))
    images_sha = images_digest(images) if directory is not None else None
    inputs, from_cache = model_inputs(model, base_digest, images, indices, img_size, directory,
                                 data_digest=images_sha)
    return SiteData(inputs, labels[indices], from_cache, dataset_digest(images, labels), indices,
                    str(path), directory, images_sha)


def usable_labels(labels: np.ndarray, model) -> np.ndarray:
    """Per row: does the model have a class for its label (0 <= label < num-classes)?"""
    return (labels >= 0) & (labels < int(model.options["num_classes"]))


def _check_labels(labels: np.ndarray, model, what: str) -> None:
    """Labels beyond the model's classes would fail deep inside the loss: refuse them here."""
    num_classes = int(model.options["num_classes"])
    if len(labels) and not usable_labels(labels, model).all():
        bad = int(labels.max()) if int(labels.max()) >= num_classes else int(labels.min())
        raise SiteError("bad_data", f"{what}: label {bad} but the model has {num_classes} "
                                    "classes (run config num-classes)")


# ---------------------------------------------------------------- simulation
_DATASETS: dict[tuple[str, str], tuple[np.ndarray, str, str]] = {}


def _dataset_index(source: str, split: str) -> tuple[np.ndarray, str, str]:
    """(labels, images digest, dataset digest) of a data set source's split, memoised per process.

    The images themselves are dropped: with a cache only the labels and the digests are needed.
    """
    if (source, split) not in _DATASETS:
        from tangent.data.token_cache import images_digest
        from tangent.data.sets import DataError, dataset_digest, load_dataset

        try:
            images, labels = load_dataset(source, split)
        except DataError as err:
            raise SiteError("bad_data", f"{split} data set {source}: {err}") from err
        _DATASETS[(source, split)] = (labels, images_digest(images), dataset_digest(images, labels))
    return _DATASETS[(source, split)]


def simulated_indices(split: str, labels: np.ndarray, partition_id: int, num_partitions: int,
                      run_config: Mapping[str, Any]) -> np.ndarray:
    """Rows of the split that simulated site ``partition_id`` holds (sorted).

    train: an optional seeded subset of ``train-subset`` rows, then the run config's partition
    scheme over the sites. test: the same scheme over the whole test split.
    """
    from tangent.data.partition import partition

    run = as_run_config(run_config)
    seed = run.seed
    pool = np.arange(len(labels))
    subset = run.train_subset if split == "train" else 0
    if 0 < subset < len(labels):
        pool = np.sort(np.random.default_rng(seed).choice(len(labels), subset, replace=False))
    shards = partition(labels[pool], num_partitions, scheme=run.partition, alpha=run.dirichlet_alpha, seed=seed)
    return pool[shards[partition_id]]


def _simulated(split, model, base_digest, img_size, node_config, run_config, directory) -> SiteData:
    from tangent.data.sets import dataset_source

    source = dataset_source(run_config, split)
    if source is None:
        raise SiteError("no_test_split", f"the run config names no test data set (dataset={run_config['dataset']!r}, "
                                         "test-dataset empty or 'none'): nothing to evaluate on")
    partition_id, num_partitions = int(node_config["partition-id"]), int(node_config["num-partitions"])
    labels, images_sha, data_digest = _dataset_index(source, split)
    _check_labels(labels, model, f"{split} data set {source}")
    indices = simulated_indices(split, labels, partition_id, num_partitions, run_config)
    inputs, from_cache = model_inputs(model, base_digest, None, indices, img_size, directory, data_digest=images_sha,
                                 split=split, source=source)
    return SiteData(inputs, labels[indices], from_cache, data_digest, indices,
                    f"{source}/{split} partition {partition_id}/{num_partitions}",
                    directory, images_sha if directory is not None else None)
