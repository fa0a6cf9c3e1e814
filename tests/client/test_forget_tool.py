"""python -m client.forget: a site's statistics without the forgotten rows, signed, accepted by the
server, and equal to statistics computed independently from the remaining rows only."""
from __future__ import annotations

import hashlib
import json
import types

import numpy as np
import pytest

from client.forget import main, read_run_spec, site_data, site_statistics
from client.task import remember_run_spec
from deploy.pki import create_site_key
from server.trust.forgetting import apply_forget_file
from server.ledger import Ledger
from server.ledger.ledgers import Ledgers
from server.trust.nonces import NonceStore
from tangent.data.sets import load_fashion_mnist, preprocess
from tangent.exact_head.statistics import SufficientStats
from tangent.exact_head.features import FeatureExtractor, FeatureSpec
from tangent.protocol.spec import ModelSpec
from tests.helpers import registry_entry, write_registry

SPEC = FeatureSpec(pieces=("final_cls", "input_mean"), random_features=16, random_seed=5, frac_bits=12)
FORGET = [2, 7, 11]


@pytest.fixture(scope="module")
def site(tmp_path_factory, pretrained_vit):
    tmp = tmp_path_factory.mktemp("site")
    images, labels = load_fashion_mnist("test")
    images, labels = images[:14], labels[:14]
    np.savez(tmp / "site-3.npz", images=images, labels=labels)
    (tmp / "forget.txt").write_text("# rows the data subjects asked us to forget\n" + "\n".join(map(str, FORGET)) + "\n")
    _, pub = create_site_key(tmp / "keys", "3")
    write_registry(tmp / "registry.json", {"3": registry_entry(pub)})
    extractor = FeatureExtractor(pretrained_vit, SPEC, img_size=56)
    # the spec record the SuperNode saved when it accepted the run's train request (client.task)
    remember_run_spec(tmp / "site-state", ModelSpec(img_size=56, num_classes=10).to_config() | SPEC.to_config()
                      | {"exact-head": True, "feature-digest": extractor.digest(), "base-digest": "b" * 64})
    return types.SimpleNamespace(tmp=tmp, images=images, labels=labels, extractor=extractor,
                                 options=["--state-dir", str(tmp / "site-state")])


@pytest.fixture(autouse=True)
def site_state_root(tmp_path, monkeypatch):
    """The deploy scripts' state root, where the tool looks for the site's budget record."""
    monkeypatch.setenv("TAFT_STATE_DIR", str(tmp_path / "state-root"))
    return tmp_path / "state-root"


@pytest.mark.slow
def test_the_tool_forgets_rows_and_the_server_accepts_it_bit_for_bit(site):
    tmp, extractor = site.tmp, site.extractor
    digest = extractor.digest()
    card = {"stats-meta": SufficientStats.zeros(extractor.dim, 10, SPEC.clip_norm, SPEC.frac_bits).meta(),
            "feature-spec": SPEC.to_config(), "model-spec": ModelSpec().to_config(), "feature-digest": digest}
    # the site's earlier contribution: statistics of all 14 rows, computed by the training path's function
    everything = site_statistics(extractor, site_data(tmp / "site-3.npz", 56), 10, exclude=[])
    state = tmp / "state"
    state.mkdir()
    with Ledger.open(state / "exact_head.sqlite", family="stats", model_card=card) as stats_ledger, \
            Ledger.open(state / "ledger.sqlite") as delta_ledger:
        stats_ledger.add("3", everything.to_arrays(), num_examples=14, base_digest=digest)
        delta_ledger.add("3", {"w": np.ones(3, np.float32)}, 14)
        replaces = stats_ledger.contributions(site_id="3", status="active")[0].delta_sha256
        out = tmp / "out"
        assert main(["--site", "3", "--key", str(tmp / "keys" / "site-3.key"), "--data", str(tmp / "site-3.npz"),
                     "--forget-indices", str(tmp / "forget.txt"), "--replaces", replaces, "--out", str(out),
                     "--feature-digest", digest, *site.options]) == 0
        request, stats_file = out / "forget-3.json", out / "stats-3.safetensors"
        assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in (request, stats_file))
        assert json.loads(request.read_text())["payload"]["forgotten"] == 3
        apply_forget_file(request, stats_file, None, Ledgers(delta_ledger, stats_ledger),
                          state / "ledger.sqlite", tmp / "registry.json")
        composed = stats_ledger.composed_stats()
        assert delta_ledger.contributions(site_id="3", status="active") == []
    keep = np.setdiff1d(np.arange(14), FORGET)
    # independent: φ of the remaining images alone (they never shared a batch with the forgotten ones) …
    alone = SufficientStats.from_features(extractor.compute(preprocess(site.images[keep], 56), tokens=False),
                                          site.labels[keep], 10, SPEC.clip_norm, SPEC.frac_bits)
    # … and the rows of φ computed over all 14 images
    phi_all = extractor.compute(preprocess(site.images, 56), tokens=False)
    subset = SufficientStats.from_features(phi_all[keep], site.labels[keep], 10, SPEC.clip_norm, SPEC.frac_bits)
    assert composed == alone == subset and composed.n == 11
    assert hashlib.sha256(stats_file.read_bytes()).hexdigest() == json.loads(request.read_text())["payload"]["stats_sha256"]


