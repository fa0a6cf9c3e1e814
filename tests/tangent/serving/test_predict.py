"""taft-predict on real exports: a stats ledger's exact head and a delta ledger's composed Δ, both
rebuilt from the real pretrained backbone (ViT-S/14 at 56 px), a few Fashion-MNIST test images."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch

from server.ledger import Ledger
from server.ledger.export import export
from tangent.serving import predict as taft_predict
from tangent.data.sets import load_fashion_mnist, preprocess
from tangent.exact_head.statistics import SufficientStats, solve
from tangent.exact_head.features import FeatureExtractor, FeatureSpec
from tangent.protocol.spec import ModelSpec, build_model

MODEL_SPEC = ModelSpec(img_size=56, num_classes=10)
FEATURE_SPEC = FeatureSpec(pieces=("final_cls", "input_mean"), random_features=16, random_seed=1)
N = 40


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    images, labels = load_fashion_mnist("test")
    images, labels = images[:N], labels[:N].astype(np.int64)
    path = tmp_path_factory.mktemp("data") / "test.npz"
    np.savez(path, images=images, labels=labels)
    return path, images, labels


@pytest.fixture(scope="module")
def extractor():
    return FeatureExtractor.from_spec(MODEL_SPEC, FEATURE_SPEC)


@pytest.fixture(scope="module")
def head_export(tmp_path_factory, data, extractor):
    """Two sites' statistics in a stats ledger, exported; and φ of the images for the check."""
    _, images, labels = data
    phi = extractor.compute(preprocess(images, 56), tokens=False)
    sites = [SufficientStats.from_features(phi[:25], labels[:25], 10, FEATURE_SPEC.clip_norm, FEATURE_SPEC.frac_bits),
             SufficientStats.from_features(phi[25:], labels[25:], 10, FEATURE_SPEC.clip_norm, FEATURE_SPEC.frac_bits)]
    card = {"stats-meta": sites[0].meta(), "feature-spec": FEATURE_SPEC.to_config(),
            "model-spec": MODEL_SPEC.to_config(), "feature-digest": extractor.digest()}
    directory = tmp_path_factory.mktemp("head")
    with Ledger.open(directory / "stats.sqlite", family="stats", model_card=card) as ledger:
        for i, s in enumerate(sites):
            ledger.add(f"site-{i}", s.to_arrays(), num_examples=s.n, base_digest=card["feature-digest"])
        export(ledger, directory / "export")
    return directory / "export", phi, SufficientStats.total(sites)


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_exact_head_round_trip(head_export, data, tmp_path, capsys):
    out_dir, phi, total = head_export
    npz, _, labels = data
    out = tmp_path / "preds.csv"
    assert taft_predict.main([str(out_dir), str(npz), "--out", str(out), "--batch-size", "16", "--no-progress"]) == 0
    got = rows(out)
    ridge = solve(total)
    expected = ridge.predict(phi)
    assert [int(r["index"]) for r in got] == list(range(N))
    np.testing.assert_array_equal([int(r["predicted"]) for r in got], expected)
    np.testing.assert_allclose([float(r["score"]) for r in got], ridge.scores(phi).max(axis=1), rtol=1e-5, atol=1e-6)
    accuracy = float((expected == labels).mean())
    assert f"accuracy {accuracy:.4f}" in capsys.readouterr().out
    assert accuracy > 0.5  # fitted on these very images: a wrong head would not get there


def test_predict_refuses_a_feature_digest_mismatch(head_export, data, tmp_path, capsys):
    out_dir, _, _ = head_export
    forged = tmp_path / "export"
    shutil.copytree(out_dir, forged)
    manifest = json.loads((forged / "manifest.json").read_text())
    manifest["model_card"]["feature-spec"]["random-seed"] = 2  # other random features, same shapes
    (forged / "manifest.json").write_text(json.dumps(manifest))
    assert taft_predict.main([str(forged), str(data[0]), "--out", str(tmp_path / "p.csv"), "--no-progress"]) == 2
    assert "fails verification" in capsys.readouterr().err and not (tmp_path / "p.csv").exists()
    # unverified, the rebuilt extractor's digest still catches this edit
    assert taft_predict.main([str(forged), str(data[0]), "--out", str(tmp_path / "p.csv"), "--no-progress",
                              "--no-verify"]) == 2
    assert "digest" in capsys.readouterr().err and not (tmp_path / "p.csv").exists()


@pytest.mark.slow
def test_delta_round_trip_and_base_digest_mismatch(data, tmp_path, capsys):
    npz, images, labels = data
    model, base_digest = build_model(MODEL_SPEC, cached=False)
    rng = np.random.default_rng(0)
    deltas = [{k: (rng.standard_normal(tuple(v.shape)) * 1e-3).astype(np.float32)
               for k, v in model.delta_state_dict().items()} for _ in range(2)]
    with Ledger.open(tmp_path / "delta.sqlite") as ledger:
        for i, d in enumerate(deltas):
            ledger.add(f"site-{i}", d, 10 * (i + 1), base_digest=base_digest)
        composed = ledger.composed_delta()
        export(ledger, tmp_path / "export", model_spec=MODEL_SPEC.to_config())
    model.load_delta(composed)
    with torch.no_grad():
        expected = torch.softmax(model.eval()(preprocess(images, 56)), dim=1).numpy()
    out = tmp_path / "preds.csv"
    assert taft_predict.main([str(tmp_path / "export"), str(npz), "--out", str(out), "--no-progress"]) == 0
    got = rows(out)
    np.testing.assert_array_equal([int(r["predicted"]) for r in got], expected.argmax(1))
    np.testing.assert_allclose([float(r["score"]) for r in got], expected.max(1), rtol=1e-4)
    assert "accuracy" in capsys.readouterr().out

    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    (tmp_path / "export" / "manifest.json").write_text(json.dumps({**manifest, "model_spec": {**manifest["model_spec"], "seed": 1}}))
    assert taft_predict.main([str(tmp_path / "export"), str(npz), "--out", str(out), "--no-progress"]) == 2
    assert "fails verification" in capsys.readouterr().err
    assert taft_predict.main([str(tmp_path / "export"), str(npz), "--out", str(out), "--no-progress", "--no-verify"]) == 2
    assert "digest" in capsys.readouterr().err


