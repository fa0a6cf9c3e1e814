"""Parse and validate one site's reply (train or evaluate); every problem is a :class:`Rejected`.

A reply is hostile input: any record may be missing, of another record type, hold values of the
wrong type (a list where a number belongs, bytes where a string belongs), huge or deeply nested
JSON, or arrays whose serialization type, dtype, shape or bytes are bogus. Each check here raises
:class:`Rejected` with a machine-readable reason; :func:`stage` turns any other exception raised
while one part of the reply is read into a rejection with that part's reason, so a reply can never
raise anything else out of these functions (KeyboardInterrupt/SystemExit are not caught).

Two train-reply forms are accepted (the site's DP policy decides which it sends):

- non-DP: ``delta`` ArrayRecord; ``metrics`` (num-examples, train-loss, train-accuracy, epsilon=inf,
  delta=0, wall-s, fit-s, examples-per-s); ``meta`` (site-id, base-digest, dp=False, …);
- DP: ``metrics`` = {num-examples, epsilon, delta} only; ``meta`` = {site-id, base-digest,
  contribution-id, dp=True, dp-epsilon, dp-max-grad-norm, dp-noise-multiplier,
  train-config}. shard-fingerprint, data-digest, source, from-cache and pid are optional.

With the exact head on, a non-DP reply also carries the site's sufficient
statistics: ``stats`` (ArrayRecord of int64 n [1], counts [k], sums [p], gram [p(p+1)/2],
cross [p, k]) and ``stats-meta`` (num-features, num-classes, clip-norm, frac-bits,
feature-digest). Every problem with them refuses the WHOLE reply with a reason prefixed
``stats_`` — neither model records it — so the Δ ledger and the statistics ledger never disagree
about a site: a missing ``stats-meta`` (``stats_meta_missing``), a record of the wrong type
(``stats_malformed``), keys or values of the wrong type (``stats_bad_meta``), a grid or shape
other than the server's (``stats_grid_mismatch``), another feature digest
(``stats_feature_digest_mismatch``), array names, dtypes, shapes or bytes that are not exactly
the five int64 arrays (``stats_wrong_names``, ``stats_wrong_dtype``, ``stats_wrong_shape``,
``stats_bad_arrays``), n ≠ num-examples (``stats_n_mismatch``), statistics in a DP reply of a run
that asked for no DP head — they would be an unprotected release of the site's data —
(``stats_in_dp_reply``), and none in a reply while the exact head is on (``stats_missing``). With
the exact head off, a non-DP reply's statistics are ignored (never stored).

DP head (a DP run with ``dp-head-share``: :class:`DPHeadExpectation`): every reply is a DP reply
carrying the site's Gaussian release (tangent.exact_head.dp.site_centred_release, client/dp_head.py) and
nothing else (``dp_extra_records``; a non-DP reply is ``not_private``). Its ``stats-meta`` holds
the grid (k, classes, clip 1, frac-bits), the feature digest and exactly the mechanism's public
parameters (DP_STATS_META_KEYS); refused: the rows of another transform (k, seed or centre:
``stats_dp_transform_mismatch``), ε above the head's share of the request or above the reply's
own (composed) ε (``stats_dp_epsilon``), a δ other than the reply's (``stats_dp_delta``), σ's or a
noise variance other than those of the declared (ε, δ) (``stats_dp_noise_mismatch``), a release
that is not the DP head's (``stats_not_dp``), the row form,
and an n that is not the sum of the noisy counts (``stats_dp_not_post_processing``: an exact n
never leaves a DP site). n is noisy, so it is never
held to num-examples.

Over 500 lines: the checks of both reply kinds share the :func:`stage` / :class:`Rejected` rule and the
decoders under it; together they are the one place that says what a valid reply is.
"""
from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, Message

from server.trust import safejson
from tangent.protocol.limits import check_site_id
from tangent.protocol.text import escape_controls, is_printable

if TYPE_CHECKING:  # tangent.exact_head.statistics itself is imported where statistics are parsed
    from tangent.exact_head.statistics import SufficientStats

MAX_TRAIN_CONFIG_BYTES = 64 * 1024
MAX_JSON_DEPTH = 8
MAX_META_STRING = 1024
MAX_DETAIL = 2000
#: the ledger's per-contribution weight limit (fixedpoint.MAX_WEIGHT); evaluate counts use it too
MAX_EXAMPLES = 2 ** 24
CONTRIBUTION_ID = re.compile(r"[0-9a-f]{32}")
#: a client's error code is copied into the round summary as a reason: it must look like one
REASON_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,47}")
#: numeric train metrics the round summary keeps (weighted means); anything else is dropped
TRAIN_METRICS = ("num-examples", "train-loss", "train-accuracy", "epsilon", "delta", "wall-s", "fit-s",
                 "examples-per-s")