@pytest.mark.parametrize("rows, message", [("3\n99\n", "outside 0..13"), ("3\n3\n", "more than once"),
                                           ("# none\n", "names no rows"), ("x\n", "is not a row number")])
def test_bad_forget_indices_are_refused_before_anything_is_signed(site, capsys, rows, message):
    bad = site.tmp / "bad.txt"
    bad.write_text(rows)
    out = site.tmp / "bad-out"
    assert main(["--site", "3", "--key", str(site.tmp / "keys" / "site-3.key"), "--data", str(site.tmp / "site-3.npz"),
                 "--forget-indices", str(bad), "--replaces", "a" * 64, "--out", str(out), *site.options]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_a_feature_digest_mismatch_is_refused(site, capsys):
    out = site.tmp / "mismatch-out"
    assert main(["--site", "3", "--key", str(site.tmp / "keys" / "site-3.key"), "--data", str(site.tmp / "site-3.npz"),
                 "--forget-indices", str(site.tmp / "forget.txt"), "--replaces", "a" * 64, "--out", str(out),
                 "--feature-digest", "0" * 64, *site.options]) == 2
    assert "is not the run's" in capsys.readouterr().err and not out.exists()


def test_help_explains_the_steps(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "--forget-indices" in text and "taft-ledger" in text and "--replaces" in text


@pytest.mark.parametrize("how", ["default-state-dir", "state-dir", "require-dp"])
def test_a_dp_site_is_refused_before_its_data_is_read(site, capsys, site_state_root, tmp_path, how):
    """Old code wrote exact statistics (n, label counts) for the operator on a budgeted DP site."""
    from tangent.training.budget import PrivacyBudget

    state = {"default-state-dir": site_state_root / "site-3", "state-dir": tmp_path / "elsewhere"}.get(how)
    if state is not None:
        PrivacyBudget.create(state / PrivacyBudget.FILE_NAME, "3", 8.0)
    run_spec = ["--run-spec", str(site.tmp / "site-state" / "run-spec.json")]
    extra = {"state-dir": ["--state-dir", str(state)], "require-dp": ["--require-dp", *run_spec]}.get(how, run_spec)
    out = tmp_path / "out"
    assert main(["--site", "3", "--key", str(site.tmp / "keys" / "site-3.key"), "--data", str(site.tmp / "site-3.npz"),
                 "--forget-indices", str(site.tmp / "forget.txt"), "--replaces", "a" * 64, "--out", str(out),
                 *extra]) == 2
    assert "is a DP site" in capsys.readouterr().err and not out.exists()


def test_the_tool_reads_every_setting_from_the_runs_spec_and_refuses_an_incomplete_one(tmp_path, capsys):
    """The tool once defaulted to 4 pieces + 2,048 random features while the run used input_quad and
    none: now there is no default to disagree with."""
    record = ModelSpec(img_size=28, reinit=False).to_config() | FeatureSpec(random_features=0).to_config() \
        | {"feature-digest": "f" * 64}
    remember_run_spec(tmp_path / "state", record)
    assert oct((tmp_path / "state" / "run-spec.json").stat().st_mode & 0o777) == "0o600"
    model_spec, feature_spec, digest = read_run_spec(tmp_path / "state" / "run-spec.json")
    assert model_spec == ModelSpec(img_size=28, reinit=False) and digest == "f" * 64
    assert feature_spec == FeatureSpec(random_features=0) and "input_quad" in feature_spec.pieces
    (tmp_path / "partial.json").write_text(json.dumps({k: v for k, v in record.items() if k != "random-features"}))
    with pytest.raises(ValueError, match="lacks random-features"):
        read_run_spec(tmp_path / "partial.json")
    (tmp_path / "rows.txt").write_text("1\n")
    assert main(["--site", "3", "--key", str(tmp_path / "none.key"), "--data", str(tmp_path / "none.npz"),
                 "--forget-indices", str(tmp_path / "rows.txt"), "--replaces", "a" * 64, "--out",
                 str(tmp_path / "out"), "--state-dir", str(tmp_path / "empty")]) == 2
    assert "run-spec.json" in capsys.readouterr().err and not (tmp_path / "out").exists()


def _dp_site(site, tmp_path, budget_epsilon: float):
    """A DP site's state-dir: its budget record, the run's spec and its last DP head request (as the
    SuperNode saves them, client.dp_head.remember_request)."""
    from client import dp_head
    from tangent.exact_head import dp
    from tangent.training.budget import PrivacyBudget

    state = tmp_path / "dp-state"
    PrivacyBudget.create(state / PrivacyBudget.FILE_NAME, "3", budget_epsilon)
    spec = json.loads((site.tmp / "site-state" / "run-spec.json").read_text())
    request = dp_head.HeadRequest(0.9, dp.RowTransform(np.full(site.extractor.dim, 0.01), 8, 1),
                                  dp_head.DEFAULT_WEIGHTS, 14)
    dp_head.remember_request(state, spec, request, 1.0, 1e-5)
    return state, PrivacyBudget(state / PrivacyBudget.FILE_NAME, "3")


@pytest.mark.slow
def test_a_dp_site_writes_a_fresh_release_charged_to_its_budget_and_the_server_accepts_it(site, tmp_path):
    from client import dp_head
    from server.exact_head import DPHeadRequest, ExactHead
    from tangent.exact_head.stats_file import load_release

    state, budget = _dp_site(site, tmp_path, 1.5)
    request, epsilon, delta = dp_head.remembered_request(state / dp_head.REQUEST_FILE)[1:]
    # the server's stats ledger of this DP head, holding the site's earlier release of all 14 rows
    head = DPHeadRequest(1.0, None, 8, 1, 14, np.asarray(request.transform.centre))
    description = {"feature-spec": SPEC.to_config(), "feature-digest": site.extractor.digest(),
                   "num-features": site.extractor.dim, "num-classes": 10, "clip-norm": SPEC.clip_norm,
                   "frac-bits": SPEC.frac_bits, "stats-meta": {}}
    card = ExactHead.from_description(description, ModelSpec().to_config(), head).model_card
    first = dp_head.release(site.extractor, site_data(site.tmp / "site-3.npz", 56), 10, request, epsilon, delta,
                            "ab" * 16)
    ledger_dir = tmp_path / "server"
    ledger_dir.mkdir()
    with Ledger.open(ledger_dir / "exact_head.sqlite", family="stats", model_card=card) as stats_ledger, \
            Ledger.open(ledger_dir / "ledger.sqlite") as delta_ledger:
        stats_ledger.add("3", {k: first["stats"][k].numpy() for k in first["stats"]}, num_examples=16,
                         base_digest=site.extractor.digest(), epsilon=epsilon, delta_dp=delta,
                         dp_settings={"dp": True, "noise_variance": first["stats-meta"]["dp-head-noise-variance"]},
                         extra={"contribution_id": "ab" * 16})
        delta_ledger.add("3", {"w": np.ones(3, np.float32)}, 16)
        replaces = stats_ledger.contributions(site_id="3", status="active")[0].delta_sha256
        out = tmp_path / "out"
        assert main(["--site", "3", "--key", str(site.tmp / "keys" / "site-3.key"), "--data", str(site.tmp / "site-3.npz"),
                     "--forget-indices", str(site.tmp / "forget.txt"), "--replaces", replaces, "--out", str(out),
                     "--state-dir", str(state)]) == 0
        request_file, release_file = out / "forget-3.json", out / "release-3.safetensors"
        assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in (request_file, release_file))
        _, meta = load_release(release_file.read_bytes())
        # charged once, alone, under the release's own entry; nothing exact in the file
        (charge,) = budget.charges().values()
        assert charge["id"] == meta["contribution-id"] and charge["state"] == "settled" and charge["epsilon"] == 1.0
        assert meta["dp-head-epsilon"] == 1.0 and meta["dp"] is True
        apply_forget_file(request_file, release_file, None, Ledgers(delta_ledger, stats_ledger),
                          ledger_dir / "ledger.sqlite", site.tmp / "registry.json")
        (active,) = stats_ledger.contributions(site_id="3", status="active")
        assert active.extra["contribution_id"] == meta["contribution-id"].removesuffix(":head")
        assert delta_ledger.contributions(site_id="3", status="active") == []
    # a second forget would spend 1 more of the 0.5 left: refused before the data is read, nothing charged
    assert main(["--site", "3", "--key", str(site.tmp / "keys" / "site-3.key"), "--data", str(tmp_path / "absent.npz"),
                 "--forget-indices", str(site.tmp / "forget.txt"), "--replaces", "a" * 64, "--out",
                 str(tmp_path / "out2"), "--state-dir", str(state)]) == 2
    assert len(budget.charges()) == 1 and not (tmp_path / "out2").exists()


def test_a_dp_site_is_refused_a_retrained_delta(site, tmp_path, capsys):
    state, budget = _dp_site(site, tmp_path, 8.0)
    (tmp_path / "delta.safetensors").write_bytes(b"x")
    assert main(["--site", "3", "--key", str(site.tmp / "keys" / "site-3.key"), "--data", str(site.tmp / "site-3.npz"),
                 "--forget-indices", str(site.tmp / "forget.txt"), "--replaces", "a" * 64, "--out",
                 str(tmp_path / "out"), "--state-dir", str(state), "--delta", str(tmp_path / "delta.safetensors")]) == 2
    assert "not retrained by this tool" in capsys.readouterr().err and budget.spent == (0.0, 0.0)
