"""The train request -> TrainConfig mapping of the ClientApp (client.task.train_config)."""
import pytest

from client.task import train_config
from tangent.protocol.config import RUN_DEFAULTS, ConfigError, TrainRequest


def test_every_training_field_comes_from_the_request():
    config = train_config(TrainRequest.parse({}))  # pyproject's defaults, not TrainConfig's
    assert (config.epochs, config.batch_size, config.lr, config.loss) == (
        RUN_DEFAULTS["epochs"], RUN_DEFAULTS["batch-size"], RUN_DEFAULTS["lr"], RUN_DEFAULTS["loss"])
    assert config.alpha == RUN_DEFAULTS["rsl-alpha"] and config.seed == RUN_DEFAULTS["seed"]


def test_guard_ridge_switches_the_short_schedule_guard_off_or_scales_it():
    assert train_config(TrainRequest.parse({"guard-ridge": 0.0})).guard_ridge == 0.0
    assert train_config(TrainRequest.parse({"guard-ridge": 3})).guard_ridge == 3.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="guard-ridge"):
            TrainRequest.parse({"guard-ridge": bad})


def test_radius_zero_means_no_projection():
    assert train_config(TrainRequest.parse({"radius": 0.0})).radius is None
    assert train_config(TrainRequest.parse({"radius": 2})).radius == 2.0
