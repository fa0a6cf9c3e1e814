"""Both model families on a brought backbone, end to end without a SuperLink: the real ServerApp
(train, then unlearn one site) answered in process by the real ClientApp on three simulated
sites, with a small timm ViT from a weights file; then the driver's own exactness checks on the
ledgers (composed == ensemble, removal bit-identical, exact head == central statistics)."""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from client.client_app import app
from server import server_app
from simulations.driver import checks as driver_checks
from simulations.driver.config import pyproject_config
from simulations.exact_head_check import central_check, feature_config, removal_check, stats_ledger_path
from tests.backbone_files import IMG_SIZE, VARIANTS, save
from tests.server.local_grid import LocalGrid
from tests.simulations.own_data import pattern_images

pytestmark = [pytest.mark.usefixtures("flower_server_identity"), pytest.mark.slow]


class ClientAppGrid(LocalGrid):
    """Every message answered by the real ClientApp as simulated site ``partition-id``."""

    sites = (101, 102, 103)

    def __init__(self, run_config: dict):
        super().__init__()
        self.run_config = run_config

    def _answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        context = Context(run_id=1, node_id=node, state=RecordDict(), run_config=self.run_config,
                          node_config={"partition-id": self.sites.index(node), "num-partitions": len(self.sites)})
        return app(msg, context)


def run_main(grid, run_config: dict) -> None:
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))


@pytest.mark.parametrize("variant", ["registers", "distilled"])
def test_both_families_are_exact_on_a_brought_backbone(tmp_path, variant):
    from tangent.protocol.spec import ModelSpec

    for split, (num, seed) in {"train": (72, 1), "test": (30, 2)}.items():
        images, labels = pattern_images(num, 4, 20, seed=seed, rgb=True)
        np.savez(tmp_path / f"{split}.npz", images=images, labels=labels)
    weights = save(tmp_path / "weights", variant)
    config = pyproject_config() | {
        "backbone": VARIANTS[variant][0], "backbone-weights": str(weights), "img-size": 0, "reinit": False,
        "dataset": str(tmp_path / "train.npz"), "test-dataset": str(tmp_path / "test.npz"), "num-classes": 4,
        "epochs": 1, "min-nodes": 3, "fraction-evaluate": 0.0, "cache-dir": "", "federation-mode": "simulation",
        "state-dir": str(tmp_path), "ledger-path": str(tmp_path / "ledger.sqlite"), "central-evaluation": True,
        "train-subset": 0, "eval-subset": 0, "partition": "iid", "random-features": 32}
    spec = ModelSpec.from_config(config).resolved()
    assert spec.img_size == IMG_SIZE
    grid = ClientAppGrid(config)
    run_main(grid, config | {"mode": "train", "report-path": "train.json"})
    features = feature_config(config)
    sources = {"train": config["dataset"], "test": config["test-dataset"]}
    stats_path = stats_ledger_path(config, tmp_path)
    kept = tmp_path / "kept.npz"
    exact = central_check(spec, features, stats_path, None, sources, config, 3, ["1"], kept)
    assert exact["exact_head_equals_central"] is True and exact["exact_head_sites"] == 3
    assert exact["exact_head_num_features"] == 8 * 32 + 32  # four global + four quadrant pieces of d = 32
    ensemble = driver_checks.ensemble_check(spec, tmp_path / "ledger.sqlite", None, 0, 0, test_source=sources["test"])
    assert ensemble["max_rel_logit_diff_composed_vs_ensemble"] <= 1e-5 and len(ensemble["per_site"]) == 3

    run_main(grid, config | {"mode": "unlearn", "remove-sites": "1", "report-path": "unlearn.json"})
    assert driver_checks.removal_check(tmp_path / "ledger.sqlite")["removal_bit_identical"] is True
    assert removal_check(spec, features, stats_path, None, sources, config, kept)["exact_head_removal_bit_identical"]
