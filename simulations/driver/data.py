"""The data sets and caches of a run: the data sets checked before anything starts, the trunk-token and
φ caches built once, and the test rows the driver's checks evaluate on.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from simulations.driver.processes import in_subprocess


def default_cache_dir() -> Path:
    from tangent.model.pretrained import cache_dir
    return cache_dir() / "features"


def inspect_data(train_source: str, test_source: str | None) -> dict:
    """Load and check the data sets before anything starts: class count, sizes (DataError if bad)."""
    from tangent.data.sets import check_test_matches, inspect_dataset

    train = inspect_dataset(train_source, "train")
    out = {"num_classes": train.num_classes, "train_examples": train.num_examples, "classes": train.classes}
    if test_source is not None:
        test = inspect_dataset(test_source, "test")
        check_test_matches(train, test)
        out["test_examples"] = test.num_examples
    return out


def prepare_data(args, defaults: dict, run_config: dict) -> dict:
    """Resolve --dataset/--test-dataset into ``run_config`` (absolute paths: the ServerApp and the
    Ray workers run elsewhere), check both data sets in a child process and set ``num-classes``
    from the data. Raises DataError (what is wrong, which file) before any process starts."""
    from tangent.data.sets import FASHION_MNIST, NO_DATASET, DataError, dataset_source

    for key, value in (("dataset", args.dataset), ("test-dataset", args.test_dataset)):
        if value is not None:
            run_config[key] = value
        value = str(run_config.get(key, defaults.get(key, "")) or "")
        if value and value not in (FASHION_MNIST, NO_DATASET):
            path = Path(value).expanduser().resolve()
            if not path.exists():
                raise DataError(f"{key} {value}: no such file or directory")
            run_config[key] = str(path)
    merged = defaults | run_config
    sources = {split: dataset_source(merged, split) for split in ("train", "test")}
    info = in_subprocess(inspect_data, sources["train"], sources["test"]) | {"sources": sources}
    if "num-classes" in run_config and int(run_config["num-classes"]) < info["num_classes"]:
        raise DataError(f"num-classes={run_config['num-classes']} but {sources['train']} has "
                        f"{info['num_classes']} classes")
    run_config.setdefault("num-classes", info["num_classes"])
    pool = min(args.train_subset or info["train_examples"], info["train_examples"])
    if pool < args.num_clients:
        raise DataError(f"{sources['train']}: {pool} training examples cannot be split over {args.num_clients} sites")
    return info


def build_caches(spec, directory: Path, sources: dict | None = None, device: str | None = None,
                 features: dict | None = None) -> tuple[float, bool]:
    """Trunk tokens of the train and test data sets, once, and with ``features`` (the exact head's
    feature spec keys) the φ cache of each next to them; returns (seconds, built anything).
    ``sources``: split -> data set source (None = no data for that split); default Fashion-MNIST.
    ``device``: where the trunk runs (a setting, see tangent.data.device; None = the CPU); the φ cache
    is computed on the CPU, as the sites compute φ when they have no cache."""
    from tangent.protocol.spec import build_model
    from tangent.data.token_cache import FeatureCache
    from tangent.data.sets import FASHION_MNIST, load_dataset

    start, built = time.perf_counter(), False
    model, _ = build_model(spec)
    sources = sources or {"train": FASHION_MNIST, "test": FASHION_MNIST}
    token_caches = {}
    for split, source in sources.items():
        if source is None:
            continue
        images, _ = load_dataset(source, split)
        cache = FeatureCache.build_or_open(model, images, img_size=spec.img_size, cache_dir=directory,
                                           batch_size=128, progress=True, device=device)
        built |= cache.built
        token_caches[split] = cache
        print(f"  {split}: {cache}")
    if features is not None:
        from simulations.exact_head_check import build_phi_caches, extractor_for

        del model  # the TAFT model's memory; the extractor loads the pretrained weights itself
        phi = build_phi_caches(extractor_for(spec, features), token_caches, directory)
        built |= any(cache.built for cache in phi.values())
    return time.perf_counter() - start, built


def evaluation_rows(spec, cache_dir: Path | None, test_source: str, pick, read: bool = False):
    """(model at w0, base digest, test inputs, labels tensor, from_cache) for the rows ``pick(N)``
    of the test set: cached trunk tokens when there is a cache (read into memory with ``read``),
    else the trunk run over the images."""
    import torch

    from tangent.data.token_cache import images_digest
    from tangent.data.sets import load_dataset
    from tangent.data.inputs import model_inputs
    from tangent.protocol.spec import fresh_model

    model, digest = fresh_model(spec)
    images, labels = load_dataset(test_source, "test")
    indices = pick(len(labels))
    if cache_dir is not None:
        inputs, from_cache = model_inputs(model, digest, images, indices, spec.img_size, cache_dir,
                                          data_digest=images_digest(images))
        if read:
            inputs = inputs[np.arange(len(indices))]
    else:
        from tangent.data.sets import preprocess
        with torch.no_grad():
            inputs = torch.cat([model.trunk(preprocess(images[indices[i:i + 256]], spec.img_size))
                                for i in range(0, len(indices), 256)])
        from_cache = True
    return model, digest, inputs, torch.as_tensor(labels[indices]), from_cache
