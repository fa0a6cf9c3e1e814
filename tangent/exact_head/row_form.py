"""The row form of a site's exact-head statistics: its quantized φ rows and labels, not their sums.

A site's statistics in the Gram form (:class:`~tangent.exact_head.statistics.SufficientStats`:
n, counts, s, packed G, B as int64) cost 8·(p(p+1)/2 + p(k+1) + k + 1) bytes whatever n is —
38,031,448 bytes at p = 3,072, k = 10, for 60 rows as for 60,000. The row form is the integers
those sums are made of: ``rows`` = q (int32 [n, p], |q| ≤ 2^b with b ≤ 24 fits int32) and
``labels`` (int64 [n]), 4·n·p + 8·n bytes. The server forms (n, c, s, G, B) from them with
:meth:`SufficientStats.from_rows` — the very integers the site would have sent, so composed ==
central holds bit for bit whichever form each site chose — and removal subtracts exactly what
was added.

Choice: the smaller of the two (:func:`smaller_form`), i.e. rows while n ≲ p. Privacy: the
row form shows the server every example's features (rounded φ, from which much of the image can
be inferred), the Gram form only their second moments; a site may insist on the Gram form
(node config ``stats-form = "gram"``, deploy/README.md's threat model).
"""
from __future__ import annotations

import numpy as np

from tangent.exact_head.statistics import StatsError, SufficientStats, row_norm_bound, triu_size

FORMS = ("rows", "gram")
ROW_ARRAYS = ("labels", "rows")
ROWS_DTYPE = np.dtype(np.int32)
LABELS_DTYPE = np.dtype(np.int64)


def gram_form_bytes(num_features: int, num_classes: int) -> int:
    """Bytes of the Gram form's int64 arrays (n, counts, sums, packed gram, cross)."""
    p, k = num_features, num_classes
    return 8 * (1 + k + p + triu_size(p) + p * k)


def row_form_bytes(num_rows: int, num_features: int) -> int:
    return num_rows * (ROWS_DTYPE.itemsize * num_features + LABELS_DTYPE.itemsize)


def smaller_form(num_rows: int, num_features: int, num_classes: int) -> str:
    """"rows" when the row form takes fewer bytes than the Gram form, else "gram"."""
    rows = row_form_bytes(num_rows, num_features)
    return "rows" if rows < gram_form_bytes(num_features, num_classes) else "gram"


def row_arrays(q: np.ndarray, labels: np.ndarray, frac_bits: int) -> dict[str, np.ndarray]:
    """The row form's arrays of quantized rows ``q`` (on the grid of ``frac_bits``) and their labels."""
    q, labels = np.asarray(q), np.asarray(labels)
    if frac_bits > 30:  # |q| ≤ 2^b must fit int32
        raise StatsError(f"the row form holds |q| ≤ 2^{frac_bits} in int32: frac-bits ≤ 30")
    if q.ndim != 2 or labels.shape != (len(q),):
        raise StatsError(f"need q [N, p] and labels [N], got {q.shape} and {labels.shape}")
    return {"labels": labels.astype(LABELS_DTYPE), "rows": q.astype(ROWS_DTYPE)}


def is_row_form(arrays) -> bool:
    try:
        return sorted(arrays.keys()) == list(ROW_ARRAYS)
    except (AttributeError, TypeError):
        return False


def stats_of_rows(arrays, num_features: int, num_classes: int, clip_norm: float,
                  frac_bits: int) -> SufficientStats:
    """The statistics of a row form, checked as untrusted input: exact names, dtypes and shapes,
    |q| ≤ 2^b and labels in [0, k), else StatsError (a ValueError)."""
    if not is_row_form(arrays):
        raise StatsError(f"the row form is exactly the arrays {list(ROW_ARRAYS)}")
    rows, labels = np.asarray(arrays["rows"]), np.asarray(arrays["labels"])
    if rows.dtype != ROWS_DTYPE or labels.dtype != LABELS_DTYPE:
        raise StatsError(f"rows must be int32 and labels int64, got {rows.dtype} and {labels.dtype}")
    if rows.ndim != 2 or rows.shape[1] != num_features or labels.shape != (rows.shape[0],) or not len(rows):
        raise StatsError(f"rows [n, {num_features}] and labels [n] with n ≥ 1, got {rows.shape} and {labels.shape}")
    check_rows_on_the_ball(rows, frac_bits)
    return SufficientStats.from_rows(rows, labels, num_classes, clip_norm, frac_bits)


def check_rows_on_the_ball(rows: np.ndarray, frac_bits: int) -> None:
    """StatsError unless every row has |q_i| ≤ 2^b and ‖q‖ ≤ R (:func:`row_norm_bound`), as every
    row of :func:`~tangent.exact_head.statistics.quantize` has. The Gram form's checks can only bound
    the sum of the rows' squared norms (trace(G) ≤ n·R²): one row far off the ball, the others
    zero, passes them. The row form shows each row, so each row is checked."""
    unit = 2 ** frac_bits
    if rows.size and max(abs(int(rows.min())), abs(int(rows.max()))) > unit:
        raise StatsError(f"|q| exceeds 2^{frac_bits}: not on this grid")
    p = rows.shape[1]
    wide = np.int64 if p * unit * unit < 2 ** 63 else object  # each squared norm ≤ p·4^b, exact
    squared = np.square(rows.astype(wide)).sum(axis=1)
    limit = row_norm_bound(p, frac_bits) ** 2
    if len(squared) and int(squared.max()) > limit:
        raise StatsError(f"a row has ‖q‖² = {int(squared.max())} > R² = {limit}: off the clip ball")
