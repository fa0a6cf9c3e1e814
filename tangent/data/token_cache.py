"""On-disk cache of trunk outputs.

The trunk (every block before the first linearized one) is frozen, so the tokens it produces
depend only on w0, the preprocessing and the image. A data set's tokens are computed once,
stored as one ``.npy`` file ``[N, T, d]`` and shared read-only by every process that trains on
it: ``FeatureCache.tokens`` maps it, ``TokenDataset`` reads a batch's rows with ``pread`` (the
pages stay in the kernel's page cache, shared, instead of in every reader's resident set).

Layout of ``cache_dir``::

    <key>/tokens.npy       the tokens (fp32 or fp16)
    <key>/manifest.json    written last: its presence means the tokens are complete
    <key>.lock             fcntl lock held by the one process that builds

``key`` = sha256 over the base digest, the preprocessing spec, the data digest and the dtype.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tangent.data.sets import preprocess, preprocessing_spec

FORMAT_VERSION = 1
TOKENS_FILE = "tokens.npy"
MANIFEST_FILE = "manifest.json"
DTYPES = {"float32": np.float32, "float16": np.float16}


class CacheError(RuntimeError):
    """A cache directory is missing, incomplete or does not match what was asked for."""


def images_digest(images: np.ndarray) -> str:
    """sha256 over the shape, dtype and bytes of the images (labels do not affect tokens)."""
    array = np.ascontiguousarray(images)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def cache_key(base_digest: str, img_size: int, data_digest: str, dtype: str) -> str:
    spec = {"format": FORMAT_VERSION, "base_digest": base_digest,
            "preprocessing": preprocessing_spec(img_size), "data_digest": data_digest,
            "dtype": dtype}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


class FeatureCache:
    """Read-only view of a complete cache directory. Build one with :meth:`build_or_open`."""

    def __init__(self, directory: Path, *, built: bool = False):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST_FILE
        if not manifest_path.is_file():
            raise CacheError(f"{self.directory} holds no complete feature cache (no {MANIFEST_FILE})")
        self.manifest = json.loads(manifest_path.read_text())
        self.key: str = self.manifest["key"]
        # mmap_mode="r": pages are shared with every other reader and never written.
        self.tokens: np.memmap = np.load(self.directory / TOKENS_FILE, mmap_mode="r")
        if list(self.tokens.shape) != self.manifest["shape"]:
            raise CacheError(f"{self.directory}: tokens shape {self.tokens.shape} does not match "
                             f"the manifest {self.manifest['shape']}")
        #: True when this call computed the tokens, False on a cache hit.
        self.built = built

    @classmethod
    def build_or_open(cls, model, images_uint8: np.ndarray, *, img_size: int,
                      cache_dir: str | os.PathLike, data_digest: str | None = None,
                      dtype: str = "float32", batch_size: int = 64,
                      progress: bool = True, device: torch.device | str | None = None) -> "FeatureCache":
        """Open the cache for (model's w0, preprocessing, images, dtype), building it if absent.

        Concurrent callers with the same key build it once: the first takes the lock and
        builds, the others wait for the lock and then open what it wrote. ``device`` (a
        torch.device or a setting, see tangent.data.device): where the trunk runs for the build (None
        = where it is); the tokens are stored on disk as always, and the trunk goes back after.
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        data_digest = data_digest or images_digest(images_uint8)
        key = cache_key(model.base_digest(), img_size, data_digest, dtype)
        cache_dir = Path(cache_dir)
        directory = cache_dir / key
        if (directory / MANIFEST_FILE).is_file():
            return cls(directory)
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(cache_dir / f"{key}.lock"):
            if (directory / MANIFEST_FILE).is_file():  # another process built it while we waited
                return cls(directory)
            directory.mkdir(exist_ok=True)
            # temp files of a builder that was killed (we hold the lock: no one else is writing)
            for stale in directory.glob(f".{TOKENS_FILE}.*.tmp"):
                stale.unlink(missing_ok=True)
            shape, built_on = _write_tokens(model, images_uint8, directory, img_size=img_size,
                                            dtype=DTYPES[dtype], batch_size=batch_size, progress=progress,
                                            device=device)
            # "device" is informative only: not in the key, tokens agree across devices to fp32 tolerance
            manifest = {"format": FORMAT_VERSION, "key": key, "base_digest": model.base_digest(),
                        "preprocessing": preprocessing_spec(img_size), "data_digest": data_digest,
                        "dtype": dtype, "shape": list(shape), "created": time.time(),
                        "device": built_on}
            _atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=1))
        return cls(directory, built=True)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def subset(self, indices) -> "TokenDataset":
        """A lazy view of some rows (e.g. one site's partition); reads only what is indexed."""
        return TokenDataset(self.tokens, indices)

    def dataset(self) -> "TokenDataset":
        return TokenDataset(self.tokens)

    def __repr__(self) -> str:
        return f"FeatureCache({self.directory}, shape={tuple(self.tokens.shape)}, dtype={self.tokens.dtype})"


