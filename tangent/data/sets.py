"""Real data: Fashion-MNIST from Debian's ``dataset-fashion-mnist``, a generic loader for a
site's own data, the data sets a simulation or the server's evaluation names, and preprocessing
to the backbone's input.

A *data set source* is ``"fashion-mnist"`` (Debian's package, train/test split by name) or the
path of an ``.npz`` (``images`` uint8 [N,H,W] or [N,H,W,3], ``labels`` int [N]) or an
ImageFolder directory (one sub-directory per class; sorted names = class ids 0..C-1).
"""
from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# Chosen by measurement (linear probe accuracy vs. time per image on 2 cores): see docs/benchmarks.md.
DEFAULT_IMG_SIZE = 56
DINOV2_MEAN = (0.485, 0.456, 0.406)
DINOV2_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_DIR = Path(os.environ.get("TAFT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


FASHION_MNIST = "fashion-mnist"
#: ``test-dataset`` value that turns the server's central evaluation off
NO_DATASET = "none"


class DataError(ValueError):
    """Input data is missing or malformed."""


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {tuple(dims)} but holds {data.size} bytes")
    return data.reshape(tuple(dims))


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DataError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}. Install Debian's package: "
        "`apt-get update && apt-get install -y dataset-fashion-mnist` (make does this), "
        "or set TAFT_FASHION_MNIST_DIR.")


