"""End to end on 127.0.0.1, driven only through the deploy/ scripts an operator and the sites
would use: a SuperLink with TLS + SuperNode auth listening on loopback, the Caddy reverse proxy
in front of it (deploy.proxy), and three SuperNodes that know only the proxy's address.

- refusals: an unregistered key (and deploy.health names it by fingerprint), a plain-text
  (--insecure) SuperNode, a wrong CA;
- a Flower run with a tiny probe app (one round trip to the 3 sites; no ML);
- the real app, as an attacker and an operator would try it:
  1. training run: 3 sites + a 4th REGISTERED node whose node config claims site 2 -> refused
     (site_identity_mismatch), 3 contributions, the victim's untouched;
  2. an unlearning run with `remove-sites` (unsigned, not the operator) -> refused, ledger unchanged;
  3. site 3's key is revoked; an unlearning run with withdrawal requests: forged (another key),
     signed by an unregistered key, signed by the revoked key -> refused; site 2's own request
     and the operator's (admin key) removal of site 3 -> accepted; the remaining ledger is
     bit-identical to a fresh one holding site 1 only;
  4. a second training run while site 2's SuperNode keeps running: site 2 is not re-added.
  Skipped until server/server_app.py and client/client_app.py exist.

Every process started here is stopped by PID (with the SuperExec helpers Flower detaches).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from deploy.pki import create_ca, create_operator_key, create_site_key
from deploy.register import key_fingerprint
from tests.deploy.support import (
    REPO,
    Processes,
    free_port,
    online_node_ids,
    run,
    start_superlink_and_proxy,
    start_supernode,
    wait_for,
    write_probe_app,
)

pytestmark = pytest.mark.slow

SITES = ("1", "2", "3")
IMAGES_PER_SITE = 200


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    state, logs = root / "state", root / "logs"
    logs.mkdir()
    procs = Processes(logs)
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "TAFT_STATE_DIR": str(root / "state-root")}
    try:
        # sites make their keys (one extra key is never registered; site 4 is the impostor's)
        for site in (*SITES, "4", "rogue"):
            create_site_key(state / "keys", site)
        create_operator_key(state / "keys")

        # The one-time ONNX -> timm conversion (tens of seconds, shared through the TAFT cache dir)
        # is done here, not by four processes at once inside the timed training run.
        from tangent.model.pretrained import load_pretrained
        load_pretrained(img_size=28)

        # sites: a few hundred real Fashion-MNIST images each, made by the documented step
        out = run(["-m", "deploy.make_site_data", "--sites", *SITES, "--per-site", str(IMAGES_PER_SITE),
                   "--out", str(root / "data")], env=env)
        assert out.returncode == 0, out.stderr

        t0 = time.monotonic()
        ports = start_superlink_and_proxy(procs, state, env)
        superlink_start_s = time.monotonic() - t0

        for site in (*SITES, "4"):
            out = run(["-m", "deploy.register", "--site-id", site, "--max-examples", str(IMAGES_PER_SITE),
                       "--state", str(state)], env=env)
            assert out.returncode == 0, out.stdout + out.stderr
        out = run(["-m", "deploy.register", "--admin", "--state", str(state)], env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        registry = json.loads((state / "registry.json").read_text())
        node_ids = {s: str(registry["sites"][s]["node_id"]) for s in (*SITES, "4")}

        address = f"127.0.0.1:{ports['proxy']}"  # the sites know only the proxy
        for site in SITES:
            start_supernode(procs, root, state, site, address, root / "data" / f"site-{site}" / "site.npz", env)
        wait_for(lambda: {node_ids[s] for s in SITES} <= online_node_ids(state), 120, "3 SuperNodes online",
                 poll=1.0)
        yield {"root": root, "state": state, "ports": ports, "address": address, "ca": state / "certs" / "ca.crt",
               "procs": procs, "env": env, "node_ids": node_ids, "superlink_start_s": superlink_start_s}
    finally:
        procs.stop_all()


def test_health_reports_three_online_sites(federation):
    out = run(["-m", "deploy.health", "--state", str(federation["state"]), "--json"], env=federation["env"])
    report = json.loads(out.stdout)
    by_site = {s["site_id"]: s for s in report["sites"]}
    assert [by_site[s]["status"] for s in SITES] == ["online"] * 3, out.stdout
    assert by_site["1"]["fingerprint"].startswith("SHA256:")


def test_site_state_dir_is_private_and_outside_the_repo(federation):
    for site in SITES:
        path = federation["root"] / f"site-state-{site}"
        assert path.is_dir() and (path.stat().st_mode & 0o777) == 0o700
        assert not path.resolve().is_relative_to(REPO)


def _supernode(federation, name: str, extra: list[str], key: str = "rogue"):
    f = federation
    return run(["-m", "deploy.supernode", "--site-id", name, "--superlink", f["address"],
                "--root-certificates", str(f["ca"]), "--key", str(f["state"] / f"keys/site-{key}.key"),
                "--data-path", str(f["root"] / "data" / "site-1" / "site.npz"), "--runtime-port", str(free_port()),
                "--max-wait-time", "10", "--flwr-home", str(f["root"] / f"flwr-home-{name}"),
                "--state-dir", str(f["root"] / f"site-state-{name}"), *extra], env=f["env"])


def test_unregistered_key_is_refused_and_named_by_fingerprint(federation):
    out = _supernode(federation, "rogue", [])
    assert out.returncode != 0
    assert "not registered" in out.stderr, out.stdout + out.stderr
    assert "code: 2004" in out.stdout  # Flower's own refusal: activation failed
    health = run(["-m", "deploy.health", "--state", str(federation["state"]), "--json"], env=federation["env"])
    refused = json.loads(health.stdout)["refused_supernodes"]
    rogue = key_fingerprint(federation["state"] / "keys" / "site-rogue.key.pub")
    assert any(r["fingerprint"] == rogue and r["owner"] == "unregistered key" for r in refused), refused


def test_plaintext_supernode_is_refused(federation):
    out = _supernode(federation, "plain", ["--insecure"], key="1")
    assert out.returncode != 0
    assert "plain-text" in out.stderr, out.stdout + out.stderr


def test_wrong_ca_is_refused_before_starting(federation, tmp_path):
    create_ca(tmp_path / "other")
    f = dict(federation, ca=tmp_path / "other" / "ca.crt")
    out = _supernode(f, "wrongca", [], key="1")
    assert out.returncode == 2
    assert "not signed by the CA" in out.stderr


def test_probe_run_reaches_all_three_sites_through_the_proxy(federation):
    f = federation
    app = write_probe_app(f["root"] / "probe")
    out_file = f["root"] / "probe.json"
    env = {**f["env"], "PYTHONPATH": str(app) + os.pathsep + f["env"].get("PYTHONPATH", "")}
    t0 = time.monotonic()
    out = run(["-m", "deploy.submit", "--app", str(app), "--state", str(f["state"]), "--timeout", "240",
               "--run-config", f"out='{out_file}' num-sites=3"], env=env)
    wall = time.monotonic() - t0
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out_file.read_text())
    assert result["sites"] == list(SITES)
    print(f"\nprobe: SuperLink + proxy up in {f['superlink_start_s']:.1f} s; one round trip to 3 sites "
          f"through the proxy {result['round_trip_s']:.2f} s inside the ServerApp; submit-to-finished {wall:.1f} s")


# ----------------------------------------------------------------------------- the real app

def _apps_present() -> bool:
    return (REPO / "server" / "server_app.py").exists() and (REPO / "client" / "client_app.py").exists()


COMMON = "img-size=28 batch-size=32 eval-subset=500 site-registry='registry.json' ledger-path='ledger.sqlite'"


def _submit(f, run_config: str, timeout: int = 600):
    t0 = time.monotonic()
    out = run(["-m", "deploy.submit", "--app", str(REPO), "--state", str(f["state"]), "--timeout", str(timeout),
               "--progress-every", "30", "--run-config", f"{COMMON} {run_config}"], env=f["env"], timeout=timeout + 300)
    return out, time.monotonic() - t0


def _ledger(f):
    from server.ledger import Ledger

    return Ledger.open(f["state"] / "ledger.sqlite", create=False)


def _snapshot(f) -> dict:
    with _ledger(f) as ledger:
        active = ledger.contributions(status="active")
        return {"version": ledger.current_version().version,
                "active": {c.site_id: ledger.contribution_delta(c.id) for c in active},
                "count": {s: len([c for c in ledger.contributions() if c.site_id == s]) for s in SITES}}


def _same_deltas(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes() for k in a)


@pytest.fixture(scope="module")
def trained(federation):
    """Training run 1: the three sites plus an impostor (registered as site 4, claiming site 2)."""
    if not _apps_present():
        pytest.skip("server/server_app.py and client/client_app.py not there yet")
    f = federation
    # registered as site 4 (its key), but its node config declares site 2
    start_supernode(f["procs"], f["root"], f["state"], "2", f["address"],
                    f["root"] / "data" / "site-1" / "site.npz", f["env"], key="4", name="impostor")
    wait_for(lambda: f["node_ids"]["4"] in online_node_ids(f["state"]), 120, "the impostor online", poll=1.0)
    out, wall = _submit(f, "mode='train' epochs=1 min-nodes=4 report-path='reports/e2e-train-1.json'")
    f["procs"].stop("supernode-impostor")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "run " in out.stdout and "s] run" in out.stdout  # deploy.submit showed progress while waiting
    report = json.loads((f["state"] / "reports" / "e2e-train-1.json").read_text())
    (round_1,) = report["rounds"]
    print(f"\ntraining round with 3 sites + impostor ({IMAGES_PER_SITE} images each, img-size 28, 1 epoch): "
          f"round trip {round_1['train_round_trip_s']:.1f} s; {wall:.1f} s submit-to-finished")
    return {"report": report, "round": round_1, "after": _snapshot(f)}


def test_a_node_posing_as_another_site_is_refused(federation, trained):
    f, round_1 = federation, trained["round"]
    assert sorted(round_1["recorded"]) == list(SITES) and not round_1["replaced"]
    (impostor,) = [r for r in round_1["rejections"] if str(r["node_id"]) == f["node_ids"]["4"]]
    assert impostor["reason"] == "site_identity_mismatch" and "declared site 2" in impostor["detail"]
    # the victim holds exactly the one contribution its own node sent
    assert trained["after"]["count"]["2"] == 1 and set(trained["after"]["active"]) == set(SITES)
    health = run(["-m", "deploy.health", "--state", str(f["state"]), "--json"], env=f["env"])
    rejected = json.loads(health.stdout)["rejected_replies"]
    assert any(r["registered_site"] == "4" and r["fingerprint"] == key_fingerprint(f["state"] / "keys/site-4.key.pub")
               and r["reason"] == "site_identity_mismatch" for r in rejected), rejected


def test_unsigned_remove_sites_is_refused(federation, trained):
    f = federation
    before = _snapshot(f)
    out, _ = _submit(f, "mode='unlearn' remove-sites='1' report-path='reports/e2e-unsigned-removal.json'")
    after = _snapshot(f)
    assert after["version"] == before["version"] and set(after["active"]) == set(SITES)
    assert all(_same_deltas(before["active"][s], after["active"][s]) for s in SITES)
    report = json.loads((f["state"] / "reports" / "e2e-unsigned-removal.json").read_text())
    assert report["remove_sites_refused"]["sites"] == ["1"] and report["removed_sites"] == [], report


def test_withdrawals_revoked_and_unregistered_keys_refused_operator_and_site_accepted(federation, trained):
    from server.ledger import Ledger
    from server.trust.withdrawal import create_request, load_private_key

    f, state = federation, federation["state"]
    before = _snapshot(f)
    # revoke site 3 (its SuperNode stops first: a revoked key can no longer activate anyway)
    f["procs"].stop("supernode-3")
    out = run(["-m", "deploy.register", "--site-id", "3", "--unregister", "--state", str(state)], env=f["env"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads((state / "registry.json").read_text())["sites"]["3"]["revoked"] is True

    requests = state / "requests"
    requests.mkdir(exist_ok=True)
    key = lambda name: load_private_key(state / "keys" / name)  # noqa: E731
    documents = {
        "forged.json": create_request("2", key("site-rogue.key"), "forged"),           # wrong key for site 2
        "unregistered.json": create_request("rogue", key("site-rogue.key"), "who?"),   # no such site
        "revoked.json": create_request("3", key("site-3.key"), "revoked key"),         # site 3 was revoked
        "impostor-admin.json": create_request("1", key("site-4.key"), "not the operator", signer="admin"),
    }
    for name, doc in documents.items():
        (requests / name).write_text(json.dumps(doc))
    out = run(["-m", "deploy.withdraw", "create", "--site-id", "2", "--key", str(state / "keys/site-2.key"),
               "--reason", "e2e withdrawal", "--out", str(requests / "withdraw-2.json")], env=f["env"])
    assert out.returncode == 0, out.stderr
    out = run(["-m", "deploy.withdraw", "create", "--signer", "admin", "--key", str(state / "keys/operator.key"),
               "--site-id", "3", "--reason", "operator: key revoked", "--out", str(requests / "remove-3.json")],
              env=f["env"])
    assert out.returncode == 0, out.stderr

    # the refused ones leave the ledger as it is, also without Flower
    out = run(["-m", "deploy.withdraw", "apply", str(requests / "forged.json"), "--ledger", str(state / "ledger.sqlite"),
               "--registry", str(state / "registry.json")], env=f["env"])
    assert out.returncode == 1 and "REFUSED" in out.stderr
    assert _snapshot(f)["version"] == before["version"]

    names = ["forged.json", "unregistered.json", "revoked.json", "impostor-admin.json", "withdraw-2.json",
             "remove-3.json"]
    listed = ",".join(f"requests/{n}" for n in names)
    out, wall = _submit(f, f"mode='unlearn' withdrawal-requests='{listed}' report-path='reports/e2e-unlearn.json'")
    print(f"unlearning run (6 signed requests, 4 refused): {wall:.1f} s submit-to-finished")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((state / "reports" / "e2e-unlearn.json").read_text())
    decisions = {Path(w["request"]).name: w for w in report["withdrawals"]}
    for name in ("forged.json", "unregistered.json", "revoked.json", "impostor-admin.json"):
        assert not decisions[name]["accepted"], decisions[name]
    assert decisions["withdraw-2.json"]["accepted"] and decisions["remove-3.json"]["accepted"]
    assert sorted(report["removed_sites"]) == ["2", "3"] and report["withdrawals_refused"] == 4

    with _ledger(f) as ledger:
        ledger.verify()
        remaining = ledger.contributions(status="active")
        assert [c.site_id for c in remaining] == ["1"]
        assert {"2", "3"} <= set(ledger.withdrawn_sites())
        composed = ledger.composed_arrays()
        stored = ledger.contribution_delta(remaining[0].id)
        examples = remaining[0].num_examples
        settings = ledger.settings()
    with Ledger.open(f["root"] / "fresh.sqlite", weighting=settings.get("weighting")) as fresh:
        fresh.add("1", stored, examples)
        expected = fresh.composed_arrays()
    assert _same_deltas(composed, expected)


def test_a_withdrawn_site_that_keeps_running_is_not_readded(federation, trained):
    f = federation
    assert f["node_ids"]["2"] in online_node_ids(f["state"])  # site 2's SuperNode is still running
    out, wall = _submit(f, "mode='train' epochs=1 min-nodes=2 report-path='reports/e2e-train-2.json'")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((f["state"] / "reports" / "e2e-train-2.json").read_text())
    recorded = [s for r in report["rounds"] for s in r["recorded"]]
    assert "2" not in recorded and "3" not in recorded
    with _ledger(f) as ledger:
        assert [c.site_id for c in ledger.contributions(status="active")] == ["1"]
        assert "2" in ledger.withdrawn_sites()
    print(f"second training run (site 2 withdrawn but online, site 3 revoked): {wall:.1f} s submit-to-finished")