class TokenDataset(Dataset):
    """Rows of a token array as float32 tensors; indexable by an int or an index array.

    Over a cache file (an ``np.memmap``) rows are read with ``os.pread`` rather than through the
    mapping: the bytes then sit in the kernel's page cache, shared by every process, and not in
    the resident set of each reader (a Ray worker serving 25 sites would otherwise keep every
    site's mapped pages resident: hundreds of MB per worker).
    """

    def __init__(self, tokens: np.ndarray, indices=None):
        self.tokens = tokens
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self._file = None
        if isinstance(tokens, np.memmap) and tokens.filename and tokens.flags.c_contiguous:
            self._file = (str(tokens.filename), int(tokens.offset), tokens.dtype,
                          int(np.prod(tokens.shape[1:])) * tokens.dtype.itemsize)

    def __len__(self) -> int:
        return len(self.tokens) if self.indices is None else len(self.indices)

    @property
    def shape(self) -> tuple:
        return (len(self), *self.tokens.shape[1:])

    def __getitem__(self, index) -> torch.Tensor:
        index = np.asarray(index, dtype=np.int64)
        rows = index if self.indices is None else self.indices[index]
        if self._file is None:
            return torch.from_numpy(np.array(self.tokens[rows], dtype=np.float32))
        return torch.from_numpy(self._read_rows(rows))

    def _read_rows(self, rows: np.ndarray) -> np.ndarray:
        path, offset, dtype, row_bytes = self._file
        flat = np.atleast_1d(rows)
        n = len(self.tokens)
        if flat.size and (flat.min() < -n or flat.max() >= n):
            raise IndexError(f"row index out of range for {n} cached rows")
        flat = np.where(flat < 0, flat + n, flat)
        out = np.empty((flat.size, row_bytes), dtype=np.uint8)
        fd = os.open(path, os.O_RDONLY)
        try:
            i = 0
            while i < flat.size:  # one read per run of consecutive rows
                j = i + 1
                while j < flat.size and flat[j] == flat[j - 1] + 1:
                    j += 1
                want = (j - i) * row_bytes
                data = os.pread(fd, want, offset + int(flat[i]) * row_bytes)
                if len(data) != want:
                    raise CacheError(f"{path}: short read ({len(data)} of {want} bytes): truncated cache?")
                out[i:j] = np.frombuffer(data, dtype=np.uint8).reshape(j - i, row_bytes)
                i = j
        finally:
            os.close(fd)
        array = out.view(dtype).reshape(flat.size, *self.tokens.shape[1:]).astype(np.float32, copy=False)
        return array[0] if rows.ndim == 0 else array


@contextmanager
def _exclusive_lock(path: Path):
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@torch.no_grad()
def _write_tokens(model, images: np.ndarray, directory: Path, *, img_size: int, dtype,
                  batch_size: int, progress: bool, device=None) -> tuple[tuple, str]:
    """Run the trunk over all images into a temp .npy, then rename it into place; returns
    (shape, the device type it ran on)."""
    from tangent.data.device import full_fp32, module_device, resolve_device

    trunk = model.trunk
    home = module_device(trunk)
    device = home if device is None else resolve_device(device)
    was_training = trunk.training
    trunk.to(device)  # (its tensors are w0's: they move together, and back in `finally`)
    trunk.eval()
    tmp = directory / f".{TOKENS_FILE}.{os.getpid()}.tmp"
    num_images = len(images)
    out = None
    try:
        with full_fp32(device), tqdm(total=num_images, desc="trunk → cache", unit="img",
                                      disable=not progress) as bar:
            for start in range(0, num_images, batch_size):
                batch = preprocess(np.asarray(images[start:start + batch_size]), img_size)
                tokens = trunk(batch.to(device)).cpu()
                if out is None:  # the token shape is known after the first batch
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype,
                                                    shape=(num_images, *tokens.shape[1:]))
                out[start:start + len(tokens)] = tokens.numpy().astype(dtype, copy=False)
                bar.update(len(tokens))
        if out is None:
            raise CacheError("cannot cache an empty data set")
        out.flush()
        shape = out.shape
        del out
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, directory / TOKENS_FILE)
        _fsync_dir(directory)
    finally:
        trunk.to(home)
        trunk.train(was_training)
        tmp.unlink(missing_ok=True)
    return shape, device.type

