import numpy as np
import pytest
import torch

from tangent.data.sets import (DINOV2_MEAN, DINOV2_STD, DataError, dataset_digest, load_fashion_mnist,
                          load_site_data, preprocess)


def test_fashion_mnist_shapes_and_labels():
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and labels.dtype == np.int64
    assert set(np.unique(labels)) == set(range(10))
    test_images, test_labels = load_fashion_mnist("test")
    assert test_images.shape == (10000, 28, 28) and len(test_labels) == 10000
    assert np.bincount(test_labels).tolist() == [1000] * 10


def test_missing_data_package_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", directory=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")


def test_npz_roundtrip_and_bad_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 12, 12), dtype=np.uint8)
    labels = np.arange(5)
    good = tmp_path / "site.npz"
    np.savez(good, images=images, labels=labels)
    loaded_images, loaded_labels = load_site_data(good)
    assert np.array_equal(loaded_images, images) and loaded_labels.dtype == np.int64

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="cannot read"):
        load_site_data(garbage)
    missing_key = tmp_path / "nolabels.npz"
    np.savez(missing_key, images=images)
    with pytest.raises(DataError, match="labels"):
        load_site_data(missing_key)
    wrong_shape = tmp_path / "shape.npz"
    np.savez(wrong_shape, images=images.reshape(5, 144), labels=labels)
    with pytest.raises(DataError, match=r"\[N,H,W\]"):
        load_site_data(wrong_shape)
    wrong_dtype = tmp_path / "dtype.npz"
    np.savez(wrong_dtype, images=images.astype(np.float32), labels=labels)
    with pytest.raises(DataError, match="uint8"):
        load_site_data(wrong_dtype)
    with pytest.raises(DataError, match="does not exist"):
        load_site_data(tmp_path / "absent.npz")


def test_image_folder(tmp_path):
    from PIL import Image
    for class_name, value in (("cat", 10), ("dog", 200)):
        (tmp_path / class_name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((9, 9, 3), value + i, np.uint8)).save(tmp_path / class_name / f"{i}.png")
    images, labels = load_site_data(tmp_path)
    assert images.shape == (6, 9, 9, 3)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert images[3, 0, 0, 0] == 200


def test_preprocess_grey_to_rgb_resize_normalise():
    images = np.zeros((2, 28, 28), np.uint8)
    images[1] = 255
    batch = preprocess(images, img_size=56)
    assert batch.shape == (2, 3, 56, 56) and batch.dtype == torch.float32
    for channel in range(3):
        assert torch.allclose(batch[0, channel], torch.tensor(-DINOV2_MEAN[channel] / DINOV2_STD[channel]))
        assert torch.allclose(batch[1, channel], torch.tensor((1 - DINOV2_MEAN[channel]) / DINOV2_STD[channel]))
    with pytest.raises(DataError):
        preprocess(np.zeros((2, 28), np.uint8))
    with pytest.raises(DataError):
        preprocess(np.zeros((2, 28, 28), np.float32))


def test_dataset_digest_sensitive_to_any_change():
    images, labels = load_fashion_mnist("test")
    base = dataset_digest(images[:100], labels[:100])
    assert base == dataset_digest(images[:100].copy(), labels[:100].copy())
    changed = labels[:100].copy()
    changed[7] = (changed[7] + 1) % 10
    assert dataset_digest(images[:100], changed) != base


def test_dataset_sources_and_what_the_server_evaluates_on():
    from tangent.data.sets import dataset_source

    assert dataset_source({}, "train") == "fashion-mnist" and dataset_source({}, "test") == "fashion-mnist"
    own = {"dataset": "/data/train.npz"}
    assert dataset_source(own, "train") == "/data/train.npz" and dataset_source(own, "test") is None
    assert dataset_source(own | {"test-dataset": "/data/test"}, "test") == "/data/test"
    assert dataset_source({"test-dataset": "none"}, "test") is None


def test_inspect_counts_classes_and_checks_the_test_set(tmp_path):
    from PIL import Image

    from tangent.data.sets import check_test_matches, inspect_dataset

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", images=rng.integers(0, 256, (9, 6, 6), dtype=np.uint8), labels=np.arange(9) % 7)
    info = inspect_dataset(tmp_path / "train.npz")
    assert (info.num_classes, info.num_examples, info.classes) == (7, 9, None)
    for root, names in (("a", ("x", "y", "z")), ("b", ("x", "y"))):
        for i, name in enumerate(names):
            (tmp_path / root / name).mkdir(parents=True)
            Image.fromarray(np.full((5, 5, 3), 40 * i, np.uint8)).save(tmp_path / root / name / "0.png")
    folder, fewer = inspect_dataset(tmp_path / "a"), inspect_dataset(tmp_path / "b")
    assert folder.num_classes == 3 and folder.classes == ("x", "y", "z")
    with pytest.raises(DataError, match="class directories"):
        check_test_matches(folder, fewer)
    with pytest.raises(DataError, match="labels go up to 6"):
        check_test_matches(folder, info)
    check_test_matches(info, folder)  # 3 classes inside 7: same ids
    fashion = inspect_dataset("fashion-mnist", "test")
    assert fashion.num_classes == 10 and fashion.num_examples == 10000
