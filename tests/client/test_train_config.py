"""The train ConfigRecord -> TrainConfig mapping of the ClientApp (client.task.train_config)."""
import pytest

from client.task import TRAIN_KEYS, train_config
from server.config import TRAIN_CONFIG_KEYS


def test_the_server_forwards_every_key_the_site_reads():
    assert set(TRAIN_KEYS) <= set(TRAIN_CONFIG_KEYS)


def test_guard_ridge_switches_the_short_schedule_guard_off_or_scales_it():
    assert train_config({}).guard_ridge == 1.0  # the embedded default: on
    assert train_config({"guard-ridge": 0.0}).guard_ridge == 0.0
    assert train_config({"guard-ridge": 3}).guard_ridge == 3.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guard_ridge"):
            train_config({"guard-ridge": bad})
