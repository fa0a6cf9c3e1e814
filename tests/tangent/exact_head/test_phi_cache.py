"""The φ cache (tangent/exact_head/phi_cache.py) on a tiny real timm ViT: rows equal FeatureExtractor's φ
bit for bit whatever rows are read together; built once (also by concurrent processes); an
incomplete or corrupt cache is never read."""
import hashlib
import json
import multiprocessing

import numpy as np
import pytest
import torch

from tangent.data.token_cache import CacheError
from tangent.exact_head.statistics import SufficientStats
from tangent.exact_head.features import FeatureExtractor, FeatureSpec
from tangent.exact_head.phi_cache import BASE_FILE, MANIFEST_FILE, PhiCache, cache_path
from tests.helpers import tiny_vit

IMG = 28
SPEC = FeatureSpec(random_features=48, random_seed=7, clip_norm=2.0, frac_bits=12)


def tiny_extractor(spec=SPEC, seed=0):
    return FeatureExtractor(tiny_vit(seed=seed, dtype=torch.float32), spec, img_size=IMG, backbone_name="tiny")


def tokens_of(extractor, n=150, seed=0):
    """Trunk tokens of n random images (what the token cache holds), float32 [n, T, d]."""
    images = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, IMG, IMG)).astype(np.float32))
    with torch.no_grad():
        return extractor.trunk(images).numpy()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    extractor = tiny_extractor()
    tokens = tokens_of(extractor)
    directory = tmp_path_factory.mktemp("phi")
    cache = PhiCache.build_or_open(extractor, tokens, cache_dir=directory, data_digest="d" * 64, progress=False)
    return extractor, tokens, cache


def test_rows_equal_the_extractors_features_exactly(setup):
    extractor, tokens, cache = setup
    assert cache.built and len(cache) == len(tokens) and cache.base.shape == (150, extractor.base_dim)
    whole = extractor.compute(torch.from_numpy(tokens))
    assert np.array_equal(cache.features(extractor, np.arange(150)), whole)
    # the refactored pieces compose to the same function
    assert np.array_equal(extractor.expand_rows(extractor.compute_base(tokens)), whole)
    batch = torch.from_numpy(tokens[:64])
    assert torch.equal(extractor.from_tokens(batch), extractor.expand(extractor.base(batch)))
    assert torch.equal(extractor.from_tokens(batch), extractor.assemble(extractor.pieces(batch)))


def test_a_rows_features_do_not_depend_on_the_rows_read_with_it(setup):
    extractor, tokens, cache = setup
    whole = cache.features(extractor, np.arange(150))
    rng = np.random.default_rng(1)
    for rows in ([0], [149], [5, 6, 7], rng.permutation(150)[:77], np.arange(150)[::-1], rng.choice(150, 130)):
        rows = np.asarray(rows)
        assert np.array_equal(cache.features(extractor, rows), whole[rows]), rows
        # and a site computing φ of only these token rows gets the same values
        assert np.array_equal(extractor.compute(tokens[rows], ids=rows), whole[rows]), rows
    chunks = list(cache.iter_features(extractor, np.arange(150), chunk_rows=40))
    assert [len(p) for p, _ in chunks] == [40, 40, 40, 30]
    assert np.array_equal(np.concatenate([phi for _, phi in chunks]), whole)


def test_statistics_from_the_cache_equal_statistics_of_the_features(setup):
    extractor, _, cache = setup
    labels = np.arange(150) % 10
    phi = extractor.compute(torch.from_numpy(setup[1]))
    central = SufficientStats.from_features(phi, labels, 10, SPEC.clip_norm, SPEC.frac_bits)
    summed = SufficientStats.total(
        SufficientStats.from_features(chunk, labels[positions], 10, SPEC.clip_norm, SPEC.frac_bits)
        for positions, chunk in cache.iter_features(extractor, np.arange(150), chunk_rows=64))
    assert summed == central


def test_second_open_is_a_hit_and_the_key_covers_features_and_data(setup, tmp_path):
    extractor, tokens, cache = setup
    again = PhiCache.build_or_open(extractor, tokens, cache_dir=cache.directory.parent, data_digest="d" * 64,
                                   progress=False)
    assert not again.built and again.directory == cache.directory
    other_spec = tiny_extractor(FeatureSpec(random_features=48, random_seed=8, clip_norm=2.0, frac_bits=12))
    assert other_spec.digest() != extractor.digest()
    assert cache_path(tmp_path, other_spec.digest(), "d" * 64) != cache_path(tmp_path, extractor.digest(), "d" * 64)
    assert cache_path(tmp_path, extractor.digest(), "e" * 64) != cache_path(tmp_path, extractor.digest(), "d" * 64)
    assert PhiCache.open(tmp_path, extractor.digest(), "d" * 64) is None


def test_incomplete_or_corrupt_caches_are_never_read(tmp_path):
    extractor = tiny_extractor()
    tokens = tokens_of(extractor, n=20)
    digest = extractor.digest()
    directory = cache_path(tmp_path, digest, "a" * 64)
    directory.mkdir(parents=True)
    (directory / BASE_FILE).write_bytes(b"half a file")
    (directory / f".{BASE_FILE}.999.tmp").write_bytes(b"a killed builder's")
    assert PhiCache.open(tmp_path, digest, "a" * 64) is None  # no manifest: not complete
    cache = PhiCache.build_or_open(extractor, tokens, cache_dir=tmp_path, data_digest="a" * 64, progress=False)
    assert cache.built and not list(directory.glob(".*tmp"))
    assert np.array_equal(cache.features(extractor, np.arange(20)), extractor.compute(tokens))

    manifest = directory / MANIFEST_FILE
    good = json.loads(manifest.read_text())
    manifest.write_text("{not json")
    with pytest.raises(CacheError, match="corrupt manifest"):
        PhiCache(directory)
    manifest.write_text(json.dumps(good | {"shape": [21, extractor.base_dim]}))
    with pytest.raises(CacheError, match="does not match the manifest"):
        PhiCache(directory)
    manifest.write_text(json.dumps(good | {"data_digest": "b" * 64}))
    with pytest.raises(CacheError, match="key"):
        PhiCache(directory)
    manifest.write_text(json.dumps(good))
    np.save(directory / BASE_FILE, np.zeros((20, extractor.base_dim), np.float64))  # wrong dtype
    with pytest.raises(CacheError, match="does not match"):
        PhiCache(directory)


def _build_in_child(cache_dir, queue):
    """Forked child: builds (or waits for and opens) the same cache."""
    torch.set_num_threads(1)
    extractor = tiny_extractor()
    cache = PhiCache.build_or_open(extractor, tokens_of(extractor, n=70), cache_dir=cache_dir,
                                   data_digest="c" * 64, progress=False)
    rows = cache.features(extractor, np.arange(70))
    queue.put({"built": cache.built, "sha": hashlib.sha256(rows.tobytes()).hexdigest()})


def test_concurrent_builders_build_once(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    procs = [context.Process(target=_build_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for proc in procs:
        proc.start()
    outs = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert sorted(o["built"] for o in outs) == [False, True] and outs[0]["sha"] == outs[1]["sha"]
    assert len(list(tmp_path.glob("phi-*/base.npy"))) == 1 and not list(tmp_path.glob("phi-*/.*tmp"))
