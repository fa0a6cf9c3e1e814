"""Signed sample-level forgetting (server/trust/forgetting.py) on real ledgers, real keys, real files.

The result must be the ledger of a site that only ever had its remaining samples, bit for bit;
every attack is refused with a reason, recorded in the decision log, and changes neither ledger.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from deploy.pki import create_site_key
from server.trust.forgetting import ForgetRefused, apply_forget, apply_forget_file, verify_forget
from server.ledger import Ledger
from server.ledger.ledgers import Ledgers
from server.trust.nonces import NonceStore
from server.trust.registry import SiteRegistry
from server.trust.withdrawal import (
    SIGNING_CONTEXT as WITHDRAWAL_CONTEXT, WithdrawalRefused, apply_withdrawal, create_request, load_private_key,
)
from tangent.exact_head.statistics import SufficientStats, privatize
from tangent.exact_head.features import FeatureSpec
from tangent.protocol.signed_requests import FORGET_CONTEXT, forget_request, sign
from tangent.protocol.spec import ModelSpec
from tangent.exact_head.stats_file import FORMAT as STATS_FORMAT, save_stats, stats_bytes
from tests.helpers import registry_entry, write_registry

P, K, CLIP, BITS = 5, 3, 2.0, 8
FEATURE_DIGEST = "f" * 64
BASE_DIGEST = "b" * 64
SHAPES = {"head.weight": (3, 4), "head.bias": (3,)}


def site_rows(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantized features q (on the grid) and labels of n examples."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-(2 ** BITS) // 3, 2 ** BITS // 3, size=(n, P)).astype(np.int32)
    return q, rng.integers(0, K, size=n)


def stats_of(q, labels) -> SufficientStats:
    return SufficientStats.from_quantized(q, labels, K, CLIP, BITS)


def model_card() -> dict:
    return {"stats-meta": stats_of(*site_rows(0, 1)).meta(), "feature-spec": FeatureSpec(clip_norm=CLIP,
            frac_bits=BITS).to_config(), "model-spec": ModelSpec().to_config(), "feature-digest": FEATURE_DIGEST}


def delta(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * 1e-2).astype(np.float32) for k, s in SHAPES.items()}


def open_ledgers(directory: Path) -> Ledgers:
    """The Δ ledger and the stats ledger, as the ServerApp holds them."""
    directory.mkdir(parents=True, exist_ok=True)
    return Ledgers(delta=Ledger.open(directory / "ledger.sqlite"),
                   stats=Ledger.open(directory / "exact_head.sqlite", family="stats", model_card=model_card()))


def contribute(ledgers, site: str, stats: SufficientStats, seed: int) -> None:
    ledgers.delta.add(site, delta(seed), stats.n, base_digest=BASE_DIGEST)
    ledgers.stats.add(site, stats.to_arrays(), num_examples=stats.n, base_digest=FEATURE_DIGEST)


def state(ledgers) -> tuple:
    """Everything a refusal must leave as it was: versions, composed digests, accumulator bytes."""
    return tuple((ledger.current_version(), ledger.verify().accumulator_sha256,
                  tuple((c.id, c.status) for c in ledger.contributions()))
                 for ledger in (ledgers.delta, ledgers.stats))


def active_sha(ledger, site: str) -> str:
    return ledger.contributions(site_id=site, status="active")[0].delta_sha256


@pytest.fixture
def fed(tmp_path):
    """Sites 1 and 2 registered (2 revoked later where a test says), an admin key, both ledgers,
    site 1 with 40 examples and site 2 with 30 in both ledgers."""
    keys = tmp_path / "keys"
    sites = {}
    for node, site in enumerate(("1", "2", "9"), start=101):
        _, pub = create_site_key(keys, site)
        sites[site] = registry_entry(pub, node_id=node, revoked=(site == "9"))
    _, admin_pub = create_site_key(keys, "admin")
    write_registry(tmp_path / "registry.json", sites, admin_pub)
    ledgers = open_ledgers(tmp_path / "state")
    rows = {"1": site_rows(1, 40), "2": site_rows(2, 30), "9": site_rows(9, 10)}
    for seed, (site, (q, y)) in enumerate(rows.items()):
        contribute(ledgers, site, stats_of(q, y), seed)
    nonces = NonceStore(tmp_path / "state" / "ledger.sqlite.withdrawals.sqlite")
    f = types.SimpleNamespace(tmp=tmp_path, key=lambda s: load_private_key(keys / f"site-{s}.key"),
                              registry=SiteRegistry(tmp_path / "registry.json"), ledgers=ledgers, nonces=nonces,
                              rows=rows)
    yield f
    nonces.close()
    ledgers.delta.close()
    ledgers.stats.close()


def prepare(f, site="1", forget=(0, 3, 5), *, key_of=None, signer="site", stats=None, delta_arrays=None,
            forgotten=None, replaces=None, now=None, tag="a"):
    """A forget request for ``site`` without the rows ``forget``, its stats file and Δw file."""
    q, y = f.rows[site]
    keep = np.setdiff1d(np.arange(len(y)), np.asarray(forget, int))
    stats = stats if stats is not None else stats_of(q[keep], y[keep])
    stats_path = f.tmp / f"stats-{site}-{tag}.safetensors"
    data = save_stats(stats_path, stats, FEATURE_DIGEST)
    delta_path, delta_sha = None, None
    if delta_arrays is not None:
        delta_path = f.tmp / f"delta-{site}-{tag}.safetensors"
        delta_path.write_bytes(save(delta_arrays, metadata={"base-digest": BASE_DIGEST}))
        delta_sha = hashlib.sha256(delta_path.read_bytes()).hexdigest()
    document = forget_request(site, f.key(key_of or site), signer=signer,
                              forgotten=len(y) - stats.n if forgotten is None else forgotten,
                              stats_sha256=hashlib.sha256(data).hexdigest(),
                              stats_replaces=replaces or active_sha(f.ledgers.stats, site),
                              delta_sha256=delta_sha, now=now)
    return json.loads(json.dumps(document)), stats_path, delta_path


# ----------------------------------------------------------------------------- accepted

def test_forgetting_equals_a_site_that_never_had_the_samples(fed, tmp_path):
    document, stats_path, _ = prepare(fed, forget=(0, 3, 5, 39))
    request = apply_forget(document, stats_path, None, fed.ledgers, fed.registry, fed.nonces)
    assert request.forgotten == 4
    # reference: the same sites, site 1 with only its remaining rows, and no Δw of site 1
    reference = open_ledgers(tmp_path / "reference")
    q, y = fed.rows["1"]
    keep = np.setdiff1d(np.arange(40), [0, 3, 5, 39])
    reference.stats.add("1", stats_of(q[keep], y[keep]).to_arrays(), num_examples=36, base_digest=FEATURE_DIGEST)
    for seed, site in ((1, "2"), (2, "9")):
        contribute(reference, site, stats_of(*fed.rows[site]), seed)
    for ours, theirs in ((fed.ledgers.stats, reference.stats), (fed.ledgers.delta, reference.delta)):
        a, b = ours.composed_arrays(), theirs.composed_arrays()
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        assert ours.current_version().composed_sha256 == theirs.current_version().composed_sha256
        assert ours.verify().accumulator_sha256 == theirs.verify().accumulator_sha256
    assert fed.ledgers.stats.composed_stats() == stats_of(np.concatenate([q[keep], fed.rows["2"][0], fed.rows["9"][0]]),
                                                          np.concatenate([y[keep], fed.rows["2"][1], fed.rows["9"][1]]))
    # the Δw is retracted, not withdrawn: the site may contribute a retrained one
    assert fed.ledgers.delta.contributions(site_id="1", status="active") == []
    assert "1" not in fed.ledgers.delta.withdrawn_sites() + fed.ledgers.stats.withdrawn_sites()
    fed.ledgers.delta.add("1", delta(77), 36, base_digest=BASE_DIGEST)
    decision = fed.nonces.decisions()[-1]
    assert decision["accepted"] == 1 and "forgot 4 sample(s)" in decision["detail"]
    fed.ledgers.stats.verify()
    fed.ledgers.delta.verify()


def test_a_retrained_delta_replaces_the_old_one_and_admin_may_sign(fed):
    retrained = delta(55)
    document, stats_path, delta_path = prepare(fed, site="2", forget=(1,), key_of="admin", signer="admin",
                                               delta_arrays=retrained)
    apply_forget(document, stats_path, delta_path, fed.ledgers, fed.registry, fed.nonces)
    (active,) = fed.ledgers.delta.contributions(site_id="2", status="active")
    assert active.num_examples == 29 and active.extra["forgotten"] == 1
    got = fed.ledgers.delta.contribution_delta(active.id)
    assert all(np.array_equal(got[k], retrained[k]) for k in retrained)
    assert fed.ledgers.stats.contributions(site_id="2", status="active")[0].num_examples == 29


def test_forgetting_every_sample_retracts_the_statistics(fed):
    document, stats_path, _ = prepare(fed, site="2", forget=range(30))
    apply_forget(document, stats_path, None, fed.ledgers, fed.registry, fed.nonces)
    assert fed.ledgers.stats.contributions(site_id="2", status="active") == []
    assert "2" not in fed.ledgers.stats.withdrawn_sites()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_forgetting_any_subset_in_any_order_is_bit_identical(tmp_path_factory, data):
    """Random site sizes, random subsets forgotten in one or two requests, random arrival order."""
    tmp = tmp_path_factory.mktemp("prop")
    keys = tmp / "keys"
    sizes = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=3), label="sizes")
    sites = [str(i + 1) for i in range(len(sizes))]
    entries = {s: registry_entry(create_site_key(keys, s)[1]) for s in sites}
    write_registry(tmp / "registry.json", entries)
    registry = SiteRegistry(tmp / "registry.json")
    rows = {s: site_rows(100 + i, n) for i, (s, n) in enumerate(zip(sites, sizes))}
    ledgers = open_ledgers(tmp / "state")
    order = data.draw(st.permutations(sites), label="arrival")
    for i, s in enumerate(order):
        contribute(ledgers, s, stats_of(*rows[s]), i)
    kept = {s: np.arange(len(rows[s][1])) for s in sites}
    with NonceStore(tmp / "nonces.sqlite") as nonces:
        for step in range(data.draw(st.integers(1, 2), label="requests")):
            s = data.draw(st.sampled_from(sites), label="site")
            if not len(kept[s]):
                continue
            drop = data.draw(st.sets(st.sampled_from(list(kept[s])), min_size=1), label="forget")
            remaining = np.array(sorted(set(kept[s]) - drop), dtype=int)
            q, y = rows[s]
            new = stats_of(q[remaining], y[remaining])
            path = tmp / f"s{step}.safetensors"
            data_bytes = save_stats(path, new, FEATURE_DIGEST)
            doc = forget_request(s, load_private_key(keys / f"site-{s}.key"), forgotten=len(drop),
                                 stats_sha256=hashlib.sha256(data_bytes).hexdigest(),
                                 stats_replaces=active_sha(ledgers.stats, s))
            apply_forget(doc, path, None, ledgers, registry, nonces)
            kept[s] = remaining
    remaining_sites = [s for s in sites if len(kept[s])]
    if remaining_sites:
        union_q = np.concatenate([rows[s][0][kept[s]] for s in remaining_sites])
        union_y = np.concatenate([rows[s][1][kept[s]] for s in remaining_sites])
        assert ledgers.stats.composed_stats() == stats_of(union_q, union_y)
    else:
        assert ledgers.stats.composed_stats() is None
    reference = open_ledgers(tmp / "reference")
    for s in reversed(remaining_sites):  # another order, only the remaining rows
        reference.stats.add(s, stats_of(rows[s][0][kept[s]], rows[s][1][kept[s]]).to_arrays(),
                            num_examples=len(kept[s]), base_digest=FEATURE_DIGEST)
    assert ledgers.stats.verify().accumulator_sha256 == reference.stats.verify().accumulator_sha256
    assert ledgers.stats.current_version().composed_sha256 == reference.stats.current_version().composed_sha256
    for ledger in (*ledgers.all(), *reference.all()):
        ledger.close()


# ----------------------------------------------------------------------------- refused

def refused(f, document, stats_path, delta_path=None, match=""):
    before = state(f.ledgers)
    with pytest.raises(ForgetRefused, match=match) as err:
        apply_forget(document, stats_path, delta_path, f.ledgers, f.registry, f.nonces)
    assert state(f.ledgers) == before, "a refused request changed a ledger"
    decision = f.nonces.decisions()[-1]
    assert decision["accepted"] == 0 and str(err.value) in decision["detail"]
    return err.value


def test_forged_signature_is_refused(fed):
    document, stats_path, _ = prepare(fed)
    document["payload"]["forgotten"] = 2  # the signed payload said 3
    refused(fed, document, stats_path, match="bad signature")


def test_another_sites_key_is_refused(fed):
    document, stats_path, _ = prepare(fed, key_of="2")
    refused(fed, document, stats_path, match="bad signature: not signed by the registered site key of site '1'")


def test_a_revoked_key_is_refused(fed):
    document, stats_path, _ = prepare(fed, site="9", forget=(0,))
    refused(fed, document, stats_path, match="revoked")


def test_a_replayed_nonce_is_refused(fed):
    document, stats_path, _ = prepare(fed)
    apply_forget(document, stats_path, None, fed.ledgers, fed.registry, fed.nonces)
    refused(fed, document, stats_path, match="replayed request")


def test_an_old_request_is_refused(fed):
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    document, stats_path, _ = prepare(fed, now=old)
    refused(fed, document, stats_path, match="stale request: signed")


def test_a_request_against_statistics_that_were_replaced_since_is_refused(fed):
    first, first_stats, _ = prepare(fed, forget=(0,), tag="first")
    second, second_stats, _ = prepare(fed, forget=(0, 1), tag="second")  # signed against the same stats
    apply_forget(first, first_stats, None, fed.ledgers, fed.registry, fed.nonces)
    refused(fed, second, second_stats, match="stale request: it replaces statistics")


@pytest.mark.parametrize("which", ["stats", "delta"])
def test_a_file_that_is_not_the_signed_one_is_refused(fed, which):
    document, stats_path, delta_path = prepare(fed, delta_arrays=delta(5))
    target = stats_path if which == "stats" else delta_path
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    refused(fed, document, stats_path, delta_path, match=f"the {'statistics' if which == 'stats' else 'Δw'} file's sha256")


def test_a_delta_the_request_does_not_sign_is_refused(fed):
    document, stats_path, _ = prepare(fed)
    other = fed.tmp / "unsigned-delta.safetensors"
    other.write_bytes(save(delta(9)))
    refused(fed, document, stats_path, other, match="signs none")


def test_more_examples_than_before_is_refused(fed):
    q, y = fed.rows["1"]
    more = stats_of(np.concatenate([q, q[:2]]), np.concatenate([y, y[:2]]))
    document, stats_path, _ = prepare(fed, stats=more, forgotten=1)
    refused(fed, document, stats_path, match="not fewer than the 40")


def test_a_forgotten_count_that_lies_is_refused(fed):
    document, stats_path, _ = prepare(fed, forget=(0, 3, 5), forgotten=1)
    refused(fed, document, stats_path, match="says 1 sample.s. forgotten, but n goes from 40 to 37")


def test_a_dp_statistics_file_is_refused(fed):
    q, y = fed.rows["1"]
    noisy = privatize(stats_of(q[1:], y[1:]), 8.0, 1e-5, rng=np.random.default_rng(0))
    noisy.n = 39  # even with a plausible n: a DP release is never an exact replacement
    document, stats_path, _ = prepare(fed, stats=noisy, forgotten=1)
    refused(fed, document, stats_path, match="DP release")


def test_statistics_of_other_features_are_refused(fed):
    document, stats_path, _ = prepare(fed)
    q, y = fed.rows["1"]
    data = stats_bytes(stats_of(q[1:], y[1:]), "e" * 64)
    stats_path.write_bytes(data)
    document = forget_request("1", fed.key("1"), forgotten=1, stats_sha256=hashlib.sha256(data).hexdigest(),
                              stats_replaces=active_sha(fed.ledgers.stats, "1"))
    refused(fed, document, stats_path, match="statistics of features eeee")


def test_a_withdrawal_signature_is_not_a_forget_request_and_the_reverse(fed):
    """Domain separation, both directions, with otherwise valid signatures by the site's own key."""
    document, stats_path, _ = prepare(fed)
    # 1. a forget payload signed under the withdrawal context (as if one signing context served both)
    under_withdrawal = sign(WITHDRAWAL_CONTEXT, document["payload"], fed.key("1"))
    refused(fed, under_withdrawal, stats_path, match="bad signature")
    # 2. a real withdrawal request handed to the forget path
    withdrawal = create_request("1", fed.key("1"), reason="consent withdrawn")
    refused(fed, withdrawal, stats_path, match="a withdrawal request is not a forget request")
    # 3. a withdrawal payload signed under the forget context, handed to the withdrawal path
    forged = sign(FORGET_CONTEXT, withdrawal["payload"], fed.key("1"))
    before = state(fed.ledgers)
    with pytest.raises(WithdrawalRefused, match="bad signature"):
        apply_withdrawal(forged, fed.ledgers.delta, fed.registry, fed.nonces)
    # 4. a real forget request handed to the withdrawal path
    with pytest.raises(WithdrawalRefused, match="payload fields"):
        apply_withdrawal(document, fed.ledgers.delta, fed.registry, fed.nonces)
    assert state(fed.ledgers) == before
    # and the genuine forget request still works afterwards (nothing above consumed its nonce)
    apply_forget(document, stats_path, None, fed.ledgers, fed.registry, fed.nonces)


