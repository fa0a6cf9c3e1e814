"""FeatureCache on a tiny real TangentViT: hits don't recompute, training from the cache is
training from images, and concurrent processes build once and read the same bytes."""

import hashlib
import json
import multiprocessing

import numpy as np
import pytest
import torch

from tangent.data.token_cache import CacheError, FeatureCache
from tangent.data.sets import preprocess
from tangent.training.trainer import TrainConfig, fit, loss_fn
from tests.helpers import tiny_model, uint8_images

IMG = 28


def count_trunk_calls(model):
    calls = []
    model.trunk.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_second_build_is_a_hit(tmp_path):
    model, images = tiny_model("avg"), uint8_images()
    calls = count_trunk_calls(model)
    first = FeatureCache.build_or_open(model, images, img_size=IMG, cache_dir=tmp_path,
                                       batch_size=16, progress=False)
    assert first.built and len(calls) == 3 and len(first) == 40
    tokens_file = first.directory / "tokens.npy"
    mtime = tokens_file.stat().st_mtime_ns
    second = FeatureCache.build_or_open(model, images, img_size=IMG, cache_dir=tmp_path,
                                        progress=False)
    assert not second.built and len(calls) == 3 and tokens_file.stat().st_mtime_ns == mtime
    assert second.key == first.key and np.array_equal(second.tokens, first.tokens)
    assert not second.tokens.flags.writeable and isinstance(second.tokens, np.memmap)
    # the cache holds the trunk's output (up to batch-size-dependent float rounding)
    with torch.no_grad():
        expected = model.trunk(preprocess(images, IMG))
    assert torch.allclose(torch.from_numpy(np.array(second.tokens)), expected, atol=1e-6)
    manifest = json.loads((first.directory / "manifest.json").read_text())
    assert manifest["base_digest"] == model.base_digest() and manifest["shape"] == [40, 17, 32]


def test_key_covers_weights_preprocessing_data_and_dtype(tmp_path):
    model, images = tiny_model("avg"), uint8_images()
    build = lambda m, imgs, **kw: FeatureCache.build_or_open(  # noqa: E731
        m, imgs, cache_dir=tmp_path, progress=False, **{"img_size": IMG, **kw})
    keys = {build(model, images).key, build(tiny_model("avg", seed=1), images).key,
            build(model, uint8_images(seed=1)).key, build(model, images, dtype="float16").key}
    assert len(keys) == 4
    half = build(model, images, dtype="float16")
    assert half.tokens.dtype == np.float16
    assert np.allclose(half.tokens, build(model, images).tokens, atol=1e-2)
    view = half.subset([3, 1])
    assert view.shape == (2, 17, 32) and view[0].dtype == torch.float32
    assert torch.equal(view[np.arange(2)], torch.from_numpy(np.array(half.tokens[[3, 1]], np.float32)))


def test_a_killed_builders_temp_file_is_removed_by_the_next_build(tmp_path):
    model, images = tiny_model("avg"), uint8_images()
    first = FeatureCache.build_or_open(model, images, img_size=IMG, cache_dir=tmp_path, progress=False)
    (first.directory / "manifest.json").unlink()  # as if the build had been killed before the end
    stale = first.directory / ".tokens.npy.999999.tmp"
    stale.write_bytes(b"\0" * 4096)
    again = FeatureCache.build_or_open(model, images, img_size=IMG, cache_dir=tmp_path, progress=False)
    assert again.built and not stale.exists()
    assert [p.name for p in again.directory.iterdir() if p.name.endswith(".tmp")] == []


def test_incomplete_directory_is_not_opened(tmp_path):
    (tmp_path / "x").mkdir()
    np.save(tmp_path / "x" / "tokens.npy", np.zeros((2, 3, 4), np.float32))  # no manifest
    with pytest.raises(CacheError):
        FeatureCache(tmp_path / "x")


