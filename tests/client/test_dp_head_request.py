"""Parsing a DP head request (client/dp_head.py): refusals come before any data is read."""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict

from client import dp_head
from client.policy import SitePolicy
from client.site import SiteError


def test_no_head_epsilon_means_no_head():
    assert dp_head.head_request(RecordDict({}), {"dp": True, "dp-epsilon": 3.0}, SitePolicy()) is None


def test_a_request_carries_the_public_transform():
    centre = np.linspace(0, 1, 5)
    content = RecordDict({dp_head.CENTRE_RECORD: ArrayRecord({"centre": Array(centre)})})
    request = dp_head.head_request(content, {"dp-head-epsilon": 2.0, "dp-head-dim": 8, "dp-head-seed": 3},
                                   SitePolicy())
    assert request.epsilon == 2.0 and request.weights == dp_head.DEFAULT_WEIGHTS
    assert request.transform.projection_dim == 8 and request.transform.seed == 3
    np.testing.assert_array_equal(request.transform.centre, centre)


@pytest.mark.parametrize("config, code", [
    ({"dp-head-epsilon": -1.0}, "bad_request"),
    ({"dp-head-epsilon": float("inf")}, "bad_request"),
    ({"dp-head-epsilon": 2.0, "dp-head-dim": -3}, "bad_request"),
    ({"dp-head-epsilon": 2.0, "dp-head-weights": "0.5,0.5,0,0"}, "bad_request"),  # counts unpaid
    ({"dp-head-epsilon": 2.0, "dp-head-weights": "0.2,0.2,0.2"}, "bad_request"),
    ({"dp-head-epsilon": 5.0}, "epsilon_too_large"),
])
def test_bad_requests_are_refused(config, code):
    with pytest.raises(SiteError) as err:
        dp_head.head_request(RecordDict({}), config, SitePolicy(max_epsilon=4.0))
    assert err.value.code == code


def test_a_non_finite_centre_is_refused():
    content = RecordDict({dp_head.CENTRE_RECORD: ArrayRecord({"centre": Array(np.array([0.0, np.nan]))})})
    with pytest.raises(SiteError):
        dp_head.head_request(content, {"dp-head-epsilon": 2.0}, SitePolicy())
