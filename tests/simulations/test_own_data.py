"""A simulation on one's own data: an .npz with 4 classes and an ImageFolder with 3, through the
real driver and `flwr run`; malformed data sets are refused by the driver before anything starts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.simulations.own_data import pattern_images, refused, simulate

REPO = Path(__file__).resolve().parents[2]


def write_image_folder(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> Path:
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels)):
        directory = root / names[label]
        directory.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(directory / f"{i:04d}.png")
    return root


# ---------------------------------------------------------------- refused before anything starts
def test_malformed_data_sets_are_refused_with_what_and_which_file(tmp_path, capsys):
    images, labels = pattern_images(12, 4, 16, 0)
    float_images = tmp_path / "float.npz"
    np.savez(float_images, images=images.astype(np.float32), labels=labels)
    err = refused(tmp_path, capsys, "--dataset", str(float_images))
    assert str(float_images) in err and "uint8" in err

    no_labels = tmp_path / "nolabels.npz"
    np.savez(no_labels, images=images)
    err = refused(tmp_path, capsys, "--dataset", str(no_labels))
    assert str(no_labels) in err and "'labels'" in err

    good = tmp_path / "good.npz"
    np.savez(good, images=images, labels=labels)
    err = refused(tmp_path, capsys, "--dataset", str(good), "--test-dataset", str(tmp_path / "absent.npz"))
    assert "absent.npz" in err and "no such file" in err

    too_many = tmp_path / "test5.npz"
    np.savez(too_many, images=images, labels=np.arange(12) % 6)
    err = refused(tmp_path, capsys, "--dataset", str(good), "--test-dataset", str(too_many))
    assert str(too_many) in err and "4 classes" in err

    err = refused(tmp_path, capsys, "--dataset", str(good), "--num-clients", "20")
    assert "12 training examples" in err

    folder = write_image_folder(tmp_path / "folder", images, labels, ["a", "b", "c", "d"])
    (folder / "b" / "0005.png").write_bytes(b"not a png")
    err = refused(tmp_path, capsys, "--dataset", str(folder))
    assert str(folder / "b" / "0005.png") in err and "not a readable image" in err

    train = write_image_folder(tmp_path / "train", images, labels, ["a", "b", "c", "d"])
    test = write_image_folder(tmp_path / "test", images, labels, ["a", "b", "c", "e"])
    err = refused(tmp_path, capsys, "--dataset", str(train), "--test-dataset", str(test))
    assert str(test) in err and "class directories" in err

    single = tmp_path / "single.npz"
    np.savez(single, images=images, labels=np.zeros(12, np.int64))
    err = refused(tmp_path, capsys, "--dataset", str(single))
    assert "at least 2 classes" in err


# ---------------------------------------------------------------- real simulations (slow)
def check_run(summary: dict, num_classes: int, num_test: int, evaluation: str) -> None:
    report = summary["_train_report"]
    assert summary["num_classes"] == num_classes and report["spec"]["num-classes"] == num_classes
    assert summary["recorded_sites"] == 3 and summary["rejected"] == {}
    assert summary["evaluation"] == evaluation and summary["central_test_images"] == num_test
    if evaluation == "server":  # the ServerApp evaluated the composed model on the given test set, all of it
        assert report["central_evaluation"]["error"] is None
        assert report["central"]["1"]["num-examples"] == num_test
    else:  # the ServerApp was given no test set; the driver evaluated the ledger's model on it
        assert report["accuracy"] is None and not report["central"]
    assert 0.0 <= summary["accuracy_composed"] <= 1.0 and summary["accuracy_after_removal"] is not None
    # the sites' federated evaluation split the same test set
    assert summary["federated_evaluation"]["num-examples"] == num_test
    assert summary["max_rel_logit_diff_composed_vs_ensemble"] <= 1e-5 and summary["removal_bit_identical"]
    assert summary["cache_built"] is True  # tokens of the own data were cached and read by the sites


@pytest.mark.slow
def test_simulation_on_an_npz_with_four_classes(tmp_path):
    train_images, train_labels = pattern_images(96, 4, 20, seed=1, rgb=True)
    test_images, test_labels = pattern_images(40, 4, 20, seed=2, rgb=True)
    np.savez(tmp_path / "train.npz", images=train_images, labels=train_labels)
    np.savez(tmp_path / "test.npz", images=test_images, labels=test_labels)
    summary = simulate(tmp_path, "--dataset", str(tmp_path / "train.npz"), "--test-dataset", str(tmp_path / "test.npz"),
                       "--evaluation", "server")
    check_run(summary, num_classes=4, num_test=40, evaluation="server")
    assert summary["_train_report"]["central_evaluation"]["test_dataset"] == str(tmp_path / "test.npz")


@pytest.mark.slow
def test_simulation_on_an_image_folder_with_three_classes(tmp_path):
    names = ["circle", "cross", "square"]
    train = write_image_folder(tmp_path / "train", *pattern_images(60, 3, 18, seed=3), names)
    test = write_image_folder(tmp_path / "test", *pattern_images(24, 3, 18, seed=4), names)
    summary = simulate(tmp_path, "--dataset", str(train), "--test-dataset", str(test))
    check_run(summary, num_classes=3, num_test=24, evaluation="driver")


def test_the_driver_checks_data_without_importing_torch(tmp_path):
    """The driver stays a small process: reading and checking the data sets must not import torch
    in it (importing tangent.data.sets used to: ~640 MiB more peak RSS in `make simulate`)."""
    images, labels = pattern_images(40, 4, 28, seed=0)
    path = tmp_path / "four.npz"
    np.savez(path, images=images, labels=labels)
    code = ("import sys\n"
            "from simulations.driver import cli, config, data\n"
            f"args = cli.parse_args(['--dataset', {str(path)!r}, '--num-clients', '2'])\n"
            "info = data.prepare_data(args, config.pyproject_config(), {})\n"
            "assert info['num_classes'] == 4, info\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_the_driver_reads_the_exact_head_spec_without_importing_torch():
    """The driver resolves the feature spec (simulations.exact_head_check.feature_config) in its
    own process; torch there would add ~500 MiB to make simulate's peak for the whole run."""
    import subprocess
    import sys

    code = ("import sys; from simulations.exact_head_check import feature_config; "
            "from server.config import feature_spec; "
            "c = feature_config({'exact-head': True, 'feature-pieces': 'final_cls,input_quad'}); "
            "assert c is not None and feature_spec(c).dim() == 384 * 5; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


@pytest.mark.slow
def test_a_private_simulation_on_an_mnist_style_npz(tmp_path):
    """`--dp-epsilon` on the own-data path (grey 28 × 28 uint8, four classes, as an MNIST-style
    .npz): DP-TAFT and the DP head's releases for a class count that is the data's, not ten; the
    budget is spent, removal of a DP site is exact, and the head learns the patterns."""
    train_images, train_labels = pattern_images(240, 4, 28, seed=5)
    test_images, test_labels = pattern_images(80, 4, 28, seed=6)
    np.savez(tmp_path / "train.npz", images=train_images, labels=train_labels)
    np.savez(tmp_path / "test.npz", images=test_images, labels=test_labels)
    summary = simulate(tmp_path, "--dataset", str(tmp_path / "train.npz"), "--test-dataset", str(tmp_path / "test.npz"),
                       "--dp-epsilon", "8")
    assert summary["dp"] is True and summary["num_classes"] == 4 and summary["rejected"] == {}
    assert 0.95 * 8 < summary["dp_epsilon_spent_max"] <= 8 and summary["dp_sites_charged"] == 3
    assert summary["dp_head_releases"] == 3 and summary["dp_head_sum_equals_releases"] is True
    assert summary["dp_head_removal_bit_identical"] is True and summary["removal_bit_identical"] is True
    assert summary["accuracy_exact_head"] > 0.5 and summary["accuracy_composed"] is not None