def test_clear_errors_for_a_wrong_directory_or_data(head_export, tmp_path, capsys):
    out_dir, _, _ = head_export
    assert taft_predict.main([str(tmp_path), str(tmp_path / "x.npz"), "--no-progress"]) == 2
    assert "manifest.json" in capsys.readouterr().err
    bad = tmp_path / "bad.npz"
    np.savez(bad, pictures=np.zeros((2, 8, 8), np.uint8))
    assert taft_predict.main([str(out_dir), str(bad), "--no-progress"]) == 2
    assert "'images'" in capsys.readouterr().err
    assert taft_predict.main([str(out_dir), str(tmp_path / "missing.npz"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unlabelled_npz_predicts_without_accuracy(head_export, data, tmp_path, capsys):
    out_dir, _, _ = head_export
    unlabelled = tmp_path / "u.npz"
    np.savez(unlabelled, images=data[1][:5])
    out = tmp_path / "u.csv"
    assert taft_predict.main([str(out_dir), str(unlabelled), "--out", str(out), "--no-progress"]) == 0
    assert len(rows(out)) == 5 and "accuracy" not in capsys.readouterr().out


def test_predict_refuses_tampered_weights_that_would_change_every_prediction(head_export, data, tmp_path, capsys):
    out_dir, _, _ = head_export
    npz = str(data[0])
    honest = tmp_path / "honest.csv"
    fingerprint = json.loads((out_dir / "manifest.json").read_text())["public_key_fingerprint"]
    assert taft_predict.main([str(out_dir), npz, "--out", str(honest), "--no-progress", "--fingerprint", fingerprint]) == 0
    forged = tmp_path / "forged"
    shutil.copytree(out_dir, forged)
    head = safetensors.numpy.load_file(forged / "exact_head.safetensors")
    shift = np.roll(np.arange(head["bias"].size), 1)  # class c's scores become class c+1's
    safetensors.numpy.save_file({"weight": head["weight"][:, shift], "bias": head["bias"][shift]},
                                forged / "exact_head.safetensors")
    capsys.readouterr()
    out = tmp_path / "forged.csv"
    assert taft_predict.main([str(forged), npz, "--out", str(out), "--no-progress"]) == 2
    assert "sha256 is not the signed one" in capsys.readouterr().err and not out.exists()
    assert taft_predict.main([str(forged), npz, "--out", str(out), "--no-progress", "--no-verify"]) == 0
    assert "WARNING: --no-verify" in capsys.readouterr().err
    changed = sum(a["predicted"] != b["predicted"] for a, b in zip(rows(honest), rows(out)))
    assert changed >= N // 2, changed  # what verification keeps from being served (36 of 40 measured)


def test_predict_refuses_edited_privacy_claims_and_another_signer(head_export, data, tmp_path, capsys):
    out_dir, _, _ = head_export
    forged = tmp_path / "forged"
    shutil.copytree(out_dir, forged)
    manifest = json.loads((forged / "manifest.json").read_text())
    manifest["max_epsilon"] = 1.0
    (forged / "manifest.json").write_text(json.dumps(manifest))
    assert taft_predict.main([str(forged), str(data[0]), "--out", str(tmp_path / "p.csv"), "--no-progress"]) == 2
    assert "manifest differs" in capsys.readouterr().err
    other = "SHA256:" + "ab" * 32
    assert taft_predict.main([str(out_dir), str(data[0]), "--out", str(tmp_path / "p.csv"), "--no-progress",
                              "--fingerprint", other]) == 2
    assert "not the pinned" in capsys.readouterr().err and not (tmp_path / "p.csv").exists()


def test_a_delta_export_carries_the_runs_recorded_spec_and_a_partial_spec_is_refused(tmp_path, capsys):
    """The run's spec (reinit=false here, as in pyproject) travels from the ledger to the export:
    taft-predict takes every key from it and assumes none."""
    run_spec = ModelSpec(img_size=28, reinit=False, num_classes=4).to_config()
    delta = {"w": np.ones(3, np.float32)}
    with Ledger.open(tmp_path / "delta.sqlite", model_spec=run_spec) as ledger:
        ledger.add("1", delta, 10)
        manifest = export(ledger, tmp_path / "export")  # no --model-spec: the ledger's own record
        with pytest.raises(Exception, match="not the run's"):
            export(ledger, tmp_path / "other", model_spec={**run_spec, "reinit": True})
    assert manifest["model_spec"] == run_spec
    with pytest.raises(Exception, match="another model spec"):
        Ledger.open(tmp_path / "delta.sqlite", model_spec={**run_spec, "reinit": True})

    partial = {key: value for key, value in run_spec.items() if key != "reinit"}
    (tmp_path / "export" / "manifest.json").write_text(json.dumps({**manifest, "model_spec": partial}))
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 28, 28), np.uint8))
    # the edit breaks the signed statement; past --no-verify the spec itself is refused
    assert taft_predict.main([str(tmp_path / "export"), str(tmp_path / "x.npz"), "--no-progress"]) == 2
    assert taft_predict.main([str(tmp_path / "export"), str(tmp_path / "x.npz"), "--no-progress", "--no-verify"]) == 2
    assert "lacks reinit" in capsys.readouterr().err
