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


def test_test_images_come_from_the_test_split_and_are_kept(tmp_path, capsys):
    from tangent.data.sets import load_fashion_mnist

    assert main(["--sites", "a", "--per-site", "2", "--test-images", "5", "--out", str(tmp_path)]) == 0
    test = np.load(tmp_path / "test.npz")
    images, labels = load_fashion_mnist("test")
    assert np.array_equal(test["images"], images[:5]) and np.array_equal(test["labels"], labels[:5])
    before = (tmp_path / "test.npz").stat().st_mtime_ns
    assert main(["--sites", "a", "--test-images", "9", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "test.npz").stat().st_mtime_ns == before and "test.npz (kept)" in capsys.readouterr().out
