"""Frozen multi-level features φ of the pretrained backbone (real DINOv2 ViT-S/14 weights)."""
import numpy as np
import pytest
import torch

from tangent.exact_head.statistics import quantize
from tangent.exact_head.features import PIECES, FeatureExtractor, FeatureSpec


@pytest.fixture(scope="module")
def images():
    from tangent.data.sets import load_fashion_mnist, preprocess

    raw, _ = load_fashion_mnist("test")
    return preprocess(raw[:12], 56)


@pytest.fixture(scope="module")
def extractor(pretrained_vit):
    return FeatureExtractor(pretrained_vit, FeatureSpec(pieces=PIECES, random_features=64, random_seed=3), img_size=56)


@pytest.mark.slow
def test_final_pieces_are_the_pretrained_models_own_final_tokens(extractor, pretrained_vit, images):
    """Independent path: timm's forward_features (all 12 pretrained blocks + final norm)."""
    with torch.no_grad():
        final = pretrained_vit.forward_features(images)
    phi = extractor.from_images(images)
    d = extractor.embed_dim
    m = len(extractor.spec.pieces)

    def rms_normed(v):
        return v / v.pow(2).mean(1, keepdim=True).sqrt() / np.sqrt(d * m)

    torch.testing.assert_close(phi[:, :d], rms_normed(final[:, 0]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(phi[:, d:2 * d], rms_normed(final[:, 1:].mean(1)), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_features_from_cached_trunk_tokens_equal_features_from_images(extractor, images):
    from tangent.protocol.spec import ModelSpec, build_model

    taft, _ = build_model(ModelSpec(img_size=56))  # the reinit TAFT model whose trunk fills the cache
    assert extractor.trunk_matches(taft.trunk)
    with torch.no_grad():
        tokens = taft.trunk(images)
    torch.testing.assert_close(extractor.from_tokens(tokens), extractor.from_images(images), rtol=0, atol=0)


def test_base_features_have_norm_one_and_random_features_are_bounded(extractor, images):
    phi = extractor.from_images(images).double()
    base = extractor.base_dim
    assert phi.shape == (12, extractor.dim) == (12, 4 * 384 + 64)
    torch.testing.assert_close(phi[:, :base].norm(dim=1), torch.ones(12, dtype=torch.float64), rtol=1e-5, atol=0)
    assert (phi[:, base:] >= 0).all() and phi.norm(dim=1).max() < extractor.spec.clip_norm


def test_features_do_not_depend_on_the_batch_they_are_computed_in(extractor, images):
    """A site computes φ of whichever rows it holds (after forgetting some, of fewer rows): a row's
    φ, hence its integers, must not depend on the other rows of its batch."""
    with torch.no_grad():
        tokens = extractor.trunk(images)
    whole = extractor.compute(tokens, batch_size=8)
    for keep in ([0], [3, 4, 5], [1, 2, 6, 7, 8, 9, 10, 11], list(range(12))[::-1]):
        part = extractor.compute(tokens[keep], batch_size=8)
        assert np.array_equal(part, whole[keep]), keep
        spec = extractor.spec
        assert np.array_equal(quantize(part, spec.clip_norm, spec.frac_bits),
                              quantize(whole[keep], spec.clip_norm, spec.frac_bits))


def test_spec_round_trips_and_is_validated():
    spec = FeatureSpec(pieces=("final_cls", "input_mean"), random_features=128, random_seed=5,
                       clip_norm=1.5, frac_bits=14)
    assert FeatureSpec.from_config(spec.to_config()) == spec
    assert spec.dim() == 2 * 384 + 128
    projected = FeatureSpec(pieces=PIECES, projection=64, random_features=8)
    assert FeatureSpec.from_config(projected.to_config()) == projected and projected.dim() == 72
    with pytest.raises(ValueError, match="projection"):
        FeatureSpec(projection=-1)
    with pytest.raises(ValueError, match="pieces"):
        FeatureSpec(pieces=("final_cls", "final_cls"))
    with pytest.raises(ValueError, match="pieces"):
        FeatureSpec(pieces=("block3_cls",))
    with pytest.raises(ValueError, match="clip_norm"):
        FeatureSpec(clip_norm=0.0)
    with pytest.raises(ValueError, match="frac_bits"):
        FeatureSpec(frac_bits=40)
    assert set(PIECES) == {"final_cls", "final_mean", "input_cls", "input_mean"}


def test_digest_covers_the_spec_and_the_random_map(pretrained_vit):
    a = FeatureExtractor(pretrained_vit, FeatureSpec(random_features=8, random_seed=1), img_size=56)
    same = FeatureExtractor(pretrained_vit, FeatureSpec(random_features=8, random_seed=1), img_size=56)
    assert a.digest() == same.digest()
    assert torch.equal(a.omega, same.omega)
    for other in (FeatureSpec(random_features=8, random_seed=2), FeatureSpec(random_features=9, random_seed=1),
                  FeatureSpec(random_features=8, random_seed=1, clip_norm=3.0),
                  FeatureSpec(pieces=("final_cls",), random_features=8, random_seed=1),
                  FeatureSpec(projection=32, random_features=8, random_seed=1)):
        assert FeatureExtractor(pretrained_vit, other, img_size=56).digest() != a.digest()
    # a machine whose generator drew another Ω must not match either
    tampered = FeatureExtractor(pretrained_vit, FeatureSpec(random_features=8, random_seed=1), img_size=56)
    tampered.omega = tampered.omega.clone()
    tampered.omega[0, 0] += 1e-3
    assert tampered.digest() != a.digest()


def test_a_projected_spec_has_unit_norm_base_features_and_is_deterministic(pretrained_vit, images):
    plain = FeatureExtractor(pretrained_vit, FeatureSpec(pieces=PIECES, random_features=4, random_seed=2), img_size=56)
    projected = FeatureExtractor(pretrained_vit, FeatureSpec(projection=32, random_features=4, random_seed=2),
                                 img_size=56)
    phi = projected.from_images(images).double()
    assert phi.shape == (12, 36)
    torch.testing.assert_close(phi[:, :32].norm(dim=1), torch.ones(12, dtype=torch.float64), rtol=1e-5, atol=0)
    assert projected.omega.shape == (4, 32) and plain.omega.shape == (4, 1536)
    assert torch.equal(projected.beta, FeatureExtractor(pretrained_vit, FeatureSpec(projection=32, random_features=4,
                                                                                   random_seed=2), img_size=56).beta)


@pytest.mark.slow
def test_quadrant_pieces_are_the_means_of_the_four_quadrants_of_timms_final_patch_grid(pretrained_vit, images):
    """Independent path: timm's forward_features, the 4×4 patch grid at img 56 sliced by hand."""
    spec = FeatureSpec(pieces=("final_cls", "final_quad", "input_quad"))
    ex = FeatureExtractor(pretrained_vit, spec, img_size=56)
    assert ex.dim == 384 * 9 == spec.dim()
    with torch.no_grad():
        final = pretrained_vit.forward_features(images)
    phi = ex.from_images(images)
    grid = final[:, 1:].reshape(len(images), 4, 4, 384)  # row-major patches
    quads = [grid[:, r:r + 2, c:c + 2].mean(dim=(1, 2)) for r in (0, 2) for c in (0, 2)]
    scale = np.sqrt(ex.dim)

    def rms_normed(v):
        return v / v.pow(2).mean(1, keepdim=True).sqrt() / scale

    for i, quad in enumerate(quads):
        torch.testing.assert_close(phi[:, 384 * (1 + i):384 * (2 + i)], rms_normed(quad), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(phi.norm(dim=1), torch.ones(len(images)), rtol=1e-5, atol=1e-5)
    # the input quadrants differ from the final ones and are batch-independent like every piece
    assert not torch.allclose(phi[:, 5 * 384:], phi[:, 384:5 * 384])
    one_by_one = np.concatenate([ex.compute(images[i:i + 1], tokens=False, batch_size=4) for i in range(3)])
    assert np.array_equal(one_by_one, ex.compute(images[:3], tokens=False, batch_size=4))


def test_quadrant_pooling_refuses_a_non_square_grid():
    with pytest.raises(ValueError, match="square patch grid"):
        FeatureExtractor.quadrants(torch.zeros(2, 6, 8))


def test_an_extractor_sharing_w0s_equal_tensors_computes_the_same_features_and_digest():
    """A worker holds w0 and the extractor: the extractor's backbone tensors equal to w0's are
    shared (one copy), values, features and digest unchanged; re-initialised tensors are not."""
    from tangent.model.vit import TangentViT
    from tests.helpers import TINY_IMG, tiny_vit

    spec = FeatureSpec(pieces=("final_cls", "final_mean", "input_mean"), random_features=16, random_seed=3)
    backbone = tiny_vit(dtype=torch.float32, spread=True)
    model = TangentViT.from_timm(tiny_vit(dtype=torch.float32, spread=True), num_classes=10, seed=0, reinit=False)
    reinit = TangentViT.from_timm(tiny_vit(dtype=torch.float32, spread=True), num_classes=10, seed=0, reinit=True)
    alone = FeatureExtractor(tiny_vit(dtype=torch.float32, spread=True), spec, img_size=TINY_IMG)
    shared = FeatureExtractor(backbone, spec, img_size=TINY_IMG)
    x = torch.randn(4, 3, TINY_IMG, TINY_IMG, generator=torch.Generator().manual_seed(0))

    freed = shared.share_tensors_with(model.w0_module)
    tensors = dict(backbone.state_dict())
    w0 = model.w0_module.state_dict()
    assert freed == sum(t.numel() * t.element_size() for t in tensors.values())  # all of it: reinit is off
    assert all(tensors[name].data_ptr() == w0[name].data_ptr() for name in tensors)
    assert shared.digest() == alone.digest()
    assert np.array_equal(shared.compute(x, batch_size=4, tokens=False), alone.compute(x, batch_size=4, tokens=False))

    other = FeatureExtractor(tiny_vit(dtype=torch.float32, spread=True), spec, img_size=TINY_IMG)
    kept = other.share_tensors_with(reinit.w0_module)  # re-initialised blocks differ: those stay
    assert 0 < kept < freed and other.digest() == alone.digest()