@pytest.mark.parametrize("text", [json.dumps({"payload": {"x": "a" * 70_000}, "signature": "AA=="}),
                                  "[" * 5000 + "]" * 5000,
                                  '{"payload": {"a": {"b": {"c": {"d": 1}}}}, "signature": "AA=="}'])
def test_oversized_or_deep_json_is_refused_and_recorded(fed, text):
    path = fed.tmp / "request.json"
    path.write_text(text)
    _, stats_path, _ = prepare(fed)
    before = state(fed.ledgers)
    with pytest.raises(ForgetRefused, match="cannot read request"):
        apply_forget_file(path, stats_path, None, fed.ledgers, fed.tmp / "state" / "ledger.sqlite",
                          fed.tmp / "registry.json")
    assert state(fed.ledgers) == before
    with NonceStore(fed.tmp / "state" / "ledger.sqlite.withdrawals.sqlite") as nonces:
        assert nonces.decisions()[-1]["accepted"] == 0


def test_verify_forget_names_malformed_fields(fed):
    document, _, _ = prepare(fed)
    for field, value, message in (("kind", "withdrawal", "is not 'forget-samples'"),
                                  ("forgotten", True, "positive integer"),
                                  ("stats_sha256", "F" * 64, "lowercase hex"),
                                  ("site_id", "../x", "malformed")):
        bad = json.loads(json.dumps(document))
        bad["payload"][field] = value
        with pytest.raises(ForgetRefused, match=message):
            verify_forget(bad, fed.registry)


