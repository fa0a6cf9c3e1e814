"""The site registry that deploy.register writes: version 2, one key one site ever,
--max-examples required, revocation instead of deletion, the operator key. The SuperLink side
(`flwr supernode register`) runs in tests/deploy/test_e2e.py; every refusal here happens before
the SuperLink is asked, so these run without one."""
import json
import stat

import pytest

from deploy.pki import create_operator_key, create_site_key
from deploy.register import (
    RegistryError,
    key_fingerprint,
    main,
    plan_site,
    read_registry,
    record_site,
    register_admin,
    registry_path,
    unregister_site,
    write_registry,
)
from server.trust.registry import SiteRegistry


@pytest.fixture
def state(tmp_path):
    for site in ("1", "2", "3"):
        create_site_key(tmp_path / "keys", site)
    create_operator_key(tmp_path / "keys")
    return tmp_path


def _pub(state, site):
    return state / "keys" / f"site-{site}.key.pub"


def _bind(state, site, key_site=None, node_id=None, max_examples=500):
    """What register_site records once the SuperLink accepted the key (node id from it)."""
    registry = read_registry(state)
    pub = _pub(state, key_site or site)
    fingerprint = key_fingerprint(pub)
    existing = plan_site(registry, site, fingerprint, max_examples)
    entry = record_site(registry, site, f"keys/{pub.name}", fingerprint, node_id or 1000 + int(site),
                        max_examples, existing)
    write_registry(state, registry)
    return entry


def test_version_2_entry_has_the_contract_fields(state):
    _bind(state, "3", max_examples=1200)
    data = json.loads(registry_path(state).read_text())
    assert data["version"] == 2
    entry = data["sites"]["3"]
    assert entry["fingerprint"] == key_fingerprint(_pub(state, "3")) and entry["fingerprint"].startswith("SHA256:")
    assert entry["node_id"] == 1003 and entry["max_examples"] == 1200 and entry["revoked"] is False
    assert entry["public_key"] == "keys/site-3.key.pub" and entry["registered_at"]
    assert stat.S_IMODE(registry_path(state).stat().st_mode) == 0o600
    # the server's reader resolves the relative key path against the registry's directory
    assert SiteRegistry(registry_path(state)).public_key("3") is not None


def test_one_key_cannot_serve_two_sites(state):
    _bind(state, "1")
    with pytest.raises(RegistryError, match="already registered for site 1"):
        _bind(state, "2", key_site="1")
    assert set(read_registry(state)["sites"]) == {"1"}


def test_a_revoked_key_never_comes_back_under_another_id(state):
    _bind(state, "1")
    registry = read_registry(state)
    registry["sites"]["1"]["node_id"] = None  # nothing to unregister at a SuperLink here
    write_registry(state, registry)
    unregister_site(state, "1")
    entry = read_registry(state)["sites"]["1"]
    assert entry["revoked"] is True and entry["fingerprint"]  # kept, not deleted
    with pytest.raises(RegistryError, match=r"site 1 \(revoked\)"):
        _bind(state, "7", key_site="1")
    with pytest.raises(RegistryError, match="revoked"):
        _bind(state, "1")  # nor under its own id
    # the revoked site may come back with a NEW key; the old one stays refused everywhere
    _bind(state, "1", key_site="2")
    assert read_registry(state)["sites"]["1"]["previous_fingerprints"] == [key_fingerprint(_pub(state, "1"))]
    with pytest.raises(RegistryError, match="already registered for site 1"):
        _bind(state, "9", key_site="1")


def test_a_registered_site_cannot_be_silently_rekeyed(state):
    _bind(state, "1")
    with pytest.raises(RegistryError, match="registered with another key"):
        _bind(state, "1", key_site="2")


def test_reregistering_the_same_key_keeps_node_and_updates_the_cap(state):
    first = _bind(state, "1", max_examples=100)
    again = _bind(state, "1", node_id=None, max_examples=300)
    assert again["registered_at"] == first["registered_at"] and again["max_examples"] == 300


@pytest.mark.parametrize("bad", [0, -1, 2**24 + 1, 1.5, True, "100"])
def test_max_examples_must_be_a_sane_integer(state, bad):
    with pytest.raises(RegistryError, match="max examples"):
        _bind(state, "1", max_examples=bad)


@pytest.mark.parametrize("bad", ["", "a b", "٣", "../x", "x" * 65])
def test_site_ids_follow_the_protocol_rule(state, bad):
    with pytest.raises(ValueError, match="site id"):
        plan_site(read_registry(state), bad, key_fingerprint(_pub(state, "1")), 10)


def test_operator_key_is_recorded_and_cannot_be_a_site_key(state):
    admin = register_admin(state, state / "keys" / "operator.key.pub")
    assert admin["public_key"] == "keys/operator.key.pub"
    assert SiteRegistry(registry_path(state)).admin_public_key() is not None
    with pytest.raises(RegistryError, match="operator"):
        plan_site(read_registry(state), "5", admin["fingerprint"], 10)  # operator key as a site key
    _bind(state, "1")
    with pytest.raises(RegistryError, match="site 1"):
        register_admin(state, _pub(state, "1"))


def test_cli_requires_max_examples_and_refuses_reuse_before_the_superlink(state, capsys):
    with pytest.raises(SystemExit):
        main(["--state", str(state), "--site-id", "1"])
    assert "--max-examples" in capsys.readouterr().err
    _bind(state, "1")
    before = registry_path(state).read_bytes()
    # no SuperLink is running: the refusal must come from the registry rule, not a failed call
    code = main(["--state", str(state), "--site-id", "2", "--max-examples", "10",
                 "--public-key", str(_pub(state, "1"))])
    assert code == 1 and "one key, one site" in capsys.readouterr().err
    assert registry_path(state).read_bytes() == before


def test_a_version_1_registry_is_upgraded(state):
    registry_path(state).write_text(json.dumps({"sites": {
        "1": {"public_key": "keys/site-1.key.pub", "fingerprint": key_fingerprint(_pub(state, "1")),
              "node_id": 5, "unregistered_at": "2026-01-01T00:00:00+00:00"}}}))
    data = read_registry(state)
    assert data["version"] == 2 and data["sites"]["1"]["revoked"] is True


def test_a_malformed_registry_is_a_clear_error(state):
    registry_path(state).write_text("{not json")
    with pytest.raises(RegistryError, match="not valid JSON"):
        read_registry(state)


def test_operator_state_dirs_are_created_private(tmp_path):
    from deploy.pki import create_ca

    state = tmp_path / "root" / "server"
    create_ca(state / "certs")
    for path in (tmp_path / "root", state, state / "certs"):
        assert path.stat().st_mode & 0o777 == 0o700, path
    assert (state / "certs" / "ca.key").stat().st_mode & 0o777 == 0o600
