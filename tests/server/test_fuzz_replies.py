"""Fuzz: thousands of corrupted train and evaluate replies through the real LedgerFedAvg.

Every reply is a real Flower ``Message`` built as Flower builds a reply (``reply_to`` an
instruction, so ``src_node_id`` is the sender) and passed through Flower's protobuf serialization
and back (what a SuperNode can actually send), with records corrupted at random: records missing
or of the wrong type, values of the wrong type, nested/huge/NaN JSON, 5,000-digit numbers, odd
site ids, ArrayRecord arrays with bogus serialization type, dtype, shape and corrupt bytes,
reserved tensor names, Flower errors and site error records, duplicates, non-DP replies in a DP
round and, in deployment mode, replies from the wrong, unregistered or revoked node; evaluate
replies with an accuracy outside [0, 1], a negative or huge loss, or (deployment) more examples
than the site's registered cap. Valid replies
(both the non-DP and the DP form) are interleaved. For every round: it completes, each corrupted
reply is a counted rejection with a machine-readable reason, each valid one is recorded, and the
round summary serialises. Afterwards the ledger verifies and holds exactly the valid sites.

The exact head is on: every valid non-DP reply also carries its sufficient statistics,
and the corruptions include statistics records that are missing, of the wrong record type, with
wrong meta, grid or feature digest, array names, dtypes, shapes and bytes, n != num-examples,
statistics in a DP reply, and statistics the statistics ledger itself refuses (counts that do not
sum to n, a negative Gram diagonal, cross sums beyond a class's count, a Gram diagonal too small
for the sums) after the Δ ledger accepted the Δw. Valid replies send their statistics as sums or, 30 % of them,
as their rows (the row form), and row forms are corrupted too: a row off the clip ball or off the
grid, labels out of range, rows and labels of another n, other dtypes and widths, a Gram's array
beside the rows, bytes that do not match the header. Afterwards both ledgers
verify, the statistics ledger holds exactly the sites whose current contribution carried
statistics, and its composed statistics are the sum of exactly those sites' statistics.
"""
from __future__ import annotations

import io
import json
import math
import re
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from server.ledger import Ledger
from server.replies import Rejected, decode_array
from server.strategy import LedgerFedAvg
from tangent.exact_head.row_form import is_row_form, row_arrays
from tangent.exact_head.statistics import SufficientStats, quantize
from tests.server.exact_head_replies import EXPECT, FEATURE_DIGEST, open_stats_ledger, site_stats

BASE = "b" * 64
SHAPES = {"a.weight": (2, 3), "b.bias": (4,)}
SPEC = {"backbone": "tiny", "img-size": 28, "seed": 0, "num-classes": 3}
CASES = 2000
ROUND_SIZE = 40
REASON = re.compile(r"[a-z][a-z0-9_]{0,47}")

pytestmark = pytest.mark.usefixtures("flower_server_identity")


# ----------------------------------------------------------------------------- valid replies

def instruction(node_id: int, kind: str = "train") -> Message:
    return Message(RecordDict({"spec": ConfigRecord(SPEC | {"base-digest": BASE})}), dst_node_id=node_id,
                   message_type=kind)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def valid_parts(rng: np.random.Generator, site: str, dp: bool) -> dict:
    """The records of a valid train reply as plain dicts, so a mutation can edit them."""
    arrays = {name: Array((0.01 * rng.standard_normal(shape)).astype(np.float32)) for name, shape in SHAPES.items()}
    if dp:  # the DP form carries nothing data-dependent beyond the mechanism
        metrics = {"num-examples": 128, "epsilon": 2.0, "delta": 1e-6}
        meta = {"site-id": site, "base-digest": BASE, "contribution-id": rng.bytes(16).hex(), "dp": True,
                "dp-epsilon": 2.0, "dp-max-grad-norm": 1.0, "dp-noise-multiplier": 1.1,
                "train-config": json.dumps({"epochs": 1, "dp": True})}
    else:
        metrics = {"num-examples": int(rng.integers(1, 500)), "train-loss": 1.0, "train-accuracy": 0.5,
                   "epsilon": math.inf, "delta": 0.0, "wall-s": 1.0, "fit-s": 0.5, "examples-per-s": 100.0}
        meta = {"site-id": site, "base-digest": BASE, "shard-fingerprint": f"fp-{site}", "data-digest": "dd",
                "source": "test", "from-cache": False, "dp": False, "dp-epsilon": 8.0,
                "dp-max-grad-norm": 1.0, "dp-noise-multiplier": 0.0, "train-config": json.dumps({"epochs": 1}),
                "pid": 4242}
    parts = {"delta": ("array", arrays), "metrics": ("metric", metrics), "meta": ("config", meta)}
    if not dp:  # a non-DP reply carries the exact head's statistics too, as sums or (30 %) as its rows
        stats = site_stats(int(rng.integers(2 ** 31)), metrics["num-examples"])
        arrays = stats.to_arrays() if rng.random() >= 0.3 else site_rows(rng, metrics["num-examples"])
        parts["stats"] = ("array", {k: Array(v) for k, v in arrays.items()})
        parts["stats-meta"] = ("config", stats.meta() | {"feature-digest": FEATURE_DIGEST})
    return parts