# ----------------------------------------------------------------------------- CLI

def test_taft_ledger_forget_applies_and_refuses(fed, capsys):
    from server.cli import main

    document, stats_path, _ = prepare(fed)
    request = fed.tmp / "forget.json"
    request.write_text(json.dumps(document))
    argv = ["--ledger", str(fed.tmp / "state" / "ledger.sqlite"), "forget", str(request),
            "--stats", str(stats_path), "--registry", str(fed.tmp / "registry.json")]
    fed.ledgers.delta.close()
    fed.ledgers.stats.close()
    assert main(argv) == 0
    assert "site 1 forgot 3 sample(s)" in capsys.readouterr().out
    assert main(argv) == 1  # the same request again: a replay
    assert "REFUSED: replayed request" in capsys.readouterr().err
    with Ledger.open(fed.tmp / "state" / "exact_head.sqlite") as stats_ledger:
        assert stats_ledger.contributions(site_id="1", status="active")[0].num_examples == 37
    fed.ledgers = open_ledgers(fed.tmp / "state")  # for the fixture's teardown


def test_a_forget_request_cannot_store_what_a_reply_would_be_refused_for(fed, capsys):
    """The ServerApp records its admission policy in the Δ ledger; ``taft-ledger forget`` opens the
    ledger without any policy of its own and must still refuse a retrained Δw of norm 775 (every entry
    in range) that a train reply would be refused for at max-delta-norm 10 (norm_too_large), changing
    neither ledger."""
    from server.cli import main
    from server.ledger import RejectedContribution

    fed.ledgers.delta.set_admission_policy(max_delta_norm=10.0)
    huge = {k: np.full(s, 200.0, np.float32) for k, s in SHAPES.items()}
    with pytest.raises(RejectedContribution) as err:  # as a reply, through the same ledger check
        fed.ledgers.delta.replace("1", huge, 40, base_digest=BASE_DIGEST)
    assert err.value.reason == "norm_too_large"
    document, stats_path, delta_path = prepare(fed, delta_arrays=huge)
    request = fed.tmp / "forget.json"
    request.write_text(json.dumps(document))
    before = state(fed.ledgers)
    fed.ledgers.delta.close()
    fed.ledgers.stats.close()
    argv = ["--ledger", str(fed.tmp / "state" / "ledger.sqlite"), "forget", str(request), "--stats", str(stats_path),
            "--delta", str(delta_path), "--registry", str(fed.tmp / "registry.json")]
    assert main(argv) == 1
    assert "norm_too_large" in capsys.readouterr().err
    fed.ledgers = open_ledgers(fed.tmp / "state")
    assert state(fed.ledgers) == before
    assert fed.ledgers.delta.max_delta_norm == 10.0  # a tool that names no policy gets the recorded one