EVALUATE_METRICS = ("eval-loss", "eval-accuracy")


class Rejected(Exception):
    """A reply that is not recorded; ``reason`` is machine-readable."""

    def __init__(self, reason: str, detail: str = "", site_id: str | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.site_id = reason, detail, site_id
        self.retracted = False  # the site was taken out of both ledgers (server.strategy.record)


@dataclass
class Contribution:
    """A validated train reply, ready for the ledger."""
    site_id: str
    delta: dict  # name -> float32 numpy array
    num_examples: int
    meta: dict  # keyword arguments of Ledger.add/replace
    metrics: dict
    dp: bool = False
    stats: "SufficientStats | None" = None  # the exact head's statistics (None: none sent / exact head off)
    stats_bytes: int = 0  # bytes of the stats arrays as received
    feature_digest: str | None = None  # φ's digest the statistics were checked against
    #: the row form as received (tangent.exact_head.row_form: int32 rows + labels) when the site
    #: sent its rows rather than their sums; the statistics ledger stores the smaller form
    stats_rows: dict | None = None


#: the arrays of a statistics record in the Gram form (tangent.exact_head.statistics.SufficientStats.to_arrays)
STATS_ARRAYS = ("n", "counts", "sums", "gram", "cross")
#: ... and in the row form (tangent.exact_head.row_form): dtype of each
ROW_FORM_DTYPES = {"labels": "int64", "rows": "int32"}
STATS_META_KEYS = ("num-features", "num-classes", "clip-norm", "frac-bits", "feature-digest")
#: what a DP head's release declares beside the grid (client/dp_head.py): the mechanism's public
#: parameters, never a value of the site's data
DP_STATS_META_KEYS = ("dp", "dp-head-epsilon", "dp-head-delta", "dp-head-noise-variance", "dp-head-sigma-mean",
                      "dp-head-sigma-gram", "dp-head-sigma-cross", "dp-head-sigma-counts", "dp-head-mechanism",
                      "dp-head-dim", "dp-head-seed", "dp-head-centre-digest", "contribution-id")
#: the records a DP train reply may hold: the mechanisms' outputs and their public parameters
DP_REPLY_RECORDS = frozenset({"delta", "metrics", "meta", "stats", "stats-meta"})
#: relative tolerance of the declared noise against the one recomputed from the declared (ε, δ)
NOISE_RTOL = 1e-9


@dataclass(frozen=True)
class DPHeadExpectation:
    """What a DP run asked of the DP head (server.exact_head.DPHeadRequest): ``share`` of the μ² of
    a contribution of ε at most ``epsilon`` (tangent.exact_head.dp.head_epsilon; ``share`` None:
    ``epsilon`` bounds the release itself, as for a forget release), rows built with this
    projection (``dim``, ``seed``) and the centre of ``centre_digest``, released with ``weights``
    (tangent.exact_head.dp.RELEASE_WEIGHTS)."""
    epsilon: float
    share: float | None
    dim: int
    seed: int
    centre_digest: str
    weights: tuple


@dataclass(frozen=True)
class StatsExpectation:
    """What the server asked for (the train message's spec): the statistics' grid and φ's digest;
    ``dp_head``: the run asked for the DP head's release (then the grid is its rows': num-features
    k, clip-norm 1)."""
    feature_digest: str
    num_features: int
    num_classes: int
    clip_norm: float
    frac_bits: int
    dp_head: DPHeadExpectation | None = None

    @property
    def grid(self) -> dict[str, Any]:
        return {"num-features": self.num_features, "num-classes": self.num_classes,
                "clip-norm": float(self.clip_norm), "frac-bits": self.frac_bits}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        p, k = self.num_features, self.num_classes
        return {"n": (1,), "counts": (k,), "sums": (p,), "gram": (p * (p + 1) // 2,), "cross": (p, k)}


@contextmanager
def stage(reason: str, site_id: str | None = None) -> Iterator[None]:
    """Any exception but :class:`Rejected` inside becomes ``Rejected(reason)``; a Rejected without a
    site gets ``site_id``."""
    try:
        yield
    except Rejected as err:
        if err.site_id is None:
            err.site_id = site_id
        raise
    except Exception as err:  # noqa: BLE001 - hostile input: anything it triggers is a rejection
        raise Rejected(reason, f"{type(err).__name__}: {str(err)[:MAX_DETAIL]}", site_id) from None


def shown(value: Any, limit: int = 80) -> str:
    """A value from a reply, printable in a log or report whatever it is."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


# ----------------------------------------------------------------------------- shared pieces

def raise_if_error(msg: Message) -> None:
    """A Flower error or the site's own error record, as a rejection."""
    if msg.has_error():
        with stage("flower_error"):
            detail = f"code {msg.error.code}: {escape_controls(str(msg.error.reason)[:MAX_DETAIL])}"
        raise Rejected("flower_error", detail)
    with stage("malformed"):
        error = msg.content.config_records.get("error")
    if error is None:
        return
    with stage("malformed"):
        code, reason, site = error.get("code"), error.get("reason", ""), error.get("site-id")
    code = code if isinstance(code, str) and REASON_PATTERN.fullmatch(code) else "client_error"
    site = site if _valid_site_id(site) else None
    raise Rejected(code, escape_controls(str(reason)[:MAX_DETAIL]), site)


def records(msg: Message, **kinds: str) -> dict[str, Any]:
    """The named records (``name="array"|"metric"|"config"``); ``malformed`` when any is absent."""
    with stage("malformed"):
        content = msg.content
        views = {"array": content.array_records, "metric": content.metric_records,
                 "config": content.config_records}
        found = {name: views[kind].get(name) for name, kind in kinds.items()}
    missing = [f"{name} ({kind} record)" for name, kind in kinds.items() if found[name] is None]
    if missing:
        raise Rejected("malformed", f"reply lacks {', '.join(missing)}")
    return found


def declared_site(meta) -> str:
    """The site id the reply claims (a claim: the strategy binds it to the sender)."""
    with stage("malformed"):
        value = meta.get("site-id")
    try:
        return check_site_id(value)
    except ValueError as err:
        raise Rejected("bad_site_id", str(err)[:MAX_DETAIL]) from None


def _valid_site_id(value: Any) -> bool:
    try:
        check_site_id(value)
    except ValueError:
        return False
    return True


def count(value: Any, site: str | None) -> int:
    """An example count in [1, MAX_EXAMPLES] (an integral float is accepted: MetricRecord round trips)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_EXAMPLES:
        raise Rejected("bad_num_examples", shown(value), site)
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite_metrics(metrics, keys: tuple[str, ...], site: str | None) -> dict[str, float]:
    """The listed metrics that are present; ``bad_metrics`` when one is not a finite number."""
    out = {}
    for key in keys:
        if key in metrics:
            value = metrics[key]
            # ε = inf is how a non-DP reply says "no guarantee"; NaN is never a value
            if not _number(value) or math.isnan(value) or (key != "epsilon" and math.isinf(value)):
                raise Rejected("bad_metrics", f"{key} = {shown(value)}", site)
            out[key] = value
    return out


# ----------------------------------------------------------------------------- arrays

def decode_arrays(record: ArrayRecord, site: str | None) -> dict[str, np.ndarray]:
    """float32 arrays from an ArrayRecord, checked before any allocation.

    Flower's ``Array.numpy()`` trusts the ``.npy`` header: it would load an ``.npz`` archive, and
    allocates what the header declares before reading the bytes. Here the header must declare a
    little-endian float32 C-order array of exactly the shape the Array claims, and the bytes must
    be exactly that size; nothing is allocated beyond the buffer that arrived.
    """
    arrays = {}
    with stage("bad_arrays", site):
        items = list(record.items())
    if not items:
        raise Rejected("bad_arrays", "the delta record holds no arrays", site)
    for name, array in items:
        with stage("bad_arrays", site):
            arrays[name] = decode_array(name, array)
    return arrays


def decode_array(name: str, array, dtype: str = "float32", reason: str = "bad_arrays", *,
            dtype_reason: str | None = None, copy: bool = True) -> np.ndarray:
    """One Array of ``dtype`` (little-endian, C order), its header and size checked against its
    declared shape before anything is allocated. ``copy=False`` returns a read-only view of the
    received bytes (the statistics: 49 MiB that need not exist twice)."""
    if array.stype != "numpy.ndarray":
        raise Rejected(reason, f"{shown(name)}: serialization type {shown(array.stype)}")
    if array.dtype != dtype:
        raise Rejected(dtype_reason or reason, f"{shown(name)}: dtype {shown(array.dtype)}, expected {dtype}")
    shape = tuple(array.shape)
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise Rejected(reason, f"{shown(name)}: shape {shown(shape)}")
    wanted = np.dtype(dtype).newbyteorder("<")
    data = array.data
    buffer = io.BytesIO(data)
    version = np.lib.format.read_magic(buffer)
    header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
              np.lib.format.read_array_header_2_0)(buffer, max_header_size=1024)
    header_shape, fortran_order, header_dtype = header
    if header_dtype != wanted or fortran_order or tuple(header_shape) != shape:
        raise Rejected(reason, f"{shown(name)}: header {shown(header)} does not match {dtype} {shape}")
    expected = wanted.itemsize * math.prod(shape)
    body = memoryview(data)[buffer.tell():]
    if len(body) != expected:
        raise Rejected(reason, f"{shown(name)}: {len(body)} bytes for {expected}")
    out = np.frombuffer(body, dtype=wanted).reshape(shape)
    return out.copy() if copy else out


# ----------------------------------------------------------------------------- train

def released_privacy(msg: Message) -> tuple[float, float] | None:
    """The privacy loss a train reply claims for what it carries, whether or not the reply is then
    recorded: the server saw it either way. None: it carries no update (an error, a refusal, a
    reply without a ``delta``); (ε, δ) of a DP reply; (∞, 0) for anything else with a ``delta``
    (non-DP, or a DP claim that cannot be read: its loss is unknown)."""
    try:
        if msg.has_error() or "delta" not in msg.content.array_records:
            return None
        metrics = msg.content.metric_records.get("metrics")
        meta = msg.content.config_records.get("meta")
        dp = meta is not None and meta.get("dp", False) is True
        epsilon = metrics.get("epsilon") if metrics is not None else None
        delta = metrics.get("delta", 0.0) if metrics is not None else None
        head = _head_privacy(msg) if dp else (0.0, 0.0)
    except Exception:  # noqa: BLE001 - an unreadable reply still carried an update
        return math.inf, 0.0
    if (dp and _number(epsilon) and _number(delta) and math.isfinite(epsilon) and epsilon >= 0
            and 0 <= delta < 1):
        # the reply's ε is the contribution's composition, the head's release included; a claim
        # below one of its parts is not believed
        return max(float(epsilon), head[0]), max(float(delta), head[1])
    return math.inf, 0.0


def _head_privacy(msg: Message) -> tuple[float, float]:
    """(ε, δ) a DP reply's statistics claim for the DP head's release alone (a part of the reply's
    composed ε); (0, 0) without statistics; (∞, 0) for statistics whose claim cannot be read."""
    content = msg.content
    if "stats" not in content and "stats-meta" not in content:
        return 0.0, 0.0
    meta = content.config_records.get("stats-meta")
    epsilon = meta.get("dp-head-epsilon") if meta is not None else None
    delta = meta.get("dp-head-delta") if meta is not None else None
    if (meta is not None and meta.get("dp") is True and _number(epsilon) and _number(delta)
            and math.isfinite(epsilon) and epsilon >= 0 and 0 <= delta < 1):
        return float(epsilon), float(delta)
    return math.inf, 0.0


def parse_train_reply(msg: Message, expected_base_digest: str, *, require_dp: bool = False,
                      bind: Callable[[str], str] | None = None,
                      stats: StatsExpectation | None = None,
                      check_count: Callable[[str, int], None] | None = None) -> Contribution:
    """Validate one train reply; raises :class:`Rejected`. (The ledger checks the tensors' spec.)

    ``bind`` maps the declared site id to the sender's registered one (or rejects it); it runs
    right after the site id is read, so an impostor is reported as such whatever else is wrong.
    ``stats``: the exact head is on and a non-DP reply must carry statistics on this grid.
    ``check_count(site, num_examples)`` (the registered cap) runs as soon as the count is read:
    before any array is decoded or a row form's Gram matrix is formed (O(n·p²)).
    """
    raise_if_error(msg)
    found = records(msg, delta="array", metrics="metric", meta="config")
    meta, metrics = found["meta"], found["metrics"]
    site = declared_site(meta)
    if bind is not None:
        site = bind(site)
    with stage("malformed", site):
        digest = meta.get("base-digest")
        num_examples = metrics.get("num-examples")
        dp = meta.get("dp", False)
    if digest != expected_base_digest:
        raise Rejected("base_digest_mismatch", f"{shown(digest)} != {expected_base_digest}", site)
    num_examples = count(num_examples, site)
    if check_count is not None:
        check_count(site, num_examples)
    if not isinstance(dp, bool):
        raise Rejected("bad_meta", f"dp = {shown(dp)} is not a boolean", site)
    if require_dp and not dp:
        raise Rejected("not_private", "this run accepts differentially private contributions only", site)
    if dp:
        with stage("malformed", site):
            extra = sorted(set(msg.content.keys()) - DP_REPLY_RECORDS)
        if extra:  # anything else would be a release no mechanism covers
            raise Rejected("dp_extra_records", f"a DP reply carries {shown(extra, 200)} beyond "
                                               f"{sorted(DP_REPLY_RECORDS)}", site)
    with stage("bad_metrics", site):
        kept = finite_metrics(metrics, TRAIN_METRICS, site)
    kept["num-examples"] = num_examples
    with stage("bad_meta", site):
        ledger_meta = _ledger_meta(meta, kept, dp, site)
    delta = decode_arrays(found["delta"], site)
    sufficient, stats_bytes, rows = parse_stats(msg, stats, dp=dp, num_examples=num_examples, site=site,
                                                reply_meta=ledger_meta)
    return Contribution(site, delta, num_examples, ledger_meta, kept, dp, sufficient, stats_bytes,
                        None if sufficient is None else stats.feature_digest, rows)


def _ledger_meta(meta, metrics: dict, dp: bool, site: str) -> dict[str, Any]:
    epsilon, delta_dp = metrics.get("epsilon"), metrics.get("delta", 0.0)
    if dp and (epsilon is None or not math.isfinite(epsilon) or epsilon < 0):
        raise Rejected("bad_meta", f"DP contribution with epsilon {shown(epsilon)}", site)
    if dp and not 0 <= delta_dp < 1:
        raise Rejected("bad_meta", f"DP contribution with delta {shown(delta_dp)}", site)
    optional = {key: _optional_string(meta, key, site)
                for key in ("shard-fingerprint", "data-digest", "source", "contribution-id")}
    if optional["contribution-id"] is not None and not CONTRIBUTION_ID.fullmatch(optional["contribution-id"]):
        raise Rejected("bad_meta", f"contribution-id {shown(optional['contribution-id'])} is not 128-bit hex",
                       site)
    settings = {"dp": dp}
    for key, name in (("dp-epsilon", "target_epsilon"), ("dp-max-grad-norm", "max_grad_norm"),
                      ("dp-noise-multiplier", "noise_multiplier")):
        value = meta.get(key)
        if value is not None and not _number(value):
            raise Rejected("bad_meta", f"{key} = {shown(value)} is not a number", site)
        settings[name] = value if value is None or math.isfinite(value) else None
    train_config = meta.get("train-config", "{}")
    try:
        train_config = safejson.loads(train_config, max_bytes=MAX_TRAIN_CONFIG_BYTES, max_depth=MAX_JSON_DEPTH)
    except ValueError as err:
        raise Rejected("bad_meta", f"train-config: {err}", site) from None
    if not isinstance(train_config, dict):
        raise Rejected("bad_meta", "train-config is not a JSON object", site)
    extra = {"data_digest": optional["data-digest"], "source": optional["source"]}
    if optional["contribution-id"] is not None:
        extra["contribution_id"] = optional["contribution-id"]
    return {"epsilon": float(epsilon) if dp else None,
            "delta_dp": float(delta_dp) if dp else None,
            "dp_settings": settings, "shard_fingerprint": optional["shard-fingerprint"],
            "base_digest": meta.get("base-digest"), "train_config": train_config, "extra": extra}


def _optional_string(meta, key: str, site: str) -> str | None:
    value = meta.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_META_STRING:
        raise Rejected("bad_meta", f"{key} = {shown(value)} is not a string of at most {MAX_META_STRING}", site)
    if not is_printable(value):  # it is printed by taft-ledger show: no escape sequences in
        raise Rejected("bad_meta", f"{key} = {shown(value)} holds control characters", site)
    return value


# ----------------------------------------------------------------------------- exact-head statistics

def parse_stats(msg: Message, expected: StatsExpectation | None, *, dp: bool, num_examples: int,
                site: str, reply_meta: dict | None = None) -> tuple["SufficientStats | None", int, dict | None]:
    """(statistics, bytes received, the row form's arrays or None) of a train reply; see the module
    docstring for the reasons. ``reply_meta``: the reply's ledger meta (_ledger_meta), which a DP
    head's release is checked against (its δ and contribution id)."""
    with stage("stats_malformed", site):
        content = msg.content
        present = {name: name in content for name in ("stats", "stats-meta")}
        record = content.array_records.get("stats")
        meta = content.config_records.get("stats-meta")
    dp_head = None if expected is None else expected.dp_head
    if dp and any(present.values()) and dp_head is None:
        raise Rejected("stats_in_dp_reply", "a DP reply carries statistics, and this run asked for no DP head's "
                                            "release (they would be an unprotected release): refused", site)
    if dp_head is not None and not dp:
        raise Rejected("not_private", "this run asked for the DP head's release: a non-DP reply is refused", site)
    if expected is None or (dp and dp_head is None):
        return None, 0, None  # exact head off: a non-DP site's statistics are not asked for and not kept
    if not any(present.values()):
        raise Rejected("stats_missing", "the exact head is on: a reply must carry stats and stats-meta", site)
    if present["stats"] and record is None:
        raise Rejected("stats_malformed", "stats is not an ArrayRecord", site)
    if present["stats-meta"] and meta is None:
        raise Rejected("stats_malformed", "stats-meta is not a ConfigRecord", site)
    if record is None:
        raise Rejected("stats_missing", "stats-meta without the stats record", site)
    if meta is None:
        raise Rejected("stats_meta_missing", "stats without the stats-meta record", site)
    if dp_head is not None:
        return parse_dp_release(record, dict(meta.items()), expected, reply_meta or {}, site)
    with stage("stats_bad_meta", site):
        _check_stats_meta(dict(meta.items()), expected, site)
    with stage("stats_bad_arrays", site):
        names = sorted(record.keys())
    if names == sorted(ROW_FORM_DTYPES):
        return _row_form(record, expected, num_examples, site)
    arrays, received = _stats_arrays(record, expected, site)
    n = int(arrays["n"][0])
    if n != num_examples:
        raise Rejected("stats_n_mismatch", f"statistics of n = {n} examples, num-examples = {num_examples}", site)
    from tangent.exact_head.statistics import SufficientStats

    with stage("stats_bad_arrays", site):
        return SufficientStats.from_arrays(arrays, expected.grid), received, None


def _row_form(record: ArrayRecord, expected: StatsExpectation, num_examples: int,
              site: str) -> tuple["SufficientStats", int, dict]:
    """The row form (int32 rows [n, p], int64 labels [n]): dtypes and declared shapes checked
    before decoding, then the statistics formed here, exactly as the site would have summed them
    (values off the grid or labels out of range: ``stats_bad_arrays``)."""
    from tangent.exact_head.row_form import stats_of_rows

    shapes = {"rows": (num_examples, expected.num_features), "labels": (num_examples,)}
    arrays, received = {}, 0
    for name, dtype_wanted in ROW_FORM_DTYPES.items():
        array = record[name]
        with stage("stats_bad_arrays", site):
            declared, dtype = tuple(array.shape), array.dtype
            received += len(array.data)
        if dtype != dtype_wanted:
            raise Rejected("stats_wrong_dtype", f"{name}: dtype {shown(dtype)}, expected {dtype_wanted}", site)
        if declared != shapes[name]:
            raise Rejected("stats_n_mismatch" if declared[:1] != shapes[name][:1] else "stats_wrong_shape",
                           f"{name}: shape {shown(declared)}, expected {shapes[name]} (num-examples = {num_examples})",
                           site)
        with stage("stats_bad_arrays", site):
            arrays[name] = decode_array(name, array, dtype_wanted, "stats_bad_arrays", copy=False)
    with stage("stats_bad_arrays", site):
        stats = stats_of_rows(arrays, expected.num_features, expected.num_classes, expected.clip_norm,
                              expected.frac_bits)
    return stats, received, arrays


def parse_dp_release(record: ArrayRecord, meta: dict, expected: StatsExpectation, reply_meta: dict,
                     site: str) -> tuple["SufficientStats", int, None]:
    """The DP head's release (tangent.exact_head.dp.site_centred_release): the grid and feature
    digest as for exact statistics; the transform (k, seed, centre digest) the run sent; ε at most
    the head's share of the request (recomputed here at the reply's δ) and at most the reply's
    composed ε; δ the reply's; the declared σ's and noise variance exactly those of the declared
    (ε, δ); the five int64 arrays only (no row form), with n = Σ counts (post-processing of the
    noisy counts: an exact n is refused; ``sums`` is the noisy Σ of the rows before the site's
    centring, a block of its own). n is noisy: it is never held to num-examples."""
    from tangent.exact_head import dp as dp_release
    from tangent.exact_head.statistics import SufficientStats

    want = expected.dp_head
    with stage("stats_bad_meta", site):
        _check_stats_meta(meta, expected, site, extra_keys=DP_STATS_META_KEYS)
        for key in ("dp-head-dim", "dp-head-seed"):
            if not isinstance(meta[key], int) or isinstance(meta[key], bool):
                raise Rejected("stats_bad_meta", f"{key} = {shown(meta[key])} is not an integer", site)
        numbers = ("dp-head-epsilon", "dp-head-delta", "dp-head-noise-variance", "dp-head-sigma-mean",
                   "dp-head-sigma-gram", "dp-head-sigma-cross", "dp-head-sigma-counts")
        for key in numbers:
            if not _number(meta[key]) or not math.isfinite(meta[key]):
                raise Rejected("stats_bad_meta", f"{key} = {shown(meta[key])} is not a finite number", site)
        if meta["dp"] is not True or meta["dp-head-mechanism"] != dp_release.MECHANISM:
            raise Rejected("stats_not_dp", f"dp = {shown(meta['dp'])}, mechanism {shown(meta['dp-head-mechanism'])}: "
                                           f"not the DP head's release", site)
        transform = (meta["dp-head-dim"], meta["dp-head-seed"], meta["dp-head-centre-digest"])
        if transform != (want.dim, want.seed, want.centre_digest):
            raise Rejected("stats_dp_transform_mismatch", f"rows of (k, seed, centre) {shown(transform, 200)}, "
                                                          f"the run sent {(want.dim, want.seed, want.centre_digest)}",
                           site)
        epsilon, delta = float(meta["dp-head-epsilon"]), float(meta["dp-head-delta"])
        if not 0 < delta < 1 or delta != reply_meta.get("delta_dp"):
            raise Rejected("stats_dp_delta", f"dp-head-delta = {delta:g}, the reply's δ {reply_meta.get('delta_dp')}",
                           site)
        allowed = want.epsilon if want.share is None else dp_release.head_epsilon(want.epsilon, delta, want.share)
        if not 0 < epsilon <= allowed * (1 + NOISE_RTOL):
            raise Rejected("stats_dp_epsilon", f"dp-head-epsilon = {epsilon:g}: at most {allowed:g} is allowed "
                                               f"(ε = {want.epsilon:g}, head share {want.share})", site)
        composed = reply_meta.get("epsilon")
        if composed is not None and composed < epsilon * (1 - NOISE_RTOL):
            raise Rejected("stats_dp_epsilon", f"the reply's ε = {composed:g} is below its head's {epsilon:g}: a "
                                               "composition spends at least each of its parts", site)
        if meta["contribution-id"] != f"{(reply_meta.get('extra') or {}).get('contribution_id')}:head":
            raise Rejected("stats_bad_meta", f"contribution-id {shown(meta['contribution-id'])} is not the reply's "
                                             "contribution id + ':head'", site)
        noise = dp_release.release_noise(epsilon, delta, want.weights, expected.num_features, expected.frac_bits)
        for name, value in noise.items():
            if not math.isclose(meta[f"dp-head-{name}"], value, rel_tol=NOISE_RTOL):
                raise Rejected("stats_dp_noise_mismatch", f"dp-head-{name} = {meta[f'dp-head-{name}']!r}, the "
                                                          f"release at ε = {epsilon:g}, δ = {delta:g} has {value!r}",
                               site)
    arrays, received = _stats_arrays(record, expected, site)
    if int(arrays["n"][0]) != int(arrays["counts"].sum()):
        raise Rejected("stats_dp_not_post_processing", "n must be Σ of the noisy counts (the site's exact count "
                                                        "never leaves it)", site)
    release = {"releases": 1, "noise_variance": noise["noise-variance"], "epsilon": epsilon, "delta": delta,
               "mechanism": dp_release.MECHANISM}
    with stage("stats_bad_arrays", site):
        return SufficientStats.from_arrays(arrays, expected.grid, dp=release), received, None


def _check_stats_meta(meta: dict, expected: StatsExpectation, site: str, extra_keys: tuple[str, ...] = ()) -> None:
    missing = [key for key in STATS_META_KEYS + extra_keys if key not in meta]
    if missing:
        raise Rejected("stats_meta_missing", f"stats-meta lacks {', '.join(missing)}", site)
    unknown = sorted(set(meta) - set(STATS_META_KEYS) - set(extra_keys))
    if unknown:
        raise Rejected("stats_bad_meta", f"stats-meta has unknown keys {shown(unknown)}", site)
    for key in ("num-features", "num-classes", "frac-bits"):
        if not isinstance(meta[key], int) or isinstance(meta[key], bool):
            raise Rejected("stats_bad_meta", f"{key} = {shown(meta[key])} is not an integer", site)
    if not _number(meta["clip-norm"]) or not math.isfinite(meta["clip-norm"]):
        raise Rejected("stats_bad_meta", f"clip-norm = {shown(meta['clip-norm'])} is not a finite number", site)
    if not isinstance(meta["feature-digest"], str):
        raise Rejected("stats_bad_meta", f"feature-digest = {shown(meta['feature-digest'])} is not a string", site)
    grid = {key: meta[key] for key in expected.grid}
    if grid != expected.grid:
        raise Rejected("stats_grid_mismatch", f"{shown(grid, 200)} != the server's {expected.grid}", site)
    if meta["feature-digest"] != expected.feature_digest:
        raise Rejected("stats_feature_digest_mismatch",
                       f"{shown(meta['feature-digest'])} != {expected.feature_digest}", site)


def _stats_arrays(record: ArrayRecord, expected: StatsExpectation, site: str) -> tuple[dict[str, np.ndarray], int]:
    """The five int64 arrays, names, dtypes, declared shapes and bytes checked before decoding."""
    with stage("stats_bad_arrays", site):
        items = dict(record.items())
    if sorted(items) != sorted(STATS_ARRAYS):
        raise Rejected("stats_wrong_names", f"{shown(sorted(items), 200)}, expected {list(STATS_ARRAYS)}", site)
    shapes = expected.shapes()
    arrays, received = {}, 0
    for name in STATS_ARRAYS:
        array = items[name]
        with stage("stats_bad_arrays", site):
            declared, dtype = tuple(array.shape), array.dtype
            received += len(array.data)
        if dtype != "int64":
            raise Rejected("stats_wrong_dtype", f"{name}: dtype {shown(dtype)}, expected int64", site)
        if declared != shapes[name]:
            raise Rejected("stats_wrong_shape", f"{name}: shape {shown(declared)}, expected {shapes[name]}", site)
        with stage("stats_bad_arrays", site):
            arrays[name] = decode_array(name, array, "int64", "stats_bad_arrays", copy=False)
    return arrays, received


# ----------------------------------------------------------------------------- evaluate

#: the largest evaluate loss a reply may report: a mean cross-entropy of 100 nats is a probability of
#: e^-100 on the true class, far beyond any model the run composes; a larger value is a lie, and it
#: would dominate the federated mean
MAX_EVAL_LOSS = 100.0


def parse_evaluate_reply(msg: Message, bind: Callable[[str], str] | None = None) -> tuple[str, dict[str, float]]:
    """(site id, {num-examples, eval-loss, eval-accuracy}); raises :class:`Rejected`.

    ``bad_metrics`` unless eval-accuracy is in [0, 1] and eval-loss in [0, MAX_EVAL_LOSS] (each where
    present); num-examples in [1, MAX_EXAMPLES] (the strategy also holds it to the site's registered cap)."""
    raise_if_error(msg)
    found = records(msg, metrics="metric", meta="config")
    site = declared_site(found["meta"])
    if bind is not None:
        site = bind(site)
    with stage("bad_metrics", site):
        metrics = found["metrics"]
        num_examples = count(metrics.get("num-examples"), site)
        kept = finite_metrics(metrics, EVALUATE_METRICS, site)
    if not 0.0 <= kept.get("eval-accuracy", 0.0) <= 1.0:
        raise Rejected("bad_metrics", f"eval-accuracy = {shown(kept['eval-accuracy'])} is not in [0, 1]", site)
    if not 0.0 <= kept.get("eval-loss", 0.0) <= MAX_EVAL_LOSS:
        raise Rejected("bad_metrics", f"eval-loss = {shown(kept['eval-loss'])} is not in [0, {MAX_EVAL_LOSS:g}]", site)
    return site, kept | {"num-examples": num_examples}
