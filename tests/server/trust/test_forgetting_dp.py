"""Signed sample forgetting at a DP site (server/trust/forgetting.py, the DP head's ledger): the site's
fresh DP release of its remaining rows replaces its active release through the signed request, real
keys, real SQLite ledgers, real Flower-checked releases. The result is the ledger of the releases
that stay, bit for bit; the site's Δw is retracted; every forged, replayed or under-noised release
is refused, recorded, and changes neither ledger."""
from __future__ import annotations

import hashlib
import types

import numpy as np
import pytest

from deploy.pki import create_site_key
from server.trust.forgetting import ForgetRefused, apply_forget
from server.trust.nonces import NonceStore
from server.trust.registry import SiteRegistry
from server.trust.withdrawal import load_private_key
from tangent.exact_head.statistics import SufficientStats
from tangent.exact_head.stats_file import release_bytes, stats_bytes
from tangent.protocol.signed_requests import forget_request
from tests.helpers import registry_entry, write_registry
from tests.server.dp_head_replies import CONTRIBUTION, HEAD_EPSILON, SIZES, open_ledgers, release, replies, strategy

pytestmark = pytest.mark.usefixtures("flower_server_identity")

FRESH = "cd" * 16


@pytest.fixture
def fed(tmp_path):
    """Sites 1, 2, 3 registered, each with a DP-TAFT Δw and a DP head release in real ledgers."""
    keys = tmp_path / "keys"
    entries = {}
    for node, site in enumerate(SIZES, start=101):
        _, pub = create_site_key(keys, site)
        entries[site] = registry_entry(pub, node_id=node)
    write_registry(tmp_path / "registry.json", entries)
    ledgers = open_ledgers(tmp_path / "state")
    strategy(ledgers).aggregate_train(1, replies(list(SIZES)))
    nonces = NonceStore(tmp_path / "state" / "ledger.sqlite.withdrawals.sqlite")
    yield types.SimpleNamespace(tmp=tmp_path, key=lambda s: load_private_key(keys / f"site-{s}.key"),
                                registry=SiteRegistry(tmp_path / "registry.json"), ledgers=ledgers, nonces=nonces)
    nonces.close()
    for ledger in ledgers.all():
        ledger.close()


def active_sha(ledger, site: str) -> str:
    return ledger.contributions(site_id=site, status="active")[0].delta_sha256


def state(ledgers) -> tuple:
    return tuple((ledger.current_version(), ledger.verify().accumulator_sha256,
                  tuple((c.id, c.status) for c in ledger.contributions())) for ledger in ledgers.all())


def signed(fed, blob: bytes, *, site: str = "2", signer_site: str | None = None, forgotten: int = 5,
           replaces: str | None = None, delta_sha256: str | None = None, name: str = "release.safetensors"):
    path = fed.tmp / name
    path.write_bytes(blob)
    document = forget_request(site, fed.key(signer_site or site), forgotten=forgotten,
                              stats_sha256=hashlib.sha256(blob).hexdigest(),
                              stats_replaces=replaces or active_sha(fed.ledgers.stats, site), delta_sha256=delta_sha256)
    return document, path


def fresh_release(seed: int = 22, n: int = SIZES["2"] - 5, contribution: str = FRESH, **kwargs):
    noisy, meta = release(seed, n, contribution=contribution, **kwargs)
    return noisy, release_bytes(noisy.to_arrays(), meta)


def apply(fed, document, path, delta_file=None):
    return apply_forget(document, path, delta_file, fed.ledgers, fed.registry, fed.nonces)


def test_a_dp_sites_fresh_release_replaces_its_release_and_retracts_its_delta(fed):
    remaining, blob = fresh_release()
    document, path = signed(fed, blob)
    apply(fed, document, path)
    stats = fed.ledgers.stats
    # the ledger now sums exactly the releases that stay: the old release's noise left with it
    expected = SufficientStats.total([release(1, SIZES["1"])[0], remaining, release(3, SIZES["3"])[0]])
    assert stats.composed_stats() == expected
    (active,) = stats.contributions(site_id="2", status="active")
    assert active.epsilon == HEAD_EPSILON and active.extra["contribution_id"] == FRESH
    assert active.extra["forget-request"] == document["payload"]["nonce"] and active.extra["forgotten"] == 5
    # a DP-TAFT Δw is not retrained by a forget request: the site's Δw leaves until it contributes again
    assert fed.ledgers.delta.contributions(site_id="2", status="active") == []
    assert {c.site_id for c in fed.ledgers.delta.contributions(status="active")} == {"1", "3"}
    for ledger in fed.ledgers.all():
        ledger.verify()