# ----------------------------------------------------------------------------- fuzz: hostile statistics files

def _hostile_stats_file(rng: np.random.Generator, good: SufficientStats) -> tuple[str, bytes]:
    """The bytes of a statistics file no honest site's forgetting writes (signed by the site all the
    same: the site is the attacker); returns (the corruption, the bytes)."""
    import struct

    from safetensors.numpy import save

    arrays = {k: np.array(v) for k, v in good.to_arrays().items()}
    metadata = {"format": STATS_FORMAT, "feature-digest": FEATURE_DIGEST,
                **{key: str(value) for key, value in good.meta().items()}}
    data = stats_bytes(good, FEATURE_DIGEST)
    how = str(rng.choice(["truncated", "flipped_header", "huge_header_length", "empty", "json", "zip",
                          "dtype", "counts_negative", "n_not_counts", "extra_tensor", "missing_tensor",
                          "gram_negative", "cross_beyond_count", "dp_claim", "grid", "feature_digest",
                          "row_form", "nan_meta", "same_n"]))
    if how == "truncated":
        return how, data[:int(rng.integers(0, len(data)))]
    if how == "flipped_header":
        length = struct.unpack("<Q", data[:8])[0]
        position = 8 + int(rng.integers(length))
        return how, data[:position] + bytes([data[position] ^ int(rng.integers(1, 256))]) + data[position + 1:]
    if how == "huge_header_length":
        return how, struct.pack("<Q", int(rng.choice([2 ** 63, 2 ** 40, len(data)]))) + data[8:]
    if how == "empty":
        return how, b""
    if how == "json":
        return how, json.dumps({"n": 1}).encode()
    if how == "zip":
        return how, b"PK\x03\x04" + bytes(100)
    if how == "dtype":
        name = str(rng.choice(sorted(arrays)))
        arrays[name] = arrays[name].astype(str(rng.choice(["float64", "int32", "uint64"])))
    elif how == "counts_negative":
        arrays["counts"][0] -= good.n + 1
        arrays["counts"][1] += good.n + 1
    elif how == "n_not_counts":
        arrays["n"][0] -= 1
    elif how == "extra_tensor":
        arrays[str(rng.choice(["x", "rows", "gram2"]))] = np.zeros(3, np.int64)
    elif how == "missing_tensor":
        arrays.pop(str(rng.choice(sorted(arrays))))
    elif how == "gram_negative":
        arrays["gram"][0] = -1
    elif how == "cross_beyond_count":  # rows of cross still sum to sums: only count·2^b refuses it
        shift = (int(arrays["counts"][0]) + 1) * 2 ** BITS
        arrays["cross"][0, 0] += shift
        arrays["cross"][0, 1] -= shift
    elif how == "dp_claim":
        metadata["dp"] = json.dumps({"epsilon": 1.0, "delta": 1e-6})
    elif how == "grid":
        metadata[str(rng.choice(["frac-bits", "clip-norm", "num-features"]))] = "7"
    elif how == "feature_digest":
        metadata["feature-digest"] = "e" * 64
    elif how == "row_form":  # a row form is for replies; a forget file carries the sums
        q, y = site_rows(5, good.n)
        arrays = {"rows": q, "labels": y.astype(np.int64)}
    elif how == "nan_meta":
        metadata["clip-norm"] = "nan"
    else:  # statistics of as many examples as before: nothing forgotten
        arrays = {k: np.array(v) for k, v in stats_of(*site_rows(6, 40)).to_arrays().items()}
    return how, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=metadata)


