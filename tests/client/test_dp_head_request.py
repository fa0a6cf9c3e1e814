"""Parsing a DP head request (client/dp_head.py): refusals come before any data is read."""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict

from client import dp_head
from client.site import SiteError
from tangent.exact_head import dp


def test_no_head_share_means_no_head():
    assert dp_head.head_request(RecordDict({}), {"dp": True, "dp-epsilon": 3.0}) is None
    assert dp_head.head_request(RecordDict({}), {"dp": True, "dp-epsilon": 3.0, "dp-head-share": 0.0}) is None


def test_a_request_carries_the_public_transform_and_the_heads_share():
    centre = np.linspace(0, 1, 5)
    content = RecordDict({dp_head.CENTRE_RECORD: ArrayRecord({"centre": Array(centre)})})
    request = dp_head.head_request(content, {"dp-head-share": 0.9, "dp-head-dim": 8, "dp-head-seed": 3})
    assert request.share == 0.9 and request.weights == dp_head.DEFAULT_WEIGHTS
    assert request.transform.projection_dim == 8 and request.transform.seed == 3
    np.testing.assert_array_equal(request.transform.centre, centre)
    # its ε alone is its share of the contribution's μ², below the contribution's ε
    companion = request.companion(3.0, 1e-5)
    assert companion.epsilon == request.epsilon(3.0, 1e-5) == dp.head_epsilon(3.0, 1e-5, 0.9) < 3.0
    assert companion.noise_multiplier == dp.Allocation.from_weights(companion.epsilon, 1e-5, request.weights).sigma


@pytest.mark.parametrize("config", [
    {"dp-head-share": -0.1},
    {"dp-head-share": 1.0},  # DP-TAFT would get nothing
    {"dp-head-share": float("nan")},
    {"dp-head-share": "x"},
    {"dp-head-share": 0.5, "dp-head-dim": -3},
    {"dp-head-share": 0.5, "dp-head-weights": "0.5,0.5,0,0"},  # counts unpaid
    {"dp-head-share": 0.5, "dp-head-weights": "0.2,0.2,0.2"},
])
def test_bad_requests_are_refused(config):
    with pytest.raises(SiteError) as err:
        dp_head.head_request(RecordDict({}), config)
    assert err.value.code == "bad_request"


def test_a_non_finite_centre_is_refused():
    content = RecordDict({dp_head.CENTRE_RECORD: ArrayRecord({"centre": Array(np.array([0.0, np.nan]))})})
    with pytest.raises(SiteError):
        dp_head.head_request(content, {"dp-head-share": 0.5})
