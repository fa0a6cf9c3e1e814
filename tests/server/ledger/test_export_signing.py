"""Everything a consumer of an export relies on is signed: each edit below passed ``verify-export``
before the statement covered the whole manifest and every file's bytes, and fails now."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server import cli
from server.ledger import Ledger, LedgerCorrupt, export, verify_export
from server.ledger.audit import fingerprint, public_key_pem, sign_head
from tangent.serving import export_check
from tests.server.ledger.tampering import delta

SPEC = {"img-size": 56, "num-classes": 3}


@pytest.fixture
def exported(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        ledger.add("site-0", delta(rng), 10, epsilon=1.0, delta_dp=1e-5)
        ledger.add("site-1", delta(rng), 20, epsilon=2.0, delta_dp=1e-5)
        export(ledger, tmp_path / "export", model_spec=SPEC)
    return tmp_path / "export"


def edit_manifest(directory: Path, change) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def problems(directory: Path, **pin) -> list[str]:
    with pytest.raises(LedgerCorrupt) as caught:
        verify_export(directory, **pin)
    return caught.value.problems


def test_an_untouched_export_verifies_with_what_export_wrote(exported, capsys):
    key_file = exported / export_check.PUBLIC_KEY_FILE
    manifest = json.loads((exported / "manifest.json").read_text())
    assert verify_export(exported, key_file)["version"] == manifest["model_version"]
    assert verify_export(exported, fingerprint=manifest["public_key_fingerprint"])["version"] == manifest["model_version"]
    kept = exported.parent / "operator.pem"  # the operator's key, obtained apart from the export
    shutil.copy(key_file, kept)
    assert cli.main(["verify-export", str(exported), "--public-key", str(kept)]) == 0
    assert "note:" not in capsys.readouterr().out
    bare_hex = manifest["public_key_fingerprint"].split(":")[1].upper()
    assert cli.main(["verify-export", str(exported), "--fingerprint", bare_hex]) == 0
    assert cli.main(["verify-export", str(exported)]) == 0
    assert "not who signed it" in capsys.readouterr().out  # unpinned: integrity only, and it says so


def test_edited_privacy_claims_fail(exported):
    def claim_dp(m):
        m["privacy"]["site-1"]["epsilon"] = 0.1
        m["max_epsilon"] = 0.1
    edit_manifest(exported, claim_dp)
    assert any("manifest differs" in p for p in problems(exported))
    assert cli.main(["verify-export", str(exported)]) == 1


def test_an_edited_site_list_fails(exported):
    edit_manifest(exported, lambda m: m["sites"].pop())
    assert any("manifest differs" in p for p in problems(exported))


def test_deleting_the_statement_and_changing_the_model_spec_and_base_fails(exported):
    def strip(m):
        del m["statement"]
        m["model_spec"] = {**m["model_spec"], "img-size": 28}
        m["base_digest"] = "0" * 64
    edit_manifest(exported, strip)
    assert any("no signed statement" in p for p in problems(exported))


def test_a_tampered_model_file_fails(exported):
    path = exported / "composed_delta.safetensors"
    arrays = safetensors.numpy.load_file(path)
    arrays["head.bias"] = arrays["head.bias"] + np.float32(1e-3)
    safetensors.numpy.save_file(arrays, path)
    assert any("sha256 is not the signed one" in p for p in problems(exported))


def test_an_extra_field_or_a_renamed_file_fails(exported):
    edit_manifest(exported, lambda m: m.update(note="reviewed by the ethics board"))
    assert any("manifest differs" in p for p in problems(exported))


def test_a_resigned_export_passes_only_unpinned(exported, tmp_path):
    """Someone who rewrites the export and signs it with their own key, embedding that key: the
    embedded key proves integrity only; the pinned fingerprint refuses it."""
    genuine = json.loads((exported / "manifest.json").read_text())["public_key_fingerprint"]
    forged = tmp_path / "forged"
    shutil.copytree(exported, forged)
    attacker = Ed25519PrivateKey.generate()
    manifest = json.loads((forged / "manifest.json").read_text())
    manifest["privacy"]["site-1"]["epsilon"] = 0.1
    head = {**manifest["signed_head"]["head"], "public_key": fingerprint(attacker.public_key())}
    manifest["signed_head"] = {"head": head, "signature": sign_head(attacker, head)}
    manifest["public_key"] = public_key_pem(attacker.public_key())
    manifest["public_key_fingerprint"] = fingerprint(attacker.public_key())
    statement = {**manifest["statement"]["statement"], "manifest_sha256": export_check.manifest_digest(manifest)}
    manifest["statement"] = {"statement": statement, "signature": sign_head(attacker, statement)}
    (forged / "manifest.json").write_text(json.dumps(manifest))
    verify_export(forged)  # integrity only: consistent, and signed by *a* key
    assert any("not the pinned" in p for p in problems(forged, fingerprint=genuine))
    assert problems(forged, public_key=exported / export_check.PUBLIC_KEY_FILE)


def test_a_public_key_taken_from_the_export_itself_pins_nothing(exported, tmp_path, capsys):
    """The rewriter swaps public-key.pem for their own key and re-signs: `--public-key` pointing at
    the export's own public-key.pem checks the export against the key it carries — integrity, not
    authenticity — and must say so instead of reporting a pinned signer."""
    forged = tmp_path / "forged"
    shutil.copytree(exported, forged)
    attacker = Ed25519PrivateKey.generate()
    manifest = json.loads((forged / "manifest.json").read_text())
    head = {**manifest["signed_head"]["head"], "public_key": fingerprint(attacker.public_key())}
    manifest["signed_head"] = {"head": head, "signature": sign_head(attacker, head)}
    manifest["public_key"] = public_key_pem(attacker.public_key())
    manifest["public_key_fingerprint"] = fingerprint(attacker.public_key())
    statement = {**manifest["statement"]["statement"], "manifest_sha256": export_check.manifest_digest(manifest)}
    manifest["statement"] = {"statement": statement, "signature": sign_head(attacker, statement)}
    (forged / "manifest.json").write_text(json.dumps(manifest))
    (forged / export_check.PUBLIC_KEY_FILE).write_text(public_key_pem(attacker.public_key()))
    assert not export_check.verify_export(forged, public_key=forged / export_check.PUBLIC_KEY_FILE).pinned
    assert cli.main(["verify-export", str(forged), "--public-key", str(forged / export_check.PUBLIC_KEY_FILE)]) == 0
    assert "not who signed it" in capsys.readouterr().out
    # a copy of the genuine key kept outside the export pins the signer, and refuses the forgery
    kept = tmp_path / "operator.pem"
    shutil.copy(exported / export_check.PUBLIC_KEY_FILE, kept)
    assert export_check.verify_export(exported, public_key=kept).pinned
    assert problems(forged, public_key=kept)
