"""How a stats ledger takes and stores one site's statistics: the Gram form or the row form.

A site sends either its sums (the Gram form: int64 ``n, counts, sums, gram, cross``) or the
integers they are sums of (the row form, :mod:`tangent.exact_head.row_form`: int32 ``rows``
[n, p] and int64 ``labels`` [n]). The ledger's sums, checks, digests and verification work on the
Gram form in both cases: a row form is expanded on arrival with
``SufficientStats.from_rows`` — exactly the integers the site would have summed — and kept as
:class:`RowStats`, the Gram form's arrays that also remember their rows. The stored bytes are the
smaller of the two forms (the row form while n·p·4 < the Gram's 8·p(p+1)/2, i.e. n ≲ p),
compressed (:mod:`server.ledger.blobs`), so
what the server stores for a site follows what the site holds; a stored row form is expanded
again when it is read (removal, verification), so both stay exact and cost O(that site's size).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import safetensors.numpy

from server.ledger import blobs
from server.ledger.records import RejectedContribution
from tangent.exact_head.row_form import (LABELS_DTYPE, ROWS_DTYPE, is_row_form, row_form_bytes, gram_form_bytes,
                                         stats_of_rows)
from tangent.exact_head.statistics import StatsError

#: safetensors metadata key naming a stored row form (absent: the Gram form)
FORM_KEY = "form"


class RowStats(dict):
    """The Gram form's arrays of a contribution that came as rows; ``rows`` keeps the row form.

    Made by :func:`expand`, or by the server from a reply whose rows it has just formed the
    statistics of (server.replies, then server.strategy): the ledger then takes the arrays as
    they are (still through the family's bound checks) instead of forming the Gram a second time
    — O(n·p²), the largest cost of a small site. A site's data never arrive as this type (they
    come as Flower messages), and ``verify`` rebuilds every sum from the stored rows."""

    def __init__(self, arrays: Mapping[str, np.ndarray], rows: dict[str, np.ndarray]):
        super().__init__(arrays)
        self.rows = rows


def expand(contribution: Mapping, card_meta: Mapping) -> RowStats:
    """An untrusted row form as :class:`RowStats` (RejectedContribution when it is not one); a
    :class:`RowStats` as it is."""
    if type(contribution) is RowStats:
        return contribution
    try:
        rows = {name: np.ascontiguousarray(contribution[name]) for name in ("labels", "rows")}
    except Exception:  # noqa: BLE001 - hostile mapping or tensor type
        raise RejectedContribution("bad_structure", "the row form's rows and labels are not arrays") from None
    if rows["rows"].dtype != ROWS_DTYPE or rows["labels"].dtype != LABELS_DTYPE:
        raise RejectedContribution("wrong_dtype", f"rows {rows['rows'].dtype}, labels {rows['labels'].dtype}: "
                                                  "expected int32 and int64")
    try:
        stats = stats_of_rows(rows, card_meta["num-features"], card_meta["num-classes"], card_meta["clip-norm"],
                              card_meta["frac-bits"])
    except StatsError as err:
        raise RejectedContribution("stats_out_of_bounds", str(err)[:200]) from None
    return RowStats(stats.to_arrays(), rows)


def accepts(contribution) -> bool:
    return type(contribution) is RowStats or is_row_form(contribution)


def encode(arrays: Mapping[str, np.ndarray], card_meta: Mapping, site_id: str, site_version: int) -> bytes:
    """The stored bytes: the row form when the contribution came as rows and they are the
    smaller form, else the Gram form. The site and its contribution number go into the header: a
    site may send the same statistics again (retracted, then re-added), and the stored sha256
    must stay unique."""
    metadata = {"site_id": site_id, "site_version": str(site_version)}
    rows = getattr(arrays, "rows", None)
    p, k = card_meta["num-features"], card_meta["num-classes"]
    if rows is not None and row_form_bytes(len(rows["labels"]), p) < gram_form_bytes(p, k):
        return blobs.pack(safetensors.numpy.save(dict(sorted(rows.items())), metadata=metadata | {FORM_KEY: "rows"}))
    return blobs.pack(safetensors.numpy.save(dict(sorted(arrays.items())), metadata=metadata))


def decode(blob: bytes, card_meta: Mapping, expand: bool = True) -> dict[str, np.ndarray]:
    """The Gram form's arrays of stored bytes (a stored row form is expanded: the same integers;
    with ``expand`` False it is returned as stored, its ``rows`` and ``labels``)."""
    arrays = safetensors.numpy.load(blobs.unpack(blob))
    if expand and is_row_form(arrays):
        return dict(stats_of_rows(arrays, card_meta["num-features"], card_meta["num-classes"],
                                  card_meta["clip-norm"], card_meta["frac-bits"]).to_arrays())
    return arrays
