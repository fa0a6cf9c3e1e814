"""Bring-your-own backbone: small timm ViTs with random weights, saved to disk and loaded back
as a run would; the closed-form tangent against torch.func.jvp of the real timm model for each
variant, composition, named refusals, and the identity of the weights in the digests."""
from __future__ import annotations

import json

import pytest
import torch

from tangent.model.checkpoint import CheckpointError, read_checkpoint
from tangent.model.composition import compose
from tangent.model.nlft import NLFTViT
from tangent.model.pretrained import load_backbone
from tangent.model.vit import TangentViT, UnsupportedBackbone, check_linearizable_backbone
from tangent.protocol.spec import ModelSpec, build_model
from tests.backbone_files import IMG_SIZE, VARIANTS, build, save
from tests.helpers import assert_tangent_is_the_jvp, random_delta, rel_err

D = torch.float64


def images(n=3, seed=1, dtype=D):
    return torch.randn(n, 3, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return {variant: save(root / variant, variant) for variant in VARIANTS}


def loaded(checkpoints, variant, dtype=D):
    arch = VARIANTS[variant][0]
    return load_backbone(arch, checkpoints[variant], img_size=IMG_SIZE).to(dtype)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("k,linearize_cls", [(1, False), (2, True)])
def test_tangent_equals_jvp_of_the_timm_model(checkpoints, variant, k, linearize_cls):
    model = TangentViT.from_timm(loaded(checkpoints, variant), num_classes=5, linearized_blocks=k,
                                 linearize_cls=linearize_cls, seed=3, reinit=False)
    assert_tangent_is_the_jvp(model, images())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_composed_model_is_the_ensemble(checkpoints, variant):
    model = TangentViT.from_timm(loaded(checkpoints, variant), 5, linearized_blocks=2, linearize_cls=True, seed=4)
    deltas = [random_delta(model, seed=s) for s in (10, 11, 12)]
    weights = [3.0, 1.0, 6.0]
    x = images()
    with torch.no_grad():
        logits = []
        for d in deltas:
            model.load_delta(d)
            logits.append(model(x))
        model.load_delta(compose(deltas, weights))
        composed = model(x)
    want = sum(w * l for w, l in zip(weights, logits)) / sum(weights)
    assert rel_err(composed, want) <= 1e-12
    assert rel_err(logits[0], want) > 1e-2


@pytest.mark.parametrize("variant", ["registers", "distilled", "avg-pool"])
def test_nlft_at_w0_plus_delta_is_the_timm_model(checkpoints, variant):
    """The NLFT baseline pools as timm does for every prefix-token layout."""
    model = NLFTViT.from_timm(loaded(checkpoints, variant), 5, linearized_blocks=1, seed=3)
    delta = random_delta(model, scale=0.05)
    model.load_delta(delta)
    x = images()
    with torch.no_grad():
        assert rel_err(model(x), model.base_model_with_delta(delta)(x)) <= 1e-12


def test_loaded_weights_are_the_saved_ones_in_every_layout(tmp_path):
    reference = build("registers").state_dict()
    for layout in ("timm", "safetensors", "state-dict"):
        path = save(tmp_path / layout, "registers", layout=layout)
        model = load_backbone("vit_small_patch14_reg4_dinov2", path, img_size=IMG_SIZE,
                              mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        state = model.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference), layout


def test_other_normalisation_is_folded_into_the_patch_embedding(checkpoints):
    """On ImageNet-normalised input the loaded model computes what the checkpoint computes on
    input normalised by its own mean/std (0.5, 0.5 here), up to the float32 rounding of the
    folded weights."""
    pixels = torch.rand(2, 3, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(0), dtype=D)
    imagenet = (pixels - torch.tensor([0.485, 0.456, 0.406], dtype=D).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225], dtype=D).view(1, 3, 1, 1)
    for variant in ("avg-pool", "registers"):
        folded = loaded(checkpoints, variant)
        original = build(variant).to(D)
        assert rel_err(folded(imagenet), original((pixels - 0.5) / 0.5)) <= 1e-6
        assert rel_err(folded(imagenet), original(imagenet)) > 1e-4  # the normalisation matters


def test_img_size_resamples_the_position_grid(checkpoints):
    model = load_backbone("vit_small_patch14_reg4_dinov2", checkpoints["registers"], img_size=48)
    assert model.patch_embed.grid_size == (6, 6)
    assert model(torch.zeros(1, 3, 48, 48)).shape == (1, 32)