def load_fashion_mnist(split: str = "train", directory: Path | str | None = None):
    """uint8 images [N, 28, 28] and int64 labels [N] (60k train, 10k test)."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = Path(directory) if directory else FASHION_MNIST_DIR
    images_file, labels_file = _FILES[split]
    images = _read_idx(_find(directory, images_file))
    labels = _read_idx(_find(directory, labels_file)).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"{directory}: {images.shape} images vs {labels.shape} labels")
    return images, labels


def load_site_data(path: str | Path):
    """A site's own data: an ``.npz`` with ``images`` (uint8 [N,H,W] or [N,H,W,3]) and ``labels``,
    or an ImageFolder directory (one sub-directory per class, sorted names = class ids)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"site data path {path} does not exist")
    if path.is_dir():
        return _load_image_folder(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive or "labels" not in archive:
                raise DataError(f"{path} must hold arrays 'images' and 'labels', has {list(archive)}")
            images, labels = archive["images"], archive["labels"]
    except DataError:
        raise
    except Exception as err:  # zipfile/pickle/format errors all mean "unreadable"
        raise DataError(f"cannot read {path} as .npz: {err}") from err
    return validate_images(images, labels, source=str(path))


def image_folder_classes(root: Path | str) -> list[str]:
    """Class names of an ImageFolder directory, in class-id order (sorted sub-directory names)."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-directories (ImageFolder layout expected: "
                        f"{root}/<class name>/<image file>)")
    return classes


def _load_image_folder(root: Path):
    from PIL import Image, UnidentifiedImageError

    images, labels = [], []
    size = None
    for class_id, name in enumerate(image_folder_classes(root)):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as opened:
                    image = np.asarray(opened.convert("RGB"))
            except (OSError, UnidentifiedImageError, ValueError) as err:
                raise DataError(f"{file}: not a readable image ({err})") from err
            size = size or image.shape
            if image.shape != size:  # keep arrays rectangular; resize happens in preprocess
                image = np.asarray(Image.fromarray(image).resize(size[1::-1]))
            images.append(image)
            labels.append(class_id)
    if not images:
        raise DataError(f"{root} contains no images (suffixes {', '.join(IMAGE_SUFFIXES)})")
    return validate_images(np.stack(images), np.asarray(labels), source=str(root))


def validate_images(images: np.ndarray, labels: np.ndarray, source: str = "data"):
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8:
        raise DataError(f"{source}: images must be uint8, got {images.dtype}")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim >= 1 and len(images) == 0:
        raise DataError(f"{source}: holds no images")
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise DataError(f"{source}: images must be [N,H,W] or [N,H,W,3], got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{source}: labels must be [N] with N={len(images)}, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise DataError(f"{source}: labels must be non-negative integers")
    return images, labels.astype(np.int64)


def load_dataset(source: str | Path, split: str = "train"):
    """(images, labels) of a data set source: ``"fashion-mnist"`` (its ``split``) or a path."""
    if str(source) == FASHION_MNIST:
        return load_fashion_mnist(split)
    return load_site_data(Path(str(source)).expanduser())


def dataset_source(config, split: str) -> str | None:
    """The data set a simulation (``split`` "train"/"test") or the server's evaluation ("test") uses.

    Run-config keys: ``dataset`` (default Fashion-MNIST) and ``test-dataset``: empty means the
    test split of Fashion-MNIST when ``dataset`` is Fashion-MNIST and no test data otherwise;
    ``"none"`` means no test data. None = no data for that split.
    """
    train = str(config.get("dataset", "") or FASHION_MNIST)
    if split == "train":
        return train
    test = str(config.get("test-dataset", "") or "")
    if test == NO_DATASET:
        return None
    return test or (FASHION_MNIST if train == FASHION_MNIST else None)


@dataclass(frozen=True)
class DatasetInfo:
    source: str
    num_examples: int
    num_classes: int  # max label + 1 (ImageFolder: number of class directories)
    classes: tuple[str, ...] | None  # ImageFolder class names, in class-id order
    image_shape: tuple[int, ...]


def inspect_dataset(source: str | Path, split: str = "train") -> DatasetInfo:
    """Load and check a data set source; raises DataError naming the file and what is wrong."""
    images, labels = load_dataset(source, split)
    classes = None
    if str(source) == FASHION_MNIST:
        classes = FASHION_MNIST_CLASSES
    elif Path(str(source)).expanduser().is_dir():
        classes = tuple(image_folder_classes(Path(str(source)).expanduser()))
    num_classes = len(classes) if classes else int(labels.max()) + 1
    if num_classes < 2:
        raise DataError(f"{source}: a classifier needs at least 2 classes, the labels hold {num_classes}")
    return DatasetInfo(str(source), len(labels), num_classes, classes, tuple(images.shape[1:]))


def check_test_matches(train: DatasetInfo, test: DatasetInfo) -> None:
    """The test set's labels must mean the same classes as the training set's."""
    if train.classes and test.classes and Path(train.source).is_dir() and Path(test.source).is_dir() \
            and train.classes != test.classes:
        raise DataError(f"{test.source}: class directories {list(test.classes)} differ from the training "
                        f"set's {list(train.classes)} ({train.source}): class ids would not match")
    if test.num_classes > train.num_classes:
        raise DataError(f"{test.source}: labels go up to {test.num_classes - 1} but the training set "
                        f"{train.source} has {train.num_classes} classes")


def preprocess(images: "np.ndarray | torch.Tensor", img_size: int = DEFAULT_IMG_SIZE) -> "torch.Tensor":
    """uint8 [N,H,W] or [N,H,W,3] → float32 [N,3,img_size,img_size], DINOv2 normalisation."""
    # torch is imported here, not at module level: the simulation driver reads data sets through
    # this module and must stay a small process (importing torch there added ~640 MiB to the
    # peak RSS of `make simulate`).
    import torch
    import torch.nn.functional as F

    batch = torch.as_tensor(np.asarray(images))
    if batch.dtype != torch.uint8:
        raise DataError(f"preprocess expects uint8 images, got {batch.dtype}")
    if batch.ndim == 3:
        batch = batch.unsqueeze(-1).expand(-1, -1, -1, 3)
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise DataError(f"preprocess expects [N,H,W] or [N,H,W,3], got {tuple(batch.shape)}")
    batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
    if batch.shape[-2:] != (img_size, img_size):
        batch = F.interpolate(batch, size=(img_size, img_size), mode="bilinear",
                              align_corners=False, antialias=True)
    mean = torch.tensor(DINOV2_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DINOV2_STD).view(1, 3, 1, 1)
    return (batch - mean) / std


def preprocessing_spec(img_size: int) -> dict:
    """What a feature cache must be keyed on besides the weights and the data."""
    return {"img_size": img_size, "resize": "bilinear-antialias", "mean": DINOV2_MEAN,
            "std": DINOV2_STD, "grey": "repeat-3"}


def dataset_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 over shapes, dtypes and bytes of images and labels."""
    digest = hashlib.sha256()
    for array in (np.ascontiguousarray(images), np.ascontiguousarray(labels)):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