def site_rows(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """The row form of n random rows φ (‖φ‖ < C) and labels on the test grid."""
    phi = rng.standard_normal((n, EXPECT.num_features))
    phi *= (0.9 * EXPECT.clip_norm) * rng.random((n, 1)) / np.linalg.norm(phi, axis=1, keepdims=True)
    q = quantize(phi, EXPECT.clip_norm, EXPECT.frac_bits)
    return row_arrays(q, rng.integers(0, EXPECT.num_classes, n), EXPECT.frac_bits)


def sent_stats(parts: dict) -> SufficientStats:
    """The statistics a (valid) reply carries, as the server must have recorded them."""
    arrays = {name: array.numpy() for name, array in parts["stats"][1].items()}
    if is_row_form(arrays):
        return SufficientStats.from_rows(arrays["rows"], arrays["labels"], EXPECT.num_classes, EXPECT.clip_norm,
                                         EXPECT.frac_bits)
    return SufficientStats.from_arrays(arrays, EXPECT.grid)


def build(parts: dict, node_id: int, kind: str = "train") -> Message:
    content = RecordDict()
    for name, (record_type, values) in parts.items():
        if record_type == "array":
            content[name] = ArrayRecord(dict(values)) if values else ArrayRecord()
        elif record_type == "metric":
            content[name] = MetricRecord(dict(values))
        else:
            content[name] = ConfigRecord(dict(values))
    return over_the_wire(Message(content, reply_to=instruction(node_id, kind)))


def over_the_wire(msg: Message) -> Message:
    """The reply as the ServerApp receives it: through Flower's protobuf serialization and back."""
    from flwr.common.serde import message_from_proto, message_to_proto

    return message_from_proto(message_to_proto(msg))


# ----------------------------------------------------------------------------- corruptions

ODD_SITE_IDS = ["", "²", "٣", "a/b", "../x", "x" * 65, "-a", " 1", "a b", "é", "\u202e1", "1\n", "a\x00b",
                3, 1.5, True, b"3", [1, 2], ["a"], "__metadata__/"]
NOT_JSON_OBJECTS = ["[" * 100_000 + "]" * 100_000, "{" * 60, "1" * 5000, json.dumps("x" * (70 * 1024)),
                    "NaN", '{"a": NaN}', "not json", b"\xff\xfe{}", "[1, 2]", 5, ["a"], '"a"',
                    '{"a":' * 9 + "1" + "}" * 9, '{"a": 1' + "0" * 5000 + "}", True, 1.5]


def _header_bytes(shape, descr="<f4", fortran=False, body=b"") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buffer.getvalue() + body


def _npz(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("arr_0.npy", npy(array))
    return buffer.getvalue()


def corrupt_array(rng: np.random.Generator, name: str, shape: tuple) -> Array:
    good = (0.01 * rng.standard_normal(shape)).astype(np.float32)
    data = npy(good)
    size = int(np.prod(shape))
    choice = int(rng.integers(16))
    if choice == 0:
        return Array(dtype="float32", shape=shape, stype=str(rng.choice(["torch.Tensor", "", "pickle", "NUMPY"])),
                     data=data)
    if choice == 1:
        return Array(dtype=str(rng.choice(["float64", "int8", "<f4", "object", ""])), shape=shape,
                     stype="numpy.ndarray", data=data)
    if choice == 2:
        return Array(dtype="float32", shape=tuple(reversed(shape)) + (1,), stype="numpy.ndarray", data=data)
    if choice == 3:
        return Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=rng.bytes(int(rng.integers(0, 200))))
    if choice == 4:
        return Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=data[: int(rng.integers(0, len(data)))])
    if choice == 5:
        return Array(dtype="float32", shape=shape, stype="numpy.ndarray",
                     data=data + rng.bytes(int(rng.integers(1, 64))))
    if choice == 6:
        return Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=_npz(good))
    if choice == 7:  # header declares 4 TB: must be refused before anything is allocated
        return Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=_header_bytes((10 ** 12,)))
    if choice == 8:
        return Array(dtype="float32", shape=shape, stype="numpy.ndarray",
                     data=_header_bytes(shape, descr=">f4", body=good.astype(">f4").tobytes()))
    if choice == 9:
        return Array(dtype="float32", shape=shape, stype="numpy.ndarray",
                     data=_header_bytes(shape, fortran=True, body=good.tobytes()))
    if choice == 10:
        return Array(dtype="float32", shape=shape, stype="numpy.ndarray",
                     data=_header_bytes(shape, descr="|O", body=b"\x80\x04N." * size))
    if choice == 11:
        return Array(good.astype(np.float64))  # a real float64 array
    if choice == 12:
        bad = good.copy()
        bad.flat[int(rng.integers(size))] = rng.choice([np.nan, np.inf, -np.inf])
        return Array(bad)
    if choice == 13:
        return Array(np.full(shape, 1e6, np.float32))  # out of the fixed-point range
    if choice == 14:
        return Array(np.full(shape, 100.0, np.float32))  # norm far above max-delta-norm
    return Array(dtype="float32", shape=(), stype="numpy.ndarray", data=data)