def test_training_from_cache_equals_training_from_images(tmp_path):
    images = uint8_images(48)
    labels = np.arange(48) % 10
    cached_model, image_model = tiny_model("avg"), tiny_model("avg")
    cache = FeatureCache.build_or_open(cached_model, images, img_size=IMG, cache_dir=tmp_path,
                                       progress=False)
    pixels = preprocess(images, IMG)
    # same loss and gradients on a batch
    grads = []
    for model, inputs, cached in ((cached_model, torch.from_numpy(np.array(cache.tokens[:16])), True),
                                  (image_model, pixels[:16], False)):
        logits = model.linearized(inputs) if cached else model(inputs)
        loss = loss_fn("rsl")(logits, torch.as_tensor(labels[:16]))
        grads.append((loss.detach(), torch.autograd.grad(loss, list(model.linearized.parameters()))))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    # and the same Δw after a few steps with the same seed (SGD: Adam would blow float noise in
    # gradients that are zero in exact arithmetic, e.g. the key bias, up to ±lr steps)
    config = TrainConfig(epochs=2, batch_size=16, lr=0.1, optimizer="sgd", seed=3)
    from_cache = fit(cached_model, cache.tokens, labels, config, from_cache=True, progress=False)
    from_images = fit(image_model, pixels, labels, config, from_cache=False, progress=False)
    assert from_cache.loss == pytest.approx(from_images.loss, rel=1e-5)
    a, b = cached_model.delta_state_dict(), image_model.delta_state_dict()
    assert any(v.abs().max() > 0 for v in a.values())
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


def _open_in_child(mode, cache_dir, queue):
    """Child process (forked: torch and the model come from the parent, no re-import)."""
    torch.set_num_threads(1)
    if mode == "build":
        cache = FeatureCache.build_or_open(tiny_model("avg"), uint8_images(), img_size=IMG,
                                           cache_dir=cache_dir, batch_size=8, progress=False)
    else:
        cache = FeatureCache(mode)
    queue.put({"built": cache.built, "sha": hashlib.sha256(cache.tokens.tobytes()).hexdigest(),
               "memmap": isinstance(cache.tokens, np.memmap)})


def run_concurrently(mode, cache_dir, n=2):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    procs = [context.Process(target=_open_in_child, args=(mode, str(cache_dir), queue)) for _ in range(n)]
    for proc in procs:
        proc.start()
    outs = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    return outs


def test_concurrent_builders_build_once(tmp_path):
    outs = run_concurrently("build", tmp_path)
    assert sorted(o["built"] for o in outs) == [False, True]
    assert outs[0]["sha"] == outs[1]["sha"]
    assert len(list(tmp_path.glob("*/tokens.npy"))) == 1 and not list(tmp_path.glob("*/.*tmp"))


def test_concurrent_readers_read_identical_bytes(tmp_path):
    cache = FeatureCache.build_or_open(tiny_model("avg"), uint8_images(), img_size=IMG,
                                       cache_dir=tmp_path, progress=False)
    outs = run_concurrently(str(cache.directory), tmp_path)
    expected = hashlib.sha256(cache.tokens.tobytes()).hexdigest()
    assert [o["sha"] for o in outs] == [expected, expected]
    assert all(o["memmap"] and not o["built"] for o in outs)


def test_token_rows_read_with_pread_equal_the_mapping(tmp_path):
    from tangent.data.token_cache import TokenDataset

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float16):
        np.save(tmp_path / "t.npy", rng.standard_normal((40, 5, 3)).astype(dtype))
        tokens = np.load(tmp_path / "t.npy", mmap_mode="r")
        subset = np.array([7, 8, 9, 3, 39, 0, 1])
        view = TokenDataset(tokens, subset)
        assert view._file is not None  # the pread path, not the mapping
        for index in (np.arange(7), np.array([6, 0, 2, 2]), np.array([], dtype=np.int64), 4, -1):
            got = view[index]
            expected = torch.from_numpy(np.array(tokens[subset[index]], dtype=np.float32))
            assert got.dtype == torch.float32 and got.shape == expected.shape and torch.equal(got, expected)
        whole = TokenDataset(tokens)
        assert torch.equal(whole[np.arange(40)], torch.from_numpy(np.array(tokens, dtype=np.float32)))
        with pytest.raises(IndexError):
            whole[np.array([40])]
