"""On-disk cache of the exact head's base features z, next to the trunk-token cache.

φ(x) = expand(z(x)) (tangent/exact_head/features.py): z, the normalized pieces of the pretrained model's last
block, costs a forward pass of that block per image (3.4 ms/image on 2 cores at img 56); the
random features are one small matrix product. So z is computed once per data set from the token
cache and stored; φ is expanded from it on the fly. Same discipline as tangent/data/token_cache.py: built
once under an fcntl lock, manifest written last (its presence means complete), rows read with
``pread`` (TokenDataset) so no reader maps or loads the whole file.

Exactness: z and φ are computed by :meth:`FeatureExtractor.compute`'s rule (fixed batch size, a
row at position ``data-set index % batch size``, one thread), so a row's φ never depends on which
rows are computed with it: a site reading its rows of the cache, a site computing φ of its own
token rows, and the driver streaming all rows get the same float32 values, hence the same
integers.

Layout of ``cache_dir``::

    phi-<key>/base.npy        z, float32 [N, base_dim]
    phi-<key>/manifest.json   written last
    phi-<key>.lock            fcntl lock held by the one process that builds

``key`` = sha256 over the feature digest (backbone weights, feature spec, Ω, preprocessing), the
data digest (the images digest the token cache is keyed on) and the format version.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from tangent.data.token_cache import CacheError, TokenDataset, _atomic_write_text, _exclusive_lock, _fsync_dir

FORMAT_VERSION = 1
BASE_FILE = "base.npy"
MANIFEST_FILE = "manifest.json"
#: rows per padded batch, for z and for φ: FeatureExtractor.compute's default, so that a site
#: computing φ from its own token rows gets the values the cache gives
BATCH_SIZE = 64
#: rows per chunk when streaming φ out of the cache (bounds the float32 φ held at once)
CHUNK_ROWS = 2048


def phi_cache_key(feature_digest: str, data_digest: str) -> str:
    spec = {"format": FORMAT_VERSION, "kind": "exact-head-base", "feature_digest": feature_digest,
            "data_digest": data_digest}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def cache_path(cache_dir: str | os.PathLike, feature_digest: str, data_digest: str) -> Path:
    return Path(cache_dir) / f"phi-{phi_cache_key(feature_digest, data_digest)}"


class PhiCache:
    """Read-only view of a complete φ cache. Build one with :meth:`build_or_open`."""

    def __init__(self, directory: str | os.PathLike, *, built: bool = False):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST_FILE
        if not manifest_path.is_file():
            raise CacheError(f"{self.directory} holds no complete φ cache (no {MANIFEST_FILE})")
        try:
            self.manifest = json.loads(manifest_path.read_text())
            shape = [int(v) for v in self.manifest["shape"]]
            self.feature_digest = str(self.manifest["feature_digest"])
            self.data_digest = str(self.manifest["data_digest"])
        except (ValueError, KeyError, TypeError) as err:
            raise CacheError(f"{manifest_path}: corrupt manifest ({type(err).__name__}: {err})") from err
        if self.directory.name != f"phi-{phi_cache_key(self.feature_digest, self.data_digest)}":
            raise CacheError(f"{self.directory}: the manifest's digests do not give this directory's key")
        try:
            base = np.load(self.directory / BASE_FILE, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise CacheError(f"{self.directory / BASE_FILE}: unreadable ({err})") from err
        if list(base.shape) != shape or base.dtype != np.float32:
            raise CacheError(f"{self.directory}: base {base.dtype} {base.shape} does not match the manifest {shape}")
        #: rows of z, read with pread (never mapped resident)
        self.base = TokenDataset(base)
        self.built = built

    @classmethod
    def open(cls, cache_dir: str | os.PathLike, feature_digest: str, data_digest: str) -> "PhiCache | None":
        """The complete cache for (features, data) in ``cache_dir``, or None if there is none."""
        directory = cache_path(cache_dir, feature_digest, data_digest)
        return cls(directory) if (directory / MANIFEST_FILE).is_file() else None

    @classmethod
    def build_or_open(cls, extractor, tokens, *, cache_dir: str | os.PathLike, data_digest: str,
                      feature_digest: str | None = None, progress: bool = True) -> "PhiCache":
        """Open the cache of z for ``tokens`` (all rows of a data set: a TokenDataset or an array
        [N, T, d], whose images digest is ``data_digest``), building it if absent.

        Concurrent callers build it once (the first takes the lock, the others wait and open)."""
        feature_digest = feature_digest or extractor.digest()
        existing = cls.open(cache_dir, feature_digest, data_digest)
        if existing is not None:
            return existing
        directory = cache_path(cache_dir, feature_digest, data_digest)
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(directory.with_name(directory.name + ".lock")):
            if (directory / MANIFEST_FILE).is_file():  # another process built it while we waited
                return cls(directory)
            directory.mkdir(exist_ok=True)
            for stale in directory.glob(f".{BASE_FILE}.*.tmp"):  # a killed builder's (we hold the lock)
                stale.unlink(missing_ok=True)
            shape = _write_base(extractor, tokens, directory, progress=progress)
            manifest = {"format": FORMAT_VERSION, "key": phi_cache_key(feature_digest, data_digest),
                        "feature_digest": feature_digest, "data_digest": data_digest,
                        "feature_spec": extractor.spec.to_config(), "dtype": "float32",
                        "shape": list(shape), "batch_size": BATCH_SIZE, "created": time.time()}
            _atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=1))
        return cls(directory, built=True)

    def __len__(self) -> int:
        return len(self.base)

    def check(self, extractor) -> None:
        if self.base.shape[1] != extractor.base_dim:
            raise CacheError(f"{self.directory}: base width {self.base.shape[1]} but the extractor's is "
                             f"{extractor.base_dim}")

    def features(self, extractor, rows) -> np.ndarray:
        """φ [len(rows), p] float32 of data-set rows (any order), expanded from z in padded batches."""
        self.check(extractor)
        rows = np.asarray(rows, dtype=np.int64)
        return extractor.expand_rows(TokenDataset(self.base.tokens, rows), batch_size=BATCH_SIZE, ids=rows)

    def iter_features(self, extractor, rows, chunk_rows: int = CHUNK_ROWS):
        """(positions, φ) chunks over ``rows``: a whole data set's φ without holding it at once."""
        rows = np.asarray(rows, dtype=np.int64)
        for start in range(0, len(rows), chunk_rows):
            yield np.arange(start, min(len(rows), start + chunk_rows)), self.features(
                extractor, rows[start:start + chunk_rows])

    def __repr__(self) -> str:
        return f"PhiCache({self.directory}, shape={tuple(self.base.shape)})"


def _write_base(extractor, tokens, directory: Path, *, progress: bool) -> tuple:
    """z of every token row into a temp .npy (padded batches), then rename it into place."""
    n = len(tokens)
    if n == 0:
        raise CacheError("cannot cache an empty data set")
    tmp = directory / f".{BASE_FILE}.{os.getpid()}.tmp"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, extractor.base_dim))
    step = BATCH_SIZE * 16  # tokens read per pread run; z itself is computed in BATCH_SIZE batches
    try:
        with tqdm(total=n, desc="φ base → cache", unit="img", disable=not progress) as bar:
            for start in range(0, n, step):
                stop = min(n, start + step)
                chunk = tokens[np.arange(start, stop)]
                out[start:stop] = extractor.compute_base(chunk, batch_size=BATCH_SIZE, ids=np.arange(start, stop))
                bar.update(stop - start)
        out.flush()
        del out
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, directory / BASE_FILE)
        _fsync_dir(directory)
    finally:
        tmp.unlink(missing_ok=True)
    return (n, extractor.base_dim)
