"""The site registry is the operator's signed statement: swapping two node ids (A's SuperNode then
counts as B), raising a cap or replacing the admin key in registry.json is refused by a
deployment's ServerApp; before the signature, the swapped file loaded and bound A's node to B."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy import register
from deploy.pki import create_operator_key, create_site_key
from server.trust.registry import (
    OPERATOR_FINGERPRINT_ENV, SiteRegistry, key_fingerprint, load_public_key, registry_signature_path,
)


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    """Sites A (node 101) and B (node 202) and the operator key, written by deploy.register's
    own functions (no SuperLink needed for these)."""
    monkeypatch.delenv(OPERATOR_FINGERPRINT_ENV, raising=False)
    state = tmp_path / "state"
    keys = state / "keys"
    data = register.read_registry(state)
    for site, node in (("A", 101), ("B", 202)):
        _, pub = create_site_key(keys, site)
        fp = key_fingerprint(load_public_key(pub))
        register.record_site(data, site, f"keys/{pub.name}", fp, node, 100, None)
    register.write_registry(state, data)
    assert not registry_signature_path(register.registry_path(state)).exists()  # no operator yet: unsigned
    _, operator_pub = create_operator_key(keys)
    register.register_admin(state, operator_pub)
    return state


def edit(state: Path, change) -> None:
    path = register.registry_path(state)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def test_the_signed_registry_loads_and_binds_nodes(state):
    registry = SiteRegistry(register.registry_path(state), signed=True)
    assert registry.site_for_node(101) == "A" and registry.site_for_node(202) == "B"
    assert registry.signed_by == key_fingerprint(load_public_key(state / "keys" / "operator.key.pub"))


def swap_nodes(data):
    data["sites"]["A"]["node_id"], data["sites"]["B"]["node_id"] = data["sites"]["B"]["node_id"], data["sites"]["A"]["node_id"]


def test_swapped_node_ids_are_refused(state):
    edit(state, swap_nodes)
    assert SiteRegistry(register.registry_path(state)).site_for_node(101) == "B"  # what an unchecked load does
    with pytest.raises(ValueError, match="differs from the file the operator signed"):
        SiteRegistry(register.registry_path(state), signed=True)


def test_a_raised_cap_is_refused(state):
    edit(state, lambda d: d["sites"]["A"].update(max_examples=10**6))
    with pytest.raises(ValueError, match="differs from the file the operator signed"):
        SiteRegistry(register.registry_path(state), signed=True)


def test_an_unsigned_registry_is_refused(state):
    registry_signature_path(register.registry_path(state)).unlink()
    with pytest.raises(ValueError, match="is not signed"):
        SiteRegistry(register.registry_path(state), signed=True)


def test_a_resigned_registry_with_another_admin_key_passes_only_unpinned(state, tmp_path, monkeypatch):
    """A state-dir writer who makes their own 'operator' key, swaps it in and re-signs."""
    genuine = key_fingerprint(load_public_key(state / "keys" / "operator.key.pub"))
    rogue_key, rogue_pub = create_operator_key(tmp_path / "rogue")
    edit(state, swap_nodes)
    edit(state, lambda d: d.update(admin={"public_key": str(rogue_pub), "fingerprint": key_fingerprint(load_public_key(rogue_pub))}))
    register.sign(state, rogue_key)
    SiteRegistry(register.registry_path(state), signed=True)  # the signature alone: the residual risk
    monkeypatch.setenv(OPERATOR_FINGERPRINT_ENV, genuine)
    with pytest.raises(ValueError, match="not the pinned operator key"):
        SiteRegistry(register.registry_path(state), signed=True)


def test_every_write_by_deploy_register_is_signed_again(state):
    data = register.read_registry(state)
    data["sites"]["B"]["revoked"] = True
    register.write_registry(state, data)
    assert SiteRegistry(register.registry_path(state), signed=True).is_revoked("B")
    assert register.main(["--sign", "--state", str(state)]) == 0


def test_a_registry_or_signature_behind_a_symlink_is_refused(state, tmp_path):
    path = register.registry_path(state)
    moved = tmp_path / "elsewhere.json"
    path.rename(moved)
    path.symlink_to(moved)
    with pytest.raises(ValueError, match="symbolic link"):
        SiteRegistry(path)


def test_a_deployment_serverapp_refuses_the_swapped_registry_before_anything_runs(state):
    from flwr.app import Context, RecordDict

    from server.server_app import main

    edit(state, swap_nodes)
    context = Context(run_id=8, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"mode": "train", "state-dir": str(state), "site-registry": "registry.json"})
    with pytest.raises(ValueError, match="differs from the file the operator signed"):
        main(None, context)
    report = json.loads((state / "reports" / "train-8.json").read_text())
    assert "operator signed" in report["error"]["message"]
    assert not (state / "ledger.sqlite").exists()  # refused before any ledger was opened


def test_with_the_operator_key_pinned_the_withdrawal_tool_refuses_a_key_swapped_into_the_registry(state, tmp_path,
                                                                                                  monkeypatch, capsys):
    """A state-dir writer puts their own key in as site A's and signs a withdrawal of A with it."""
    from deploy.withdraw import main as withdraw
    from server.trust.withdrawal import create_request, load_private_key

    rogue_key, rogue_pub = create_site_key(tmp_path / "rogue", "A")
    edit(state, lambda d: d["sites"]["A"].update(public_key=str(rogue_pub),
                                                 fingerprint=key_fingerprint(load_public_key(rogue_pub))))
    request = tmp_path / "withdraw-A.json"
    request.write_text(json.dumps(create_request("A", load_private_key(rogue_key), "not A's wish")))
    registry = str(register.registry_path(state))
    assert withdraw(["verify", str(request), "--registry", registry]) == 0  # unpinned: the tool believes the file
    monkeypatch.setenv(OPERATOR_FINGERPRINT_ENV, key_fingerprint(load_public_key(state / "keys" / "operator.key.pub")))
    with pytest.raises(ValueError, match="differs from the file the operator signed"):
        withdraw(["verify", str(request), "--registry", registry])