def test_fuzz_hostile_statistics_files_signed_by_the_site_are_refused_and_change_nothing(fed):
    """200 statistics files a hostile site signs (so the signature and hash checks pass and the file
    itself is what is tested): every one is refused with ForgetRefused — never another exception —
    logged as a refused decision, and neither ledger changes."""
    rng = np.random.default_rng(20261206)
    q, y = fed.rows["1"]
    keep = np.setdiff1d(np.arange(len(y)), [0, 3, 5])
    good = stats_of(q[keep], y[keep])
    before = state(fed.ledgers)
    seen = Counter()
    for case in range(200):
        how, data = _hostile_stats_file(rng, good)
        seen[how] += 1
        path = fed.tmp / f"hostile-{case}.safetensors"
        path.write_bytes(data)
        document = forget_request("1", fed.key("1"), signer="site", forgotten=3,
                                  stats_sha256=hashlib.sha256(data).hexdigest(),
                                  stats_replaces=active_sha(fed.ledgers.stats, "1"), delta_sha256=None)
        with pytest.raises(ForgetRefused) as err:
            apply_forget(json.loads(json.dumps(document)), path, None, fed.ledgers, fed.registry, fed.nonces)
        decision = fed.nonces.decisions()[-1]
        assert decision["accepted"] == 0 and str(err.value) in decision["detail"], how
    assert state(fed.ledgers) == before
    assert len(seen) >= 15, seen
    path = fed.tmp / "honest.safetensors"  # the control: the same request with the honest file is applied
    path.write_bytes(stats_bytes(good, FEATURE_DIGEST))
    document = forget_request("1", fed.key("1"), signer="site", forgotten=3,
                              stats_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                              stats_replaces=active_sha(fed.ledgers.stats, "1"), delta_sha256=None)
    apply_forget(json.loads(json.dumps(document)), path, None, fed.ledgers, fed.registry, fed.nonces)
    assert fed.ledgers.stats.composed_stats() == good + stats_of(*fed.rows["2"]) + stats_of(*fed.rows["9"])


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "missing"])
def test_a_statistics_path_that_is_not_a_regular_file_is_refused_without_blocking(fed, kind):
    import os

    path = fed.tmp / f"odd-{kind}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path = Path("/dev/zero")
    document, _, _ = prepare(fed)
    refused(fed, document, path, match="cannot read")


def test_forgetting_reaches_a_contribution_held_in_quarantine(fed):
    """Site 1's next contribution (the same data, forgotten samples included) waits in quarantine
    when the site asks to forget samples: the request replaces the composed statistics — and the
    held contribution must go too, or `admit` would later bring the forgotten samples back."""
    held = open_ledgers(fed.tmp / "state" / "quarantine")
    q, y = fed.rows["1"]
    contribute(held, "1", stats_of(q, y), 7)
    ledgers = Ledgers(fed.ledgers.delta, fed.ledgers.stats, held)
    document, stats_path, _ = prepare(fed)
    apply_forget(document, stats_path, None, ledgers, fed.registry, fed.nonces)
    assert held.delta.contributions(site_id="1", status="active") == []
    assert held.stats.contributions(site_id="1", status="active") == []
    assert "quarantine" in fed.nonces.decisions()[-1]["detail"]
    held.delta.close()
    held.stats.close()
