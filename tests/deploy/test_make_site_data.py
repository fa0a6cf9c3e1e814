"""deploy.make_site_data: disjoint Fashion-MNIST slices per site, kept when they exist."""
from __future__ import annotations

import numpy as np

from deploy.make_site_data import main


def test_sites_get_disjoint_slices_and_a_rerun_keeps_them(tmp_path, capsys):
    assert main(["--sites", "a", "b", "--per-site", "7", "--out", str(tmp_path)]) == 0
    a, b = (np.load(tmp_path / f"site-{s}" / "site.npz") for s in ("a", "b"))
    assert a["images"].shape == (7, 28, 28) and a["images"].dtype == np.uint8 and a["labels"].shape == (7,)
    assert not any(np.array_equal(x, y) for x in a["images"] for y in b["images"])
    before = (tmp_path / "site-a" / "site.npz").stat().st_mtime_ns
    assert main(["--sites", "a", "--per-site", "3", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "site-a" / "site.npz").stat().st_mtime_ns == before and "(kept)" in capsys.readouterr().out
