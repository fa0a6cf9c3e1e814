"""Signed withdrawal requests: good / bad signature / replay / stale / unknown site."""
import datetime as dt
import json

import pytest

from deploy.pki import create_site_key
from server.withdrawal import (
    NonceStore,
    SiteRegistry,
    WithdrawalRefused,
    apply_withdrawal,
    create_request,
    load_private_key,
)


class FakeLedger:
    def __init__(self, sites):
        self._sites = list(sites)
        self.removed = []

    def sites(self):
        return list(self._sites)

    def remove(self, site_id, reason=""):
        if site_id not in self._sites:
            return False
        self._sites.remove(site_id)
        self.removed.append((site_id, reason))
        return True


@pytest.fixture
def fed(tmp_path):
    keys = tmp_path / "keys"
    registry = {"sites": {}}
    for site in ("1", "2", "3"):
        _, pub = create_site_key(keys, site)
        registry["sites"][site] = {"public_key": f"keys/{pub.name}"}
    _, admin_pub = create_site_key(keys, "admin")
    registry["admin"] = {"public_key": f"keys/{admin_pub.name}"}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    key = lambda s: load_private_key(keys / f"site-{s}.key")  # noqa: E731
    store = NonceStore(tmp_path / "ledger.sqlite.withdrawals.sqlite")
    yield key, SiteRegistry(tmp_path / "registry.json"), store, FakeLedger(["1", "2", "3"])
    store.close()


def test_good_request_removes_site(fed):
    key, registry, store, ledger = fed
    doc = create_request("2", key("2"), reason="consent withdrawn")
    req = apply_withdrawal(json.loads(json.dumps(doc)), ledger, registry, store)
    assert req.site_id == "2" and ledger.sites() == ["1", "3"]
    assert "consent withdrawn" in ledger.removed[0][1]
    assert [d["accepted"] for d in store.decisions()] == [1]


def test_admin_key_may_withdraw_any_site(fed):
    key, registry, store, ledger = fed
    apply_withdrawal(create_request("3", key("admin"), "court order", signer="admin"), ledger, registry, store)
    assert ledger.sites() == ["1", "2"]


def _refused(fed, doc, match):
    _, registry, store, ledger = fed
    before = ledger.sites()
    with pytest.raises(WithdrawalRefused, match=match):
        apply_withdrawal(doc, ledger, registry, store)
    assert ledger.sites() == before and not ledger.removed
    assert store.decisions()[-1]["accepted"] == 0


def test_signed_by_another_site_is_refused(fed):
    key = fed[0]
    _refused(fed, create_request("2", key("1"), "spoof"), "bad signature")


def test_tampered_payload_is_refused(fed):
    key = fed[0]
    doc = create_request("2", key("2"), "mine")
    doc["payload"]["site_id"] = "1"
    _refused(fed, doc, "bad signature")


def test_unsigned_and_garbage_signature_are_refused(fed):
    key = fed[0]
    doc = create_request("2", key("2"), "x")
    _refused(fed, {"payload": doc["payload"]}, "unsigned")
    _refused(fed, {**doc, "signature": "!!!"}, "malformed signature")
    _refused(fed, {**doc, "signature": "AAAA"}, "bad signature")


def test_site_cannot_sign_as_admin(fed):
    key = fed[0]
    _refused(fed, create_request("3", key("2"), "x", signer="admin"), "bad signature")


def test_replay_is_refused_even_from_a_new_store(fed, tmp_path):
    key, registry, store, ledger = fed
    doc = create_request("1", key("1"), "leaving")
    apply_withdrawal(doc, ledger, registry, store)
    ledger._sites.append("1")  # the site rejoined; the old request must not remove it again
    store.close()
    reopened = NonceStore(store.path)  # nonces persist across restarts
    with pytest.raises(WithdrawalRefused, match="replayed"):
        apply_withdrawal(doc, ledger, registry, reopened)
    assert "1" in ledger.sites()
    reopened.close()


def test_stale_and_future_requests_are_refused(fed):
    key = fed[0]
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    _refused(fed, create_request("1", key("1"), "late", now=old), "stale")
    future = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    _refused(fed, create_request("1", key("1"), "early", now=future), "future")


def test_unknown_site_is_refused(fed, tmp_path):
    _, pub = create_site_key(tmp_path / "keys", "9")
    stranger = load_private_key(tmp_path / "keys" / "site-9.key")
    _refused(fed, create_request("9", stranger, "who am I"), "unknown site")


