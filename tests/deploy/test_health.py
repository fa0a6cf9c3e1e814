"""deploy.health names refused SuperNodes and rejected replies by site and key fingerprint."""
import json

from cryptography.hazmat.primitives import serialization

from deploy.health import refused_supernodes, rejected_replies, render
from deploy.pki import create_site_key
from deploy.register import key_fingerprint, read_registry, record_site, write_registry
from server.trust.withdrawal import load_public_key


def _pem(pub_path):
    return load_public_key(pub_path).public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)


def _state(tmp_path):
    for site in ("1", "2", "rogue"):
        create_site_key(tmp_path / "keys", site)
    registry = read_registry(tmp_path)
    for i, site in enumerate(("1", "2")):
        pub = tmp_path / "keys" / f"site-{site}.key.pub"
        record_site(registry, site, f"keys/{pub.name}", key_fingerprint(pub), 100 + i, 50, None)
    registry["sites"]["2"]["revoked"] = True
    write_registry(tmp_path, registry)
    return registry


def test_refused_supernodes_are_named_by_fingerprint(tmp_path):
    registry = _state(tmp_path)
    log = tmp_path / "superlink.log"
    lines = []
    for site in ("rogue", "rogue", "2"):
        # Flower's own wording (flwr/superlink/servicer/fleet/fleet_handlers.py, activate_node)
        pem = _pem(tmp_path / "keys" / f"site-{site}.key.pub")
        lines.append(f"ERROR : [/v1/fleet/activate-node][ApiError:2004] Attempted to register SuperNode with "
                     f"public key: {pem!r}, exception: No SuperNode found with the given public key.")
    log.write_text("\n".join(lines) + "\n")
    refused = refused_supernodes(log, registry)
    rogue = key_fingerprint(tmp_path / "keys" / "site-rogue.key.pub")
    assert refused[0] == {"fingerprint": rogue, "owner": "unregistered key", "attempts": 2,
                          "reason": "No SuperNode found with the given public key."}
    assert refused[1]["owner"] == "site 2 (revoked)"
    text = render({"superlink_error": None, "sites": [], "unknown_nodes": [], "refused_supernodes": refused,
                   "rejected_replies": [], "refused_withdrawals": [], "ledger": None})
    assert rogue in text and "BEGIN PUBLIC KEY" not in text


def test_rejected_replies_map_the_sender_to_its_registered_site(tmp_path):
    registry = _state(tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "train-1.json").write_text(json.dumps({"rounds": [{"rejections": [
        {"site_id": "1", "node_id": 100, "reason": "site_identity_mismatch",
         "detail": "node 100 is registered as site 1 but declared site 2"},
        {"site_id": "1", "node_id": 100, "reason": "site_identity_mismatch",
         "detail": "node 100 is registered as site 1 but declared site 2"},
        {"site_id": "9", "node_id": 555, "reason": "unknown_site", "detail": "…"}]}]}))
    (tmp_path / "reports" / "broken.json").write_text("{not json")  # ignored, not fatal
    rows = rejected_replies(tmp_path, registry)
    assert rows[0] == {"site_id": "1", "node_id": "100", "registered_site": "1",
                       "fingerprint": registry["sites"]["1"]["fingerprint"], "reason": "site_identity_mismatch",
                       "count": 2, "detail": "node 100 is registered as site 1 but declared site 2"}
    assert rows[1]["registered_site"] is None and rows[1]["reason"] == "unknown_site"
    text = render({"superlink_error": None, "sites": [], "unknown_nodes": [], "refused_supernodes": [],
                   "rejected_replies": rows, "refused_withdrawals": [], "ledger": None})
    assert "from node 100 = site 1 (key SHA256:" in text and "declared site 2" in text


def test_cli_without_a_superlink_reports_it_and_fails(tmp_path, capsys):
    from deploy.health import main

    _state(tmp_path)
    assert main(["--state", str(tmp_path), "--json", "--wait", "0.5"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["superlink_error"] and [s["site_id"] for s in report["sites"]] == ["1", "2"]


def test_a_rerun_sending_its_recorded_delta_again_shows_as_unchanged_not_rejected(tmp_path):
    import numpy as np

    from deploy.health import ledger_summary
    from server.ledger import Ledger

    registry = _state(tmp_path)
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        ledger.add("1", {"w": np.ones(3, np.float32)}, 10)
        ledger.add("2", {"w": np.full(3, 2, np.float32)}, 10)
        ledger.replace("2", {"w": np.full(3, 3, np.float32)}, 10)  # site 2's first Δ is replaced
        recorded = {c.site_id: c.delta_sha256 for c in ledger.contributions()}  # the last per site
        first_of_2 = next(c.delta_sha256 for c in ledger.contributions() if c.status == "replaced")
    node = {site: registry["sites"][site]["node_id"] for site in ("1", "2")}
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "train-2.json").write_text(json.dumps({"rounds": [{"rejections": [
        {"site_id": "1", "node_id": node["1"], "reason": "duplicate", "detail": f"Δ {recorded['1']} was recorded before"},
        {"site_id": "2", "node_id": node["2"], "reason": "duplicate", "detail": f"Δ {first_of_2} was recorded before"},
    ]}]}))
    text = render({"superlink_error": None, "sites": [], "unknown_nodes": [], "refused_supernodes": [],
                   "rejected_replies": rejected_replies(tmp_path, registry), "refused_withdrawals": [],
                   "ledger": ledger_summary(tmp_path / "ledger.sqlite")})
    assert "UNCHANGED reply from node" in text and "site 1" in text.split("UNCHANGED")[1].split("\n")[0]
    # a replayed *old* Δ is not the active one: still a rejection the operator should see
    assert any(line.startswith("REJECTED reply") and "= site 2" in line for line in text.splitlines())