def corrupt_stats(rng: np.random.Generator, parts: dict) -> str:
    """Corrupt (or, in a DP reply, add) the exact head's statistics; returns the corruption."""
    if parts.get("stats", ("",))[0] != "array" or parts.get("stats-meta", ("",))[0] != "config":
        good = site_stats(int(rng.integers(2 ** 31)), 10)  # a DP reply, or records already retyped/dropped
        parts["stats"] = ("array", {k: Array(v) for k, v in good.to_arrays().items()})
        parts["stats-meta"] = ("config", good.meta() | {"feature-digest": FEATURE_DIGEST})
        return "stats_added"
    arrays, meta = parts["stats"][1], parts["stats-meta"][1]
    if is_row_form(arrays) and rng.random() < 0.7:
        return corrupt_rows(rng, arrays)

    def value(name: str) -> np.ndarray:
        """The array's int64 values, or — when an earlier corruption broke it — a stand-in (never
        ``Array.numpy()`` on a corrupted header: it would allocate what the header declares)."""
        try:
            return decode_array(name, arrays[name], "int64").copy()
        except (Rejected, KeyError, ValueError, TypeError):
            return np.zeros(3, np.int64)

    how = int(rng.integers(14))
    if how == 12:  # every entry within n·2^b, rows of cross still summing to s: no data set has these
        cross, counts, n = value("cross").reshape(-1, 3), value("counts"), int(value("n")[0])
        if cross.shape[0] and len(counts) == 3:
            empty = int(np.argmin(counts))
            shift = (int(counts[empty]) + 1) * 2 ** 16  # beyond count·2^b for that class
            cross[0, empty] += shift
            cross[0, (empty + 1) % 3] -= shift
            arrays["cross"] = Array(cross.reshape(-1, 3).copy())
            return "stats_inconsistent_cross"
        how = 13
    if how == 13:  # the Gram diagonal too small for the sums (Cauchy–Schwarz: s_i² ≤ n·G_ii)
        gram = value("gram")
        gram[0] = 0
        if int(value("sums")[0]) != 0:
            arrays["gram"] = Array(gram)
            return "stats_inconsistent_gram"
        how = 10
    if how == 0:
        parts.pop(str(rng.choice(["stats", "stats-meta"])))
    elif how == 1:
        key = str(rng.choice(sorted(meta)))
        value = rng.choice(np.array([None, "x", -1, True, b"\x00", [1], 2 ** 40, math.nan], dtype=object))
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    elif how == 2:
        key = str(rng.choice(["feature-digest", "frac-bits", "num-features", "num-classes", "clip-norm"]))
        meta[key] = {"feature-digest": "e" * 64, "frac-bits": 12, "num-features": 7, "num-classes": 2,
                     "clip-norm": 3.0}[key]
    elif how == 3:
        meta[str(rng.choice(["extra", "dp", "__metadata__"]))] = "x"
    elif how == 4:
        name = str(rng.choice(sorted(arrays)))
        arrays[name] = Array(value(name).astype(str(rng.choice(["float64", "int32", "uint64", "float32"]))))
    elif how == 5:
        name = str(rng.choice(sorted(arrays)))
        arrays[name] = Array(np.zeros((2,) + tuple(arrays[name].shape), np.int64))
    elif how == 6:
        name = str(rng.choice(sorted(arrays)))
        a = arrays[name]
        data = {0: a.data[:-8], 1: a.data + b"\x00" * 8, 2: _header_bytes((10 ** 12,)),
                3: _header_bytes(tuple(a.shape), descr=">i8", body=value(name).astype(">i8").tobytes())}[
            int(rng.integers(4))]
        arrays[name] = Array(dtype="int64", shape=tuple(a.shape), stype=str(rng.choice(["numpy.ndarray", "pickle"])),
                             data=data)
    elif how == 7:
        if rng.random() < 0.5:
            arrays.pop(str(rng.choice(sorted(arrays))))
        else:
            arrays[str(rng.choice(["x", "__metadata__", "gram2"]))] = Array(np.zeros(3, np.int64))
    elif how == 8:
        arrays["n"] = Array(value("n") + int(rng.choice([-1, 1, 2 ** 40])))
    elif how == 9:  # passes every reply check; the statistics ledger refuses it (out of the model card's bounds)
        counts = value("counts")
        counts[int(rng.integers(len(counts)))] += 1
        arrays["counts"] = Array(counts)
        return "stats_out_of_bounds_counts"
    elif how == 10:
        gram = value("gram")
        gram[0] = -1  # G's first diagonal entry: a sum of squares cannot be negative
        arrays["gram"] = Array(gram)
        return "stats_out_of_bounds_gram"
    else:
        name = str(rng.choice(["stats", "stats-meta"]))
        parts[name] = ("metric", {"a": 1}) if name == "stats" else ("array", {"x": Array(np.zeros(2, np.int64))})
    return f"stats_{how}"