def _attacks(fed):
    """(name, document, release file, Δw file) of requests the server must refuse."""
    _, blob = fresh_release()
    good, path = signed(fed, blob)
    apply(fed, good, path)  # accepted once; every attack below runs against the new state
    yield "replayed_request", good, path, None
    _, other = fresh_release(seed=23, contribution="ef" * 16)
    document, other_path = signed(fed, other, signer_site="1", name="forged.safetensors")  # site 1 signs for 2
    yield "forged_signature", document, other_path, None
    document, tampered = signed(fed, other, name="tampered.safetensors")
    tampered.write_bytes(fresh_release(seed=24, contribution="ef" * 16)[1])  # not the signed bytes
    yield "file_not_the_signed_one", document, tampered, None
    # the site's own earlier release (its training round's, contribution id "ab…"), re-sent under a new nonce
    yield ("replayed_release",) + signed(fed, release_bytes(*_arrays_meta(release(2, SIZES["2"]))),
                                         name="old.safetensors") + (None,)
    # the fresh one again under a new nonce: its contribution id is now in the ledger
    yield ("replayed_fresh_release",) + signed(fed, blob, name="again.safetensors") + (None,)
    yield ("less_noise",) + signed(fed, fresh_release(seed=25, contribution="12" * 16, epsilon=HEAD_EPSILON * 1.5)[1],
                                   name="greedy.safetensors") + (None,)
    yield ("stale",) + signed(fed, fresh_release(seed=26, contribution="34" * 16)[1], replaces="0" * 64,
                              name="stale.safetensors") + (None,)
    exact = SufficientStats.from_features(np.full((3, 4), 0.1), np.array([0, 1, 2]), 3, 1.0, 16)
    yield ("exact_statistics",) + signed(fed, stats_bytes(exact, "f" * 64), name="exact.safetensors") + (None,)
    delta_path = fed.tmp / "delta.safetensors"
    delta_path.write_bytes(b"retrained")
    yield ("signs_a_delta",) + signed(fed, fresh_release(seed=27, contribution="56" * 16)[1], name="d.safetensors",
                                      delta_sha256=hashlib.sha256(b"retrained").hexdigest()) + (delta_path,)


def _arrays_meta(noisy_meta):
    noisy, meta = noisy_meta
    assert meta["contribution-id"] == f"{CONTRIBUTION}:head"
    return noisy.to_arrays(), meta


def test_forged_replayed_and_under_noised_forget_releases_are_refused_and_change_nothing(fed):
    seen = []
    for name, document, path, delta_file in _attacks(fed):
        before = state(fed.ledgers)
        with pytest.raises(ForgetRefused) as err:
            apply(fed, document, path, delta_file)
        assert state(fed.ledgers) == before, name
        seen.append((name, str(err.value)))
    reasons = dict(seen)
    assert "replayed request" in reasons["replayed_request"]
    assert "signature" in reasons["forged_signature"] or "key" in reasons["forged_signature"]
    assert "sha256" in reasons["file_not_the_signed_one"]
    assert "replayed release" in reasons["replayed_release"]
    assert "replayed release" in reasons["replayed_fresh_release"]
    assert "stats_dp_epsilon" in reasons["less_noise"]
    assert "stale" in reasons["stale"]
    assert "DP release" in reasons["exact_statistics"]
    assert "Δw" in reasons["signs_a_delta"]
    decisions = fed.nonces.decisions()  # every decision logged: one acceptance, then every refusal
    assert [bool(d["accepted"]) for d in decisions] == [True] + [False] * len(seen)
