"""Signed sample-level forgetting: a site replaces its exact-head statistics by those of the
samples it keeps, and its TAFT Δw is retracted (or replaced by one it retrained without them).

A request is a small JSON document (format and signing rule: tangent/protocol/signed_requests.py)

    {"payload": {"version": 1, "kind": "forget-samples", "site_id": "3", "nonce": "…",
                 "timestamp": "2026-…Z", "signer": "site", "forgotten": 17,
                 "stats_sha256": "<sha256 of the replacement statistics file>",
                 "stats_replaces": "<sha256 the stats ledger recorded for the active statistics>",
                 "delta_sha256": "<sha256 of a retrained Δw safetensors file>" | null},
     "signature": "<base64 DER ECDSA>"}

with its own signing context (``FORGET_CONTEXT``): a withdrawal signature never verifies as a
forget request, nor the reverse. Beside it travel the replacement statistics (tangent/exact_head/stats_file.py)
and optionally a retrained Δw (safetensors of float32 tensors, metadata ``base-digest``).

Checks, in order (every refusal is logged in the nonce store's decision log and leaves both
ledgers unchanged): the request's format, the signer's registered and unrevoked key, the
signature, freshness — the rules of server/trust/withdrawal.py, imported, not copied — then the nonce
(consumed here, in the same store as withdrawals: from now on the request is spent), the files'
sha256 against the signed ones, the statistics file (non-DP, the stats ledger's grid and feature
digest), that ``stats_replaces`` names the site's *current* active statistics (a request signed
before another change is stale), and that the new n is smaller and differs by exactly
``forgotten``. Only then: the Δ ledger first when a retrained Δw replaces the old one (the
ledger's own checks may refuse it, with nothing changed yet), the stats ledger
``replace`` (``retract`` when nothing remains), and ``retract`` of the site's Δw otherwise.

What the server cannot check: that the new statistics are those of a *subset* of the old rows
(it never saw the rows). A site could always replace its own contribution; the request only makes
that replacement authenticated, fresh, audited, and monotone in n.

**DP sites** (a stats ledger whose model card pins ``dp-head``: the DP head's releases). The file
is a fresh DP release of the remaining rows (tangent/exact_head/stats_file.py ``release_bytes``,
written by client.forget, charged to the site's budget there) and is checked like a reply's
release (server.replies.parse_dp_release) against the ledger's card — grid, feature digest,
transform (k, seed, centre digest) — and the site's active release: ε at most the active
release's, δ equal to it, declared noise exactly that of the declared (ε, δ), n and sums the
post-processing of the noisy blocks, a contribution id the site never used (a replayed release is
refused). Its n is noisy, so ``forgotten`` is recorded, not checked against it. Then the release
replaces the active one (its noise subtracted exactly) and the site's Δw is retracted: a DP-TAFT Δw
is never retrained by a forget request (the site contributes again in the next DP round); a
request that signs a Δw is refused.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.ledger.ledgers import Ledgers
from server.trust.nonces import NonceStore, nonce_store_path
from server.trust.registry import SiteRegistry
from server.trust import safejson
from server.trust.withdrawal import MAX_AGE_S, WithdrawalRefused, read_request, split_document, verify_signed
from tangent.exact_head.statistics import StatsError
from tangent.protocol.signed_requests import (FORGET_CONTEXT, FORGET_FIELDS, FORGET_KIND, FORGET_VERSION,
                                              header_problem)
from tangent.exact_head.stats_file import load_stats, safetensors_metadata

log = logging.getLogger("taft.forgetting")

MAX_STATS_BYTES = 256 * 1024 * 1024   # p = 5,632 is 127 MB; the default p = 3,584 is 52 MB
MAX_DELTA_BYTES = 256 * 1024 * 1024
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class ForgetRefused(Exception):
    """A forget request was refused; `str(err)` says why. Both ledgers are unchanged."""


@dataclass(frozen=True)
class ForgetRequest:
    version: int
    kind: str
    site_id: str
    nonce: str
    timestamp: str
    signer: str
    forgotten: int
    stats_sha256: str
    stats_replaces: str
    delta_sha256: str | None


def parse_forget(document: Any) -> tuple[ForgetRequest, bytes]:
    """The request and its raw signature; ForgetRefused naming what is malformed."""
    try:
        payload, signature = split_document(document)
    except WithdrawalRefused as err:
        raise ForgetRefused(str(err)) from None
    if set(payload) != FORGET_FIELDS:
        raise ForgetRefused(f"malformed forget request: payload fields must be {sorted(FORGET_FIELDS)} "
                            f"(a withdrawal request is not a forget request)")
    problem = header_problem(payload, version=FORGET_VERSION, strings=("site_id", "nonce", "timestamp", "signer"),
                             what="forget request")
    if problem:
        raise ForgetRefused(problem)
    if payload["kind"] != FORGET_KIND:
        raise ForgetRefused(f"kind {str(payload['kind'])[:40]!r} is not {FORGET_KIND!r}")
    if type(payload["forgotten"]) is not int or payload["forgotten"] < 1:
        raise ForgetRefused("'forgotten' must be a positive integer (the number of samples forgotten)")
    for name in ("stats_sha256", "stats_replaces") + (("delta_sha256",) if payload["delta_sha256"] is not None else ()):
        if not isinstance(payload[name], str) or not SHA256_HEX.match(payload[name]):
            raise ForgetRefused(f"'{name}' must be a lowercase hex sha256")
    return ForgetRequest(**payload), signature


def verify_forget(document: Any, registry: SiteRegistry, max_age_s: float = MAX_AGE_S,
                  now: dt.datetime | None = None) -> ForgetRequest:
    """Format, signer key, signature under the forget context, freshness (not the nonce)."""
    request, signature = parse_forget(document)
    try:
        verify_signed(request, FORGET_CONTEXT, asdict(request), signature, registry, max_age_s=max_age_s, now=now)
    except WithdrawalRefused as err:
        raise ForgetRefused(str(err)) from None
    return request


# ----------------------------------------------------------------------------- apply

def _read_file(path: str | Path, limit: int, what: str) -> bytes:
    try:
        return safejson.read_regular_file(Path(path), limit)
    except ValueError as err:
        raise ForgetRefused(f"cannot read the {what} file {path}: {err}") from None


def _check_hash(data: bytes, signed: str, what: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != signed:
        raise ForgetRefused(f"the {what} file's sha256 {actual} is not the signed {signed}")


def _active(ledger: Any, site_id: str):
    active = ledger.contributions(site_id=site_id, status="active")
    return active[0] if active else None


def _checked_stats(data: bytes, request: ForgetRequest, ledger: Any):
    """The replacement statistics and their feature digest, checked against the stats ledger and
    the site's active contribution; ForgetRefused otherwise."""
    try:
        stats, feature_digest = load_stats(data)
    except StatsError as err:
        raise ForgetRefused(f"unreadable statistics file: {err}") from None
    if stats.dp is not None:
        raise ForgetRefused("the statistics file is a DP release: forgetting replaces exact (non-DP) statistics "
                            "only (noisy statistics cannot prove which samples they exclude)")
    card = getattr(ledger, "model_card", None) or {}
    if card.get("stats-meta") is not None and stats.meta() != card["stats-meta"]:
        raise ForgetRefused(f"statistics on grid {stats.meta()}, the stats ledger holds {card['stats-meta']}")
    active = _active(ledger, request.site_id)
    if active is None:
        raise ForgetRefused(f"site {request.site_id!r} has no active statistics in the stats ledger "
                            "(never contributed, withdrawn, or retracted): nothing to forget from")
    if active.epsilon is not None:
        raise ForgetRefused(f"site {request.site_id!r}'s active statistics are a DP release (ε = {active.epsilon}): "
                            "only exact statistics can be replaced by a forget request")
    if request.stats_replaces != active.delta_sha256:
        raise ForgetRefused(f"stale request: it replaces statistics {request.stats_replaces}, but the site's "
                            f"active statistics are {active.delta_sha256} (re-create it against the current ones)")
    pinned_digest = card.get("feature-digest") or active.base_digest
    if pinned_digest is not None and feature_digest != pinned_digest:
        raise ForgetRefused(f"statistics of features {feature_digest[:16]}…, the stats ledger's are "
                            f"{pinned_digest[:16]}…")
    if stats.n >= active.num_examples:
        raise ForgetRefused(f"the new statistics hold n = {stats.n} examples, not fewer than the "
                            f"{active.num_examples} they replace: forgetting only removes samples")
    if active.num_examples - stats.n != request.forgotten:
        raise ForgetRefused(f"the request says {request.forgotten} sample(s) forgotten, but n goes from "
                            f"{active.num_examples} to {stats.n} ({active.num_examples - stats.n})")
    return stats, feature_digest