def test_site_not_in_ledger_is_refused(fed):
    key, registry, store, ledger = fed
    ledger._sites.remove("3")
    with pytest.raises(WithdrawalRefused, match="no active contribution"):
        apply_withdrawal(create_request("3", key("3"), "x"), ledger, registry, store)


def test_apply_file_on_a_real_ledger(tmp_path):
    import numpy as np

    from server.ledger import Ledger
    from server.withdrawal import apply_withdrawal_file, nonce_store_path

    keys = tmp_path / "keys"
    registry = {"sites": {}}
    rng = np.random.default_rng(0)
    deltas = {s: {"head.weight": rng.normal(size=(3, 4)).astype(np.float32)} for s in ("1", "2", "3")}
    for s in deltas:
        registry["sites"][s] = {"public_key": str(create_site_key(keys, s)[1])}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        for s, d in deltas.items():
            ledger.add(s, d, num_examples=10 * int(s))
    with Ledger.open(tmp_path / "fresh.sqlite") as fresh:
        for s in ("1", "3"):
            fresh.add(s, deltas[s], num_examples=10 * int(s))
        expected = fresh.composed_arrays()

    bad = create_request("2", load_private_key(keys / "site-1.key"), "spoof")
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(WithdrawalRefused):
        apply_withdrawal_file(tmp_path / "bad.json", tmp_path / "ledger.sqlite", tmp_path / "registry.json")
    good = create_request("2", load_private_key(keys / "site-2.key"), "leaving")
    (tmp_path / "good.json").write_text(json.dumps(good))
    apply_withdrawal_file(tmp_path / "good.json", tmp_path / "ledger.sqlite", tmp_path / "registry.json")

    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        ledger.verify()
        assert len(ledger.contributions(status="active")) == 2
        got = ledger.composed_arrays()
    assert got.keys() == expected.keys()
    assert all(got[k].tobytes() == expected[k].tobytes() for k in got)
    assert nonce_store_path(tmp_path / "ledger.sqlite").exists()


def test_unlearning_run_applies_good_requests_and_reports_refusals(tmp_path):
    """server_app's unlearning path on a real ledger: the good request removes its site, a forged,
    an unreadable and a replayed one change nothing and are reported with their reason."""
    import numpy as np

    from server.ledger import Ledger
    from server.server_app import _apply_withdrawals
    from server.withdrawal import load_private_key

    keys = tmp_path / "keys"
    registry = {"sites": {}}
    for site in ("1", "2", "rogue"):
        _, pub = create_site_key(keys, site)
        if site != "rogue":
            registry["sites"][site] = {"public_key": f"keys/{pub.name}"}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    good = create_request("2", load_private_key(keys / "site-2.key"), "leaving")
    forged = create_request("1", load_private_key(keys / "site-rogue.key"), "forged")
    for name, doc in (("good.json", good), ("forged.json", forged)):
        (tmp_path / name).write_text(json.dumps(doc))
    (tmp_path / "garbage.json").write_text("{not json")
    ledger_path = tmp_path / "ledger.sqlite"
    rng = np.random.default_rng(0)
    with Ledger.open(ledger_path) as ledger:
        for site in ("1", "2"):
            ledger.add(site, {"w": rng.standard_normal(4).astype(np.float32)}, 10)
        requests = [str(tmp_path / n) for n in ("forged.json", "good.json", "garbage.json", "good.json")]
        decisions = _apply_withdrawals(ledger, requests, str(tmp_path / "registry.json"), ledger_path)
        assert [d["accepted"] for d in decisions] == [False, True, False, False]
        assert "bad signature" in decisions[0]["detail"] and decisions[0]["site_id"] == "1"
        assert "cannot read" in decisions[2]["detail"] and "replayed" in decisions[3]["detail"]
        assert [c.site_id for c in ledger.contributions(status="active")] == ["1"]
        ledger.verify()


def test_cli_verify_refuses_an_unreadable_request(tmp_path, capsys):
    from deploy.withdraw import main

    bad = tmp_path / "w.json"
    bad.write_text("{")
    assert main(["verify", str(bad), "--registry", str(tmp_path / "registry.json")]) == 1
    assert "REFUSED: cannot read request" in capsys.readouterr().err