def test_mismatching_files_are_refused_naming_the_file_and_the_difference(checkpoints, tmp_path):
    path = checkpoints["registers"]
    with pytest.raises(CheckpointError, match=r"config names architecture 'vit_small_patch14_reg4_dinov2'"):
        load_backbone("vit_small_patch16_224", path, img_size=IMG_SIZE)
    with pytest.raises(CheckpointError, match=r"does not exist|do not exist"):
        load_backbone("vit_small_patch16_224", tmp_path / "nope.safetensors", img_size=IMG_SIZE)
    with pytest.raises(CheckpointError, match="sha256"):
        load_backbone("vit_small_patch14_reg4_dinov2", path, img_size=IMG_SIZE, expected_sha256="0" * 64)
    with pytest.raises(CheckpointError, match="not a timm architecture"):
        load_backbone("vit_nonexistent_patch16", path, img_size=IMG_SIZE)
    # a config whose model_args build another model: missing keys / shapes, both named with the file
    deeper = save(tmp_path / "deeper", "avg-pool")
    config = json.loads((deeper / "config.json").read_text())
    (deeper / "config.json").write_text(json.dumps(config | {"model_args": config["model_args"] | {"depth": 4}}))
    with pytest.raises(CheckpointError, match=rf"{deeper}.*missing keys blocks\.3\."):
        load_backbone("vit_small_patch16_224", deeper, img_size=IMG_SIZE)
    wider = save(tmp_path / "wider", "avg-pool")
    (wider / "config.json").write_text(json.dumps(config | {"model_args": config["model_args"] | {"mlp_ratio": 3.0}}))
    with pytest.raises(CheckpointError, match=r"shapes differ: blocks\.0\.mlp\.fc1\.bias \(64,\) \(timm: \(96,\)\)"):
        load_backbone("vit_small_patch16_224", wider, img_size=IMG_SIZE)
    with pytest.raises(CheckpointError, match="patch size"):
        load_backbone("vit_small_patch14_reg4_dinov2", path, img_size=36)


@pytest.mark.parametrize("build_args,reason", [
    ({"qk_norm": True}, "qk-norm"),
    ({"act_layer": "gelu_tanh"}, "only exact"),
    ({"global_pool": "map"}, "attention pooling"),
    ({"global_pool": "avgmax"}, "global_pool 'avgmax'"),
    ({"norm_layer": "rmsnorm"}, "RMSNorm"),
])
def test_architectures_without_a_closed_form_are_refused_by_name(build_args, reason):
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=IMG_SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                            num_classes=0, **build_args)
    with pytest.raises(UnsupportedBackbone, match=rf"'my_vit' cannot be linearized: .*{reason}"):
        check_linearizable_backbone(vit, "my_vit")
    with pytest.raises(UnsupportedBackbone, match=reason):
        TangentViT.from_timm(vit, 5)


def test_other_timm_families_are_refused_by_name():
    import timm

    for arch, reason in (("vit_small_patch16_18x2_224", "ParallelThingsBlock"),
                         ("eva02_tiny_patch14_224", "EvaBlock is not timm.s pre-norm Block"),
                         ("vit_medium_patch16_reg1_gap_256", None)):
        vit = timm.create_model(arch, pretrained=False, num_classes=0, depth=2, img_size=32)
        if reason is None:  # a supported one among them: average pooling with a register token
            check_linearizable_backbone(vit, arch)
            continue
        with pytest.raises(UnsupportedBackbone, match=rf"{arch}.*{reason}"):
            check_linearizable_backbone(vit, arch)


def test_spec_resolves_from_the_checkpoint_and_names_it_in_the_digests(checkpoints, tmp_path):
    from tangent.exact_head.features import PIECES, FeatureExtractor, FeatureSpec

    arch = VARIANTS["registers"][0]
    spec = ModelSpec(backbone=arch, backbone_weights=str(checkpoints["registers"]), img_size=0,
                     num_classes=4).resolved()
    ckpt = read_checkpoint(checkpoints["registers"])
    assert (spec.img_size, spec.backbone_sha256, spec.backbone_mean) == (IMG_SIZE, ckpt.sha256, (0.5, 0.5, 0.5))
    assert ModelSpec.from_config(spec.to_config()) == spec  # what the server sends is what sites read
    assert "backbone-weights" not in ModelSpec().to_config()  # the default spec's record is unchanged
    model, digest = build_model(spec, cached=False)
    assert model.options["backbone_sha256"] == ckpt.sha256
    # the same file elsewhere (a site's own copy) is the same backbone
    copy = save(tmp_path / "copy", "registers", layout="safetensors")
    assert build_model(ModelSpec.from_config(spec.to_config() | {"backbone-weights": str(copy)}),
                       cached=False)[1] == digest
    # the same tensors under another normalisation, or other weights: other digests
    other_norm = ModelSpec.from_config(spec.to_config() | {"backbone-mean": "0.4,0.4,0.4"})
    assert build_model(other_norm, cached=False)[1] != digest
    other = save(tmp_path / "other", "registers", layout="safetensors", seed=1)
    moved = ModelSpec.from_config(spec.to_config() | {"backbone-weights": str(other), "backbone-sha256": ""}).resolved()
    assert moved.backbone_sha256 != spec.backbone_sha256 and build_model(moved, cached=False)[1] != digest
    features = [FeatureExtractor.from_spec(s, FeatureSpec(pieces=PIECES)) for s in (spec, other_norm)]
    assert features[0].dim == 4 * 32 and features[0].digest() != features[1].digest()
    phi = features[0].compute(images(5, dtype=torch.float32), tokens=False)
    assert phi.shape == (5, 128)
    with pytest.raises(CheckpointError, match="pins backbone-sha256"):
        ModelSpec.from_config(spec.to_config() | {"backbone-sha256": "ab" * 32}).resolved()
    with pytest.raises(CheckpointError, match="sha256"):  # a site handed another file with the run's spec
        build_model(ModelSpec.from_config(spec.to_config() | {"backbone-weights": str(other)}), cached=False)