def corrupt_rows(rng: np.random.Generator, arrays: dict) -> str:
    """Corrupt a row form (int32 rows [n, p], int64 labels [n]); returns the corruption. Each one
    is refused: no honest site's rows look like these."""
    rows, labels = np.array(arrays["rows"].numpy()), np.array(arrays["labels"].numpy())
    n, p = rows.shape
    unit = 2 ** EXPECT.frac_bits
    how = str(rng.choice(["off_ball", "off_grid", "label_high", "label_negative", "dtype", "n_more", "n_fewer",
                          "wide", "both_forms", "bytes"]))
    if how == "off_ball":  # every entry on the grid, the row far off the clip ball: only a per-row check sees it
        rows[int(rng.integers(n))] = unit * rng.choice([-1, 1], p)
    elif how == "off_grid":
        rows[int(rng.integers(n)), int(rng.integers(p))] = unit + 1
    elif how == "label_high":
        labels[int(rng.integers(n))] = EXPECT.num_classes + int(rng.integers(0, 2 ** 40))
    elif how == "label_negative":
        labels[int(rng.integers(n))] = -1
    elif how == "dtype":
        rows = rows.astype(str(rng.choice(["int64", "float32", "int16"])))
    elif how in ("n_more", "n_fewer"):  # rows and labels agree with each other, not with num-examples
        keep = n + 1 if how == "n_more" else max(n - 1, 0)
        rows = np.resize(rows, (keep, p)).astype(np.int32)
        labels = np.resize(labels, keep).astype(np.int64)
    elif how == "wide":
        rows = np.zeros((n, p + 1), np.int32)
    elif how == "both_forms":  # rows and a Gram's arrays in one record
        arrays["gram"] = Array(np.zeros(p * (p + 1) // 2, np.int64))
        return "stats_rows_both_forms"
    else:
        arrays["rows"] = Array(dtype="int32", shape=(n, p), stype="numpy.ndarray", data=_header_bytes((n, p), "<i4"))
        return "stats_rows_bytes"
    arrays["rows"], arrays["labels"] = Array(np.ascontiguousarray(rows)), Array(np.ascontiguousarray(labels))
    return f"stats_rows_{how}"


def mutate(rng: np.random.Generator, parts: dict, kind: str) -> str:
    """Corrupt ``parts`` in place; returns the name of the corruption."""
    # a record already dropped or retyped by an earlier corruption is left alone (throwaway dicts)
    meta = parts["meta"][1] if parts.get("meta", ("",))[0] == "config" else {}
    metrics = parts["metrics"][1] if parts.get("metrics", ("",))[0] == "metric" else {}
    arrays = parts["delta"][1] if parts.get("delta", ("",))[0] == "array" else {"a.weight": None, "b.bias": None}
    options = ["drop_record", "record_type", "num_examples", "site_id", "metric_value", "error_record"]
    if kind == "train":
        options += ["base_digest", "dp_flag", "dp_epsilon", "train_config", "meta_strings", "array", "array",
                    "array_names", "stats", "stats"]
    choice = str(rng.choice(options))
    if choice == "drop_record":
        parts.pop(str(rng.choice([name for name in parts if name != "error"] or ["error"])))
    elif choice == "record_type":
        name = str(rng.choice([name for name in parts if name != "error"] or ["error"]))
        record_type = str(rng.choice([t for t in ("array", "metric", "config") if t != parts[name][0]]))
        parts[name] = (record_type, {"array": {"x": Array(np.zeros(2, np.float32))}, "metric": {"a": 1},
                                     "config": {"a": "x"}}[record_type])
    elif choice == "num_examples":
        value = rng.choice(np.array([0, -5, [1, 2], 1.5, math.nan, math.inf, -math.inf, 2 ** 63 - 1, 2 ** 24 + 1,
                                     [], [1.0], "missing"], dtype=object))
        if isinstance(value, str):
            metrics.pop("num-examples", None)
        else:
            metrics["num-examples"] = value
    elif choice == "site_id":
        value = ODD_SITE_IDS[int(rng.integers(len(ODD_SITE_IDS)))]
        meta["site-id"] = value
    elif choice == "metric_value":
        key = str(rng.choice(["eval-loss", "eval-accuracy"] if kind == "evaluate"
                             else ["train-loss", "train-accuracy", "wall-s"]))
        metrics[key] = rng.choice(np.array([math.nan, math.inf, [1.0, 2.0], -math.inf], dtype=object))
    elif choice == "error_record":
        parts["error"] = ("config", {"code": rng.choice(np.array(["budget_exhausted", "X Y!", 5, "", b"x"],
                                                                 dtype=object)),
                                     "reason": "r" * int(rng.integers(0, 100_000)), "site-id": meta.get("site-id", 1)})
    elif choice == "base_digest":
        meta["base-digest"] = rng.choice(np.array(["c" * 64, "", 7, b"b" * 64, BASE.upper()], dtype=object))
    elif choice == "dp_flag":
        meta["dp"] = rng.choice(np.array(["false", "true", 0, 1, [True], b""], dtype=object))
    elif choice == "dp_epsilon":
        meta["dp"] = True
        key, value = (("epsilon", rng.choice(np.array([math.inf, math.nan, -1.0, [1.0], "gone"], dtype=object)))
                      if rng.random() < 0.6 else
                      ("delta", rng.choice(np.array([1.0, -0.1, math.nan, 2.0], dtype=object))))
        if value == "gone":
            metrics.pop(key, None)
        else:
            metrics[key] = value
    elif choice == "train_config":
        meta["train-config"] = NOT_JSON_OBJECTS[int(rng.integers(len(NOT_JSON_OBJECTS)))]
    elif choice == "meta_strings":
        key = str(rng.choice(["shard-fingerprint", "contribution-id", "dp-epsilon", "data-digest"]))
        values = {"shard-fingerprint": [[1, 2], "x" * 5000, 5, b"\xff"],
                  "contribution-id": ["xyz", "A" * 32, 5, "0" * 33, "g" * 32],
                  "dp-epsilon": ["8", b"x", [1.0], True],
                  "data-digest": [3.5, ["a"], "d" * 2000]}[key]
        meta[key] = values[int(rng.integers(len(values)))]
    elif choice == "stats":
        return corrupt_stats(rng, parts)
    elif choice == "array":
        name = str(rng.choice(list(arrays) or ["a.weight"]))
        arrays[name] = corrupt_array(rng, name, SHAPES.get(name, (3,)))
    elif choice == "array_names":
        how = int(rng.integers(5))
        if how == 0:
            arrays["__metadata__"] = Array(np.zeros(2, np.float32))
        elif how == 1:
            arrays["c.extra"] = Array(np.zeros(2, np.float32))
        elif how == 2 and arrays.keys() & SHAPES.keys():  # only expected names: never undo an earlier one
            arrays.pop(str(rng.choice(sorted(arrays.keys() & SHAPES.keys()))))
        elif how == 3:
            arrays.clear()
        elif arrays.keys() & SHAPES.keys():
            old = str(rng.choice(sorted(arrays.keys() & SHAPES.keys())))
            arrays[str(rng.choice(["é", "a" * 300, "a\x00", ""]))] = arrays.pop(old)
        else:
            arrays["é"] = Array(np.zeros(2, np.float32))
    return choice


# ----------------------------------------------------------------------------- the fuzz

def _registry(tmp_path: Path, sites: dict[str, int], revoked: set[str]) -> "object":
    from server.trust.registry import SiteRegistry

    registry = {"version": 2, "sites": {
        site: {"public_key": f"keys/{site}.pub", "fingerprint": f"SHA256:{i:064x}", "node_id": node,
               "max_examples": 1000, "registered_at": "2026-01-01T00:00:00Z", "revoked": site in revoked}
        for i, (site, node) in enumerate(sites.items())}}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    return SiteRegistry(tmp_path / "registry.json")


@pytest.mark.parametrize("federation", ["simulation", "deployment"])
def test_no_corrupted_reply_aborts_a_round_and_each_is_a_counted_rejection(tmp_path, federation):
    rng = np.random.default_rng(20261130 if federation == "simulation" else 7)
    sites = [f"s{i}" for i in range(CASES)]  # one site per case; node ids are registered in deployment
    nodes = {site: 10_000 + i for i, site in enumerate(sites)}
    revoked_site = "revoked-site"
    binding = None
    if federation == "deployment":
        from server.trust.identity import SenderBinding
        binding = SenderBinding(_registry(tmp_path, nodes | {revoked_site: 99}, {revoked_site}))
    reasons: Counter = Counter()
    corruptions: Counter = Counter()
    expected_active: set[str] = set()
    withdrawn: set[str] = set()
    sticky = hasattr(Ledger, "withdrawn_sites")  # the ledger's sticky withdrawal is there
    start = time.perf_counter()
    current_stats: dict[str, SufficientStats] = {}  # site -> the statistics its active contribution carried
    with Ledger.open(tmp_path / "ledger.sqlite", expected_base_digest=BASE, max_delta_norm=10.0,
                     expected_spec=SHAPES) as ledger, open_stats_ledger(tmp_path / "stats.sqlite") as stats_ledger:
        strategy = LedgerFedAvg(ledger, SPEC, BASE, min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1,
                                stats_ledger=stats_ledger, exact_head=EXPECT,
                                **({"binding": binding} if binding else {}))
        case = 0
        for server_round in range(1, CASES // ROUND_SIZE + 1):
            strategy.require_dp = server_round % 5 == 0  # every fifth round is a DP run
            replies, good_nodes, bad_senders, in_round, applied, valid_stats = [], set(), Counter(), set(), {}, {}
            for _ in range(ROUND_SIZE):
                site = sites[case]
                case += 1
                if rng.random() < 0.15 and expected_active and rng.random() < 0.5:
                    site = str(rng.choice(sorted(expected_active - in_round) or [site]))  # a replacement
                node = nodes[site]
                dp = strategy.require_dp or rng.random() < 0.3
                if rng.random() < 0.08 and site not in in_round:
                    parts = valid_parts(rng, site, dp)
                    valid_stats[site] = None if dp else sent_stats(parts)
                    replies.append(build(parts, node))
                    good_nodes.add(node)
                    in_round.add(site)
                    continue
                mutations = int(rng.integers(1, 3))
                if strategy.require_dp and rng.random() < 0.3:  # a non-DP reply in a DP run
                    dp, mutations = False, mutations - 1
                    corruptions["non_dp_in_dp_run"] += 1
                parts = valid_parts(rng, site, dp)
                for _ in range(mutations):
                    applied.setdefault(node, []).append(mutate(rng, parts, "train"))
                    corruptions[applied[node][-1]] += 1
                replies.append(_odd_sender(rng, parts, node, federation, nodes, revoked_site, corruptions))
                bad_senders[replies[-1].metadata.src_node_id] += 1
                # a reply the ledger refuses still took the site's one reply of the round: a valid one
                # after it is a duplicate (a SuperNode answers each message once; only the fuzz sends two)
                in_round.add(site)
            if sticky and withdrawn:  # a withdrawn site whose SuperNode still runs: never re-added
                site = str(rng.choice(sorted(withdrawn)))
                replies.append(build(valid_parts(rng, site, strategy.require_dp), nodes[site]))
                corruptions["withdrawn_site_replies"] += 1
                bad_senders[nodes[site]] += 1
            if rng.random() < 0.5 and good_nodes:  # a second reply for a site already in this round
                node = sorted(good_nodes)[0]
                site = next(s for s, n in nodes.items() if n == node)
                replies.append(build(valid_parts(rng, site, strategy.require_dp), node))
                corruptions["duplicate_in_round"] += 1
                bad_senders[node] += 1
            if rng.random() < 0.5:
                replies.append(over_the_wire(Message(Error(code=int(rng.integers(0, 9)), reason="x" * 5000),
                                                     reply_to=instruction(20_000_000 + server_round))))
                corruptions["flower_error"] += 1
                bad_senders[20_000_000 + server_round] += 1

            arrays, metrics = strategy.aggregate_train(server_round, replies)  # must not raise

            summary = strategy.rounds[server_round]
            assert len(summary.recorded) + len(summary.rejections) == len(replies)
            assert Counter(r["node_id"] for r in summary.rejections) == bad_senders  # each bad reply, once
            recorded_nodes = {nodes[s] for s in summary.recorded}
            assert recorded_nodes == good_nodes, {n: applied.get(n) for n in recorded_nodes - good_nodes}
            assert metrics["recorded"] == len(summary.recorded) == len(good_nodes)
            recorded_nodes = {nodes[s] for s in summary.recorded}
            assert recorded_nodes == good_nodes, {n: applied.get(n) for n in recorded_nodes - good_nodes}
            assert all(REASON.fullmatch(r["reason"]) for r in summary.rejections), summary.rejected_by_reason
            json.dumps(summary.as_dict(), default=str)  # the report survives whatever the replies held
            reasons.update(summary.rejected_by_reason)
            expected_active |= set(summary.recorded)
            # a reply the statistics ledger refused after the Δ ledger accepted it: the site left both
            assert all(any(r["site_id"] == site and r["reason"].startswith("stats_") for r in summary.rejections)
                       for site in summary.retracted)
            expected_active -= set(summary.retracted)
            for site in summary.retracted:
                current_stats.pop(site, None)
            for site in summary.recorded:
                current_stats.pop(site, None)
                if valid_stats[site] is not None:
                    current_stats[site] = valid_stats[site]
            assert summary.stats_recorded == [s for s in summary.recorded if valid_stats[s] is not None]
            if sticky and server_round % 10 == 0 and expected_active:  # a site withdraws (sticky in the ledger)
                site = sorted(expected_active)[0]
                assert strategy.ledgers.remove(site, reason="fuzz: withdrawal")  # from both ledgers
                expected_active.discard(site)
                current_stats.pop(site, None)
                withdrawn.add(site)

            evaluate_replies, evaluate_good = _evaluate_replies(rng, sites, nodes, corruptions, federation)
            strategy.aggregate_evaluate(server_round, evaluate_replies)  # must not raise
            evaluate = strategy.rounds[server_round].evaluate
            assert len(evaluate["sites"]) + len(evaluate["skipped"]) == len(evaluate_replies)
            assert set(evaluate["sites"]) == evaluate_good
            reasons.update({f"evaluate:{k}": v for k, v in evaluate["skipped_by_reason"].items()})
            json.dumps(strategy.rounds[server_round].as_dict(), default=str)

        ledger.verify()  # raises LedgerCorrupt on any inconsistency
        stats_ledger.verify()
        assert {c.site_id for c in ledger.contributions(status="active")} == expected_active
        assert {c.site_id for c in stats_ledger.contributions(status="active")} == set(current_stats)
        assert set(current_stats) <= expected_active
        composed = stats_ledger.composed_stats()
        assert (composed is None and not current_stats) or composed == SufficientStats.total(current_stats.values())
    elapsed = time.perf_counter() - start
    total = sum(reasons.values())
    train_reasons = sorted(k for k in reasons if not k.startswith("evaluate:"))
    print(f"\nfuzz ({federation}): {case} train cases + {CASES // ROUND_SIZE} rounds of extra replies, "
          f"{total} rejections, {len(train_reasons)} distinct train reasons, "
          f"{len(reasons) - len(train_reasons)} distinct evaluate reasons, {len(expected_active)} sites "
          f"recorded, {elapsed:.1f} s\n  reasons: {dict(sorted(reasons.items()))}\n"
          f"  corruptions: {dict(sorted(corruptions.items()))}")
    _record_stats(federation, case, reasons, corruptions, elapsed)
    assert "internal" not in reasons, "an unexpected exception: classify it"
    assert len(train_reasons) >= 15


def _odd_sender(rng, parts, node, federation, nodes, revoked_site, corruptions) -> Message:
    """In deployment some corrupted replies also come from the wrong node."""
    if federation == "deployment" and rng.random() < 0.2:
        how = int(rng.integers(4))
        if how == 0:
            node = 5  # no site is registered for node 5
            corruptions["unregistered_node"] += 1
        elif how == 1:
            node = 10_000 + (node - 10_000 + 1) % len(nodes)  # another registered site's node
            corruptions["impostor_node"] += 1
        elif how == 2:
            if parts.get("meta", ("",))[0] == "config":
                parts["meta"][1]["site-id"] = revoked_site
            node = 99
            corruptions["revoked_node"] += 1
        elif parts.get("metrics", ("",))[0] == "metric":
            parts["metrics"][1]["num-examples"] = 1001 + int(rng.integers(5000))  # registered cap: 1000
            corruptions["over_cap"] += 1
    return build(parts, node)


def _evaluate_replies(rng, sites, nodes, corruptions, federation):
    replies, good = [], set()
    for _ in range(10):
        site = str(rng.choice(sites))
        parts = {"metrics": ("metric", {"num-examples": int(rng.integers(1, 100)), "eval-loss": 1.0,
                                        "eval-accuracy": 0.5}),
                 "meta": ("config", {"site-id": site})}
        if rng.random() < 0.3 and site not in good:
            replies.append(build(parts, nodes[site], "evaluate"))
            good.add(site)
            continue
        if rng.random() < 0.3:  # well-formed, but a value no honest evaluation gives
            corruptions["evaluate:" + out_of_range(rng, parts["metrics"][1], federation)] += 1
        else:
            corruptions["evaluate:" + mutate(rng, parts, "evaluate")] += 1
        replies.append(build(parts, nodes[site], "evaluate"))
    return replies, good


def out_of_range(rng, metrics: dict, federation: str) -> str:
    """An evaluate reply that would move the federated metrics: accuracy outside [0, 1], a loss that is
    negative or huge, or (deployment) more examples than the site's registered cap."""
    options = ["accuracy_above_one", "accuracy_negative", "loss_huge", "loss_negative"]
    if federation == "deployment":
        options.append("over_cap")
    how = str(rng.choice(options))
    metrics.update({"accuracy_above_one": {"eval-accuracy": 17.07}, "accuracy_negative": {"eval-accuracy": -0.5},
                    "loss_huge": {"eval-loss": 1e6}, "loss_negative": {"eval-loss": -3.0},
                    "over_cap": {"num-examples": 1001, "eval-accuracy": 1.0}}[how])
    return how


def _record_stats(federation, cases, reasons, corruptions, elapsed) -> None:
    """runs/fuzz/fuzz-<mode>.json (git-ignored): the counts docs/testing.md quotes."""
    out = Path(__file__).resolve().parents[2] / "runs" / "fuzz"
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"fuzz-{federation}.json").write_text(json.dumps(
            {"cases": cases, "rejections": sum(reasons.values()), "reasons": dict(sorted(reasons.items())),
             "corruptions": dict(sorted(corruptions.items())), "seconds": round(elapsed, 2)}, indent=1))
    except OSError:
        pass