def _checked_delta(data: bytes) -> tuple[dict, str | None]:
    """The retrained Δw's tensors and the base digest its metadata claims (None: not claimed)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        meta = safetensors_metadata(data)
        arrays = load(data)
    except (ValueError, SafetensorError) as err:
        raise ForgetRefused(f"unreadable Δw file: {str(err)[:200]}") from None
    return arrays, meta.get("base-digest")


def apply_forget(document: Any, stats_file: str | Path, delta_file: str | Path | None, ledgers: Ledgers,
                 registry: SiteRegistry, nonces: NonceStore, max_age_s: float = MAX_AGE_S,
                 now: dt.datetime | None = None) -> ForgetRequest:
    """Verify a forget request and, only if every check passes, update both ledgers.

    Every decision is logged and recorded in ``nonces``. Raises ForgetRefused.
    """
    payload = document.get("payload") if isinstance(document, dict) else None
    payload = payload if isinstance(payload, dict) else None
    try:
        request = verify_forget(document, registry, max_age_s=max_age_s, now=now)
        if not nonces.consume(request):
            raise ForgetRefused(f"replayed request: nonce {request.nonce} was already used")
        # From here the request is spent, whatever happens next (as for withdrawals).
        if ledgers.stats is None:
            raise ForgetRefused("the exact head is off (no stats ledger): there are no statistics to replace")
        stats_data = _read_file(stats_file, MAX_STATS_BYTES, "statistics")
        _check_hash(stats_data, request.stats_sha256, "statistics")
        delta_data = None
        if request.delta_sha256 is None and delta_file is not None:
            raise ForgetRefused("a Δw file was given but the request signs none (delta_sha256 is null)")
        if request.delta_sha256 is not None:
            if delta_file is None:
                raise ForgetRefused("the request signs a retrained Δw but no Δw file was given")
            delta_data = _read_file(delta_file, MAX_DELTA_BYTES, "Δw")
            _check_hash(delta_data, request.delta_sha256, "Δw")
        if dp_head_ledger(ledgers.stats):
            if delta_data is not None:
                raise ForgetRefused("a DP site's forget request replaces its DP head's release only: a DP-TAFT Δw "
                                    "is not retrained by a forget request (the site contributes again in a DP round)")
            detail = _replace_release(request, stats_data, ledgers)
            nonces.record(payload, accepted=True, detail=f"forget-samples: {detail}")
            log.info("forget request ACCEPTED: %s", detail)
            return request
        stats, feature_digest = _checked_stats(stats_data, request, ledgers.stats)
        delta = _checked_delta(delta_data) if delta_data is not None else None
        if delta is not None and stats.n == 0:
            raise ForgetRefused("a retrained Δw was given but no samples remain to train on")
        detail = _update_ledgers(request, stats, feature_digest, delta, ledgers)
    except ForgetRefused as err:
        nonces.record(payload, accepted=False, detail=f"forget-samples: {err}")
        log.warning("forget request REFUSED (site=%s): %s", (payload or {}).get("site_id"), err)
        raise
    nonces.record(payload, accepted=True, detail=f"forget-samples: {detail}")
    log.info("forget request ACCEPTED: %s", detail)
    return request


def _update_ledgers(request: ForgetRequest, stats, feature_digest: str, delta, ledgers: Ledgers) -> str:
    from server.ledger import RejectedContribution

    site, reason = request.site_id, _ledger_reason(request)
    extra = {"forget-request": request.nonce, "forgotten": request.forgotten, "replaces": request.stats_replaces}
    delta_done = ""
    if delta is not None:
        # The Δ ledger's own checks (spec, base digest, norm, duplicate) may refuse the retrained Δw:
        # done first, so that a refusal there leaves both ledgers as they were.
        arrays, base_digest = delta
        try:
            if _active(ledgers.delta, site) is not None:
                ledgers.delta.replace(site, arrays, num_examples=stats.n, base_digest=base_digest, extra=extra)
            else:
                ledgers.delta.add(site, arrays, num_examples=stats.n, base_digest=base_digest, extra=extra)
        except RejectedContribution as err:
            raise ForgetRefused(f"the Δ ledger refused the retrained Δw: {err}") from None
        delta_done = "Δw replaced by the retrained one"
    try:
        if stats.n == 0:
            ledgers.stats.retract(site, reason)
        else:
            ledgers.stats.replace(site, stats.to_arrays(), num_examples=stats.n, base_digest=feature_digest,
                                  extra=extra)
    except RejectedContribution as err:
        if delta_done:  # cannot be undone: say so loudly (checks above make this unreachable in practice)
            log.error("forget request %s: Δw already replaced, statistics refused: %s", request.nonce, err)
            raise ForgetRefused(f"PARTIAL: the Δw was replaced but the stats ledger refused the statistics: {err}") from None
        raise ForgetRefused(f"the stats ledger refused the statistics: {err}") from None
    if not delta_done:
        retracted = ledgers.delta.retract(site, reason)
        delta_done = "Δw retracted (retrain and contribute again to restore it)" if retracted else "no active Δw"
    # a contribution waiting in quarantine was made from the data before the forgetting: admitted
    # later, it would bring the forgotten samples back
    held = ledgers.held is not None and ledgers.held.retract(site, reason)
    return (f"site {site} forgot {request.forgotten} sample(s): statistics now n = {stats.n}"
            f"{' (retracted: none remain)' if stats.n == 0 else ''}; {delta_done}"
            f"{'; its held contribution retracted from the quarantine' if held else ''} "
            f"(signer={request.signer}, nonce={request.nonce})")


def dp_head_ledger(ledger: Any) -> bool:
    """Does this statistics ledger hold DP head releases (its model card pins ``dp-head``)?"""
    return "dp-head" in (getattr(ledger, "model_card", None) or {})


def _replace_release(request: ForgetRequest, data: bytes, ledgers: Ledgers) -> str:
    """A DP site's fresh release replaces its active one (module docstring); its Δw is retracted."""
    from flwr.app import Array, ArrayRecord

    from server.exact_head import replace_release
    from server.replies import CONTRIBUTION_ID, DPHeadExpectation, Rejected, StatsExpectation
    from tangent.exact_head.dp import MECHANISM, RELEASE_WEIGHTS
    from tangent.exact_head.stats_file import load_release

    site, ledger = request.site_id, ledgers.stats
    try:
        arrays, meta = load_release(data)
    except StatsError as err:
        raise ForgetRefused(f"unreadable DP release file: {err}") from None
    active = _active(ledger, site)
    if active is None:
        raise ForgetRefused(f"site {site!r} has no active release in the stats ledger: nothing to forget from")
    if request.stats_replaces != active.delta_sha256:
        raise ForgetRefused(f"stale request: it replaces the release {request.stats_replaces}, but the site's "
                            f"active release is {active.delta_sha256} (re-create it against the current one)")
    if active.epsilon is None or active.delta_dp is None:
        raise ForgetRefused(f"site {site!r}'s active statistics in this DP head ledger are not a DP release")
    entry = meta.get("contribution-id")
    contribution_id = entry[:-len(":head")] if isinstance(entry, str) and entry.endswith(":head") else ""
    if not CONTRIBUTION_ID.fullmatch(contribution_id):
        raise ForgetRefused(f"the release's contribution-id {str(entry)[:80]!r} is not <128-bit hex>:head")
    used = {(c.extra or {}).get("contribution_id") for c in ledger.contributions(site_id=site)}
    if contribution_id in used:
        raise ForgetRefused(f"replayed release: contribution {contribution_id} is already in the stats ledger")
    card = ledger.model_card
    pinned, grid = card["dp-head"], card["stats-meta"]
    if pinned.get("mechanism") != MECHANISM:
        raise ForgetRefused(f"the stats ledger's DP head mechanism {pinned.get('mechanism')!r} is not {MECHANISM!r}")
    expectation = StatsExpectation(
        card["feature-digest"], int(grid["num-features"]), int(grid["num-classes"]), float(grid["clip-norm"]),
        int(grid["frac-bits"]), DPHeadExpectation(float(active.epsilon), None, int(pinned["dim"]), int(pinned["seed"]),
                                                  str(pinned["centre-digest"]), RELEASE_WEIGHTS))
    record = ArrayRecord({name: Array(np.asarray(value)) for name, value in arrays.items()})
    extra = {"forget-request": request.nonce, "forgotten": request.forgotten, "replaces": request.stats_replaces}
    try:
        replace_release(ledger, site, record, meta, expectation, delta=float(active.delta_dp),
                        contribution_id=contribution_id, extra=extra)
    except Rejected as err:
        raise ForgetRefused(f"the DP release is refused ({err.reason}): {err.detail}") from None
    retracted = ledgers.delta.retract(site, _ledger_reason(request))
    held = ledgers.held is not None and ledgers.held.retract(site, _ledger_reason(request))
    return (f"DP site {site} forgot {request.forgotten} sample(s): its DP head release replaced by a fresh one "
            f"(ε = {meta.get('dp-head-epsilon')}, contribution {contribution_id}); "
            f"{'Δw retracted (a DP-TAFT Δw is not retrained here: contribute again)' if retracted else 'no active Δw'}"
            f"{'; its held contribution retracted from the quarantine' if held else ''} "
            f"(signer={request.signer}, nonce={request.nonce})")


def _ledger_reason(request: ForgetRequest) -> str:
    return (f"forget-samples request {request.nonce} signed by {request.signer} at {request.timestamp}: "
            f"{request.forgotten} sample(s) forgotten")


def apply_forget_file(request_path: str | Path, stats_path: str | Path, delta_path: str | Path | None,
                      ledgers: Ledgers, ledger_path: str | Path, registry_path: str | Path,
                      max_age_s: float = MAX_AGE_S) -> ForgetRequest:
    """For the CLI: read the request (bounded, server.trust.withdrawal.read_request), verify, apply; the
    nonces live in the withdrawal store of the Δ ledger at ``ledger_path``."""
    registry = SiteRegistry(registry_path)
    with NonceStore(nonce_store_path(ledger_path)) as nonces:
        try:
            document = read_request(request_path)
        except WithdrawalRefused as err:  # oversized, too deep, not JSON: refused and recorded
            nonces.record(None, accepted=False, detail=f"forget-samples: {err}")
            log.warning("forget request REFUSED: %s", err)
            raise ForgetRefused(str(err)) from None
        return apply_forget(document, stats_path, delta_path, ledgers, registry, nonces, max_age_s=max_age_s)
