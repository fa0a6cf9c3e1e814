"""Signed withdrawal requests: good / bad signature / replay / stale / unknown site."""
import datetime as dt
import json

import pytest

from deploy.pki import create_site_key
from server.trust.nonces import NonceStore
from server.trust.registry import SiteRegistry
from server.trust.withdrawal import (
    WithdrawalRefused,
    apply_withdrawal,
    create_request,
    load_private_key,
    read_request,
)
from tests.helpers import registry_entry, write_registry


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
    sites = {}
    for node, site in enumerate(("1", "2", "3"), start=101):
        _, pub = create_site_key(keys, site)
        sites[site] = registry_entry(pub, node_id=node)
    _, admin_pub = create_site_key(keys, "admin")
    write_registry(tmp_path / "registry.json", sites, admin_pub)
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
    with pytest.raises(WithdrawalRefused, match="already withdrawn"):
        apply_withdrawal(create_request("3", key("3"), "x"), ledger, registry, store)


def test_apply_file_on_a_real_ledger(tmp_path):
    import numpy as np

    from server.ledger import Ledger
    from server.trust.nonces import nonce_store_path
    from server.trust.withdrawal import apply_withdrawal_file

    keys = tmp_path / "keys"
    rng = np.random.default_rng(0)
    deltas = {s: {"head.weight": rng.normal(size=(3, 4)).astype(np.float32)} for s in ("1", "2", "3")}
    write_registry(tmp_path / "registry.json",
                   {s: registry_entry(create_site_key(keys, s)[1], base="abs") for s in deltas})
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
    from server.server_app import apply_withdrawals
    from server.trust.withdrawal import load_private_key

    keys = tmp_path / "keys"
    sites = {}
    for site in ("1", "2", "rogue"):
        _, pub = create_site_key(keys, site)
        if site != "rogue":
            sites[site] = registry_entry(pub)
    write_registry(tmp_path / "registry.json", sites)
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
        decisions = apply_withdrawals(ledger, requests, SiteRegistry(tmp_path / "registry.json"), ledger_path,
                                       tmp_path)
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


# ----------------------------------------------------------------------------- registry v2

def test_registry_lookups(fed):
    registry = fed[1]
    assert registry.sites() == ["1", "2", "3"]
    assert registry.site_for_node(102) == "2" and registry.site_for_node(999) is None
    assert registry.site_for_node(True) is None  # a bool is not a node id (True == 1)
    assert registry.entry("3")["node_id"] == 103 and registry.entry("9") is None
    assert registry.max_examples("1") == 1000 and registry.max_examples("9") is None
    assert registry.is_revoked("1") is False and registry.is_revoked("9") is False


def _registry_with(tmp_path, mutate) -> SiteRegistry:
    _, pub = create_site_key(tmp_path / "keys", "1")
    _, pub2 = create_site_key(tmp_path / "keys", "2")
    document = {"version": 2, "sites": {"1": registry_entry(pub, node_id=11), "2": registry_entry(pub2, node_id=12)}}
    mutate(document)
    (tmp_path / "registry.json").write_text(json.dumps(document) if isinstance(document, dict) else document)
    return SiteRegistry(tmp_path / "registry.json")


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("version"), "version"),
    (lambda d: d.update(version=1), "version"),
    (lambda d: d.update(sites=[]), "'sites' must be an object"),
    (lambda d: d["sites"].update({"²": d["sites"]["1"]}), "not valid"),
    (lambda d: d["sites"]["2"].update(fingerprint=d["sites"]["1"]["fingerprint"]), "share key"),
    (lambda d: d["sites"]["2"].update(node_id=11), "share node id"),
    (lambda d: d["sites"]["2"].update(node_id=True), "node_id"),
    (lambda d: d["sites"]["2"].pop("max_examples"), "max_examples"),
    (lambda d: d["sites"]["2"].update(max_examples=0), "max_examples"),
    (lambda d: d["sites"]["2"].update(revoked="no"), "revoked"),
    (lambda d: d["sites"]["2"].pop("public_key"), "public_key"),
    (lambda d: d.update(admin={"public_key": 5}), "admin"),
])
def test_malformed_registry_is_a_clear_value_error(tmp_path, mutate, match):
    with pytest.raises(ValueError, match=match):
        _registry_with(tmp_path, mutate)


def test_unreadable_registry_is_a_clear_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        SiteRegistry(tmp_path / "missing.json")
    (tmp_path / "r.json").write_bytes(b"\xff{")
    with pytest.raises(ValueError, match="not UTF-8 JSON"):
        SiteRegistry(tmp_path / "r.json")
    (tmp_path / "r.json").write_text("[" * 100_000)
    with pytest.raises(ValueError, match="not UTF-8 JSON"):
        SiteRegistry(tmp_path / "r.json")


def test_revoked_key_cannot_withdraw_but_the_operator_can(fed, tmp_path):
    key, registry, store, ledger = fed
    document = json.loads(registry.path.read_text())
    document["sites"]["2"]["revoked"] = True
    registry.path.write_text(json.dumps(document))
    registry = SiteRegistry(registry.path)
    with pytest.raises(WithdrawalRefused, match="revoked"):
        apply_withdrawal(create_request("2", key("2"), "after unregister"), ledger, registry, store)
    assert ledger.sites() == ["1", "2", "3"] and store.decisions()[-1]["accepted"] == 0
    apply_withdrawal(create_request("2", key("admin"), "operator removes it", signer="admin"), ledger, registry, store)
    assert ledger.sites() == ["1", "3"]


