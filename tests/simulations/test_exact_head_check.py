"""The driver's exact-head checks (simulations/exact_head_check.py) on a real stats ledger filled
with what the real sites compute (client.stats on client.site's simulated partitions of an .npz
of real Fashion-MNIST images, the real pretrained ViT-S/14 at img 28, no token cache): the checks
say True for an honest federation and False when one site's statistics miss a row."""
from __future__ import annotations

import numpy as np
import pytest

from client.site import load_split
from client.stats import site_statistics
from simulations.exact_head_check import central_check, removal_check
from tangent.exact_head.features import FeatureSpec
from tangent.protocol.spec import ModelSpec, fresh_model

pytestmark = pytest.mark.slow

SPEC = ModelSpec(img_size=28, reinit=False)
FEATURES = FeatureSpec(pieces=("final_cls", "input_mean"), random_features=16, random_seed=2)
SITES = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tangent.data.sets import load_fashion_mnist
    from tangent.exact_head.features import FeatureExtractor

    root = tmp_path_factory.mktemp("world")
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    np.savez(root / "train.npz", images=x[:90], labels=y[:90])
    np.savez(root / "test.npz", images=xt[:60], labels=yt[:60])
    config = {"dataset": str(root / "train.npz"), "test-dataset": str(root / "test.npz"),
              "partition": "iid", "seed": 0}
    model, digest = fresh_model(SPEC)
    extractor = FeatureExtractor.from_spec(SPEC, FEATURES)
    data = {str(i): load_split("train", model, digest, SPEC.img_size, {"partition-id": i, "num-partitions": SITES},
                               config) for i in range(SITES)}
    stats = {site: site_statistics(extractor, d, 10) for site, d in data.items()}
    card = {"stats-meta": stats["0"].meta(), "feature-spec": FEATURES.to_config(), "model-spec": SPEC.to_config(),
            "feature-digest": extractor.digest()}
    return {"root": root, "config": config, "stats": stats, "card": card, "digest": extractor.digest(),
            "data": data, "extractor": extractor,
            "sources": {"train": config["dataset"], "test": config["test-dataset"]}}


def fill_ledger(world, path, stats):
    from server.ledger import Ledger

    with Ledger.open(path, family="stats", model_card=world["card"]) as ledger:
        for site, s in stats.items():
            ledger.add(site, s.to_arrays(), num_examples=s.n, base_digest=world["digest"])


def test_an_honest_federation_equals_the_central_statistics_before_and_after_removal(world, tmp_path):
    from server.ledger import Ledger

    path = tmp_path / "exact_head.sqlite"
    fill_ledger(world, path, world["stats"])
    kept = tmp_path / "kept.npz"
    before = central_check(SPEC, FEATURES.to_config(), path, None, world["sources"], world["config"], SITES,
                           ["1"], kept)
    assert before["exact_head_equals_central"] is True and before["exact_head_rows"] == 90
    assert before["exact_head_sites"] == 3 and before["exact_head_test_images"] == 60
    assert 0.3 < before["accuracy_exact_head"] <= 1.0 and before["exact_head_lambda"] > 0
    assert before["exact_head_bytes_per_site"] == world["stats"]["0"].nbytes and kept.is_file()

    with Ledger.open(path, family="stats") as ledger:
        assert ledger.remove("1", "test")
    after = removal_check(SPEC, FEATURES.to_config(), path, None, world["sources"], world["config"], kept)
    assert after["exact_head_removal_equals_central"] and after["exact_head_removal_equals_fresh_ledger"]
    assert after["exact_head_removal_bit_identical"] is True and not kept.exists()
    assert after["accuracy_exact_head_after_removal"] > 0.2


def test_a_site_whose_statistics_miss_a_row_is_caught(world, tmp_path):
    """The check can fail: site 2 reports the (consistent) statistics of all but one of its rows."""
    stats = dict(world["stats"])
    stats["2"] = site_statistics(world["extractor"], world["data"]["2"], 10, exclude=[4])
    path = tmp_path / "exact_head.sqlite"
    fill_ledger(world, path, stats)
    out = central_check(SPEC, FEATURES.to_config(), path, None, world["sources"], world["config"], SITES, [],
                        tmp_path / "kept.npz")
    assert out["exact_head_equals_central"] is False
