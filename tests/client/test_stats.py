"""client.stats.features_statistics: the packed, blocked Gram gives the reference integers."""
import numpy as np
import pytest

from tangent.exact_head.statistics import SufficientStats


@pytest.mark.parametrize("frac_bits", [8, 16, 24])
def test_packed_statistics_equal_the_reference_statistics(frac_bits):
    """features_statistics (packed Gram, blocks) == SufficientStats.from_features, bit for bit, also
    at b = 24 where only 32 rows fit one exact float64 product."""
    from client.stats import GRAM_BLOCK, features_statistics

    rng = np.random.default_rng(frac_bits)
    p = GRAM_BLOCK + 37  # more than one block, a ragged last one
    phi = rng.standard_normal((300, p)).astype(np.float32)
    phi[:5] *= 10.0  # some rows beyond the clip norm
    labels = rng.integers(0, 7, 300)
    ours = features_statistics(phi, labels, 7, 3.0, frac_bits)
    assert ours == SufficientStats.from_features(phi, labels, 7, 3.0, frac_bits)
    empty = features_statistics(phi[:0], labels[:0], 7, 3.0, frac_bits)
    assert empty == SufficientStats.zeros(p, 7, 3.0, frac_bits)


def test_a_site_sends_the_smaller_form_unless_it_insists_on_the_gram():
    """node config stats-form: auto (rows below ~p rows), gram (the server never sees one row)."""
    from client.site import SiteError
    from client.stats import stats_form

    assert stats_form({}, 60, 3072, 10) == "rows" and stats_form({}, 20_000, 3072, 10) == "gram"
    assert stats_form({"stats-form": "gram"}, 60, 3072, 10) == "gram"
    with pytest.raises(SiteError):
        stats_form({"stats-form": "everything"}, 60, 3072, 10)