def test_a_swapped_key_file_is_refused(fed, tmp_path):
    """The registry pins each key's fingerprint: replacing the key file on disk does not let the new key sign."""
    key, registry, store, ledger = fed
    create_site_key(tmp_path / "keys", "2", force=True)  # a new key pair at the registered path
    with pytest.raises(WithdrawalRefused, match="fingerprint"):
        apply_withdrawal(create_request("2", key("2"), "x"), ledger, registry, store)
    assert ledger.sites() == ["1", "2", "3"]


def test_request_for_an_invalid_site_id_is_refused(fed):
    key = fed[0]
    _refused(fed, create_request("²", key("admin"), "x", signer="admin"), "not valid")


# ----------------------------------------------------------------------------- hostile request files

HOSTILE_FILES = {
    "not_utf8.json": b'{"payload": "\xff\xfe"}',
    "deep.json": b"[" * 100_000 + b"]" * 100_000,
    "deep_small.json": b'{"payload": {"a": {"b": {"c": {"d": 1}}}}}',
    "bigint.json": b'{"payload": ' + b"1" * 5000 + b"}",
    "nan.json": b'{"payload": NaN}',
    "huge.json": b'{"payload": "' + b"a" * (2 * 1024 * 1024) + b'"}',
    "empty.json": b"",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_FILES))
def test_read_request_refuses_hostile_files(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(HOSTILE_FILES[name])
    with pytest.raises(WithdrawalRefused, match="cannot read request"):
        read_request(path)


def test_read_request_refuses_what_is_not_a_regular_file(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo")  # opening it would block the run forever
    for path in (tmp_path / "fifo", tmp_path, tmp_path / "missing.json"):
        with pytest.raises(WithdrawalRefused, match="cannot read request"):
            read_request(path)


def test_unlearning_run_reports_every_hostile_file_and_path_and_still_applies_the_good_one(tmp_path):
    """Each bad file or path is one refusal in the report; none of them stops the good request."""
    import numpy as np

    from server.ledger import Ledger
    from server.server_app import apply_withdrawals

    state = tmp_path / "state"
    keys = state / "keys"
    sites = {s: registry_entry(create_site_key(keys, s)[1]) for s in ("1", "2")}
    write_registry(state / "registry.json", sites)
    for name, data in HOSTILE_FILES.items():
        (state / name).write_bytes(data)
    (tmp_path / "outside.json").write_text(json.dumps(create_request("1", load_private_key(keys / "site-1.key"), "x")))
    (state / "link.json").symlink_to(tmp_path / "outside.json")
    (state / "good.json").write_text(json.dumps(create_request("2", load_private_key(keys / "site-2.key"), "bye")))
    requests = sorted(HOSTILE_FILES) + ["../outside.json", str(tmp_path / "outside.json"), "link.json",
                                        "good.json"]
    ledger_path = state / "ledger.sqlite"
    rng = np.random.default_rng(0)
    with Ledger.open(ledger_path) as ledger:
        for site in ("1", "2"):
            ledger.add(site, {"w": rng.standard_normal(4).astype(np.float32)}, 10)
        decisions = apply_withdrawals(ledger, requests, SiteRegistry(state / "registry.json"), ledger_path,
                                       state.resolve())
        assert [d["accepted"] for d in decisions] == [False] * (len(requests) - 1) + [True]
        assert all("cannot read request" in d["detail"] for d in decisions[:len(HOSTILE_FILES)])
        assert all("outside the server's state directory" in d["detail"] for d in decisions[-4:-1])
        assert [c.site_id for c in ledger.contributions(status="active")] == ["1"]
        ledger.verify()
    json.dumps(decisions)  # the report section serialises


@pytest.mark.skipif(not hasattr(__import__("server.ledger", fromlist=["Ledger"]).Ledger, "withdrawn_sites"),
                    reason="needs the ledger's sticky withdrawal")
def test_a_withdrawal_sticks_on_a_real_ledger(fed, tmp_path):
    """A signed withdrawal marks the site withdrawn even before it contributed; a second one is
    refused, and the site's next contribution is refused by the ledger."""
    import numpy as np

    from server.ledger import Ledger, RejectedContribution

    key, registry, store, _ = fed
    with Ledger.open(tmp_path / "real.sqlite") as ledger:
        ledger.add("1", {"w": np.ones(3, np.float32)}, 10)
        apply_withdrawal(create_request("1", key("1"), "leaving"), ledger, registry, store)
        apply_withdrawal(create_request("2", key("2"), "never joining"), ledger, registry, store)
        assert sorted(ledger.withdrawn_sites()) == ["1", "2"]
        with pytest.raises(WithdrawalRefused, match="already withdrawn"):
            apply_withdrawal(create_request("1", key("1"), "again"), ledger, registry, store)
        for site in ("1", "2"):
            with pytest.raises(RejectedContribution) as err:
                ledger.add(site, {"w": np.full(3, 2.0, np.float32)}, 10)
            assert err.value.reason == "site_withdrawn"
        ledger.verify()
