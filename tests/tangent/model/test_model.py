"""TangentViT against torch.func.jvp of the plain timm model (float64), finite differences,
the CLS-only path against the full path, and the model contract."""

import pytest
import torch

from tangent.model.vit import CLS_DELTA_KEY, TangentViT
from tests.helpers import assert_tangent_is_the_jvp, images, random_delta, rel_err, tiny_vit

D = torch.float64


# every pair of (LayerScale init, k, CLS linearization, pooling) values occurs at least once
CASES = [(1e-5, 1, False, "token"), (1e-5, 2, True, "avg"), (0.1, 1, True, "token"),
         (0.1, 2, False, "avg"), (0.1, 1, False, "avg"), (1e-5, 2, True, "token"),
         (0.1, 2, True, "token")]


@pytest.mark.parametrize("init_values,k,linearize_cls,pool", CASES)
def test_matches_torch_func_jvp(init_values, k, linearize_cls, pool):
    model = TangentViT.from_timm(tiny_vit(init_values, pool), num_classes=5, linearized_blocks=k,
                                 linearize_cls=linearize_cls, seed=3)
    assert_tangent_is_the_jvp(model, images())


@pytest.mark.parametrize("linearize_cls,pool", [(False, "token"), (True, "avg")])
def test_matches_finite_differences(linearize_cls, pool):
    model = TangentViT.from_timm(tiny_vit(0.1, pool), num_classes=4, linearized_blocks=2,
                                 linearize_cls=linearize_cls, seed=0)
    delta = random_delta(model, scale=1.0)
    model.load_delta(delta)
    model.output_mode = "jvp"
    x, eps = images(), 1e-5
    plus = model.base_model_with_delta({k: eps * v for k, v in delta.items()})
    minus = model.base_model_with_delta({k: -eps * v for k, v in delta.items()})
    with torch.no_grad():
        fd = (plus(x) - minus(x)) / (2 * eps)
        assert rel_err(model(x), fd) <= 1e-7


@pytest.mark.parametrize("init_values,k,linearize_cls", [(1e-5, 1, False), (0.1, 1, True), (0.1, 2, False)])
def test_cls_only_path_equals_full_path(init_values, k, linearize_cls):
    vit = tiny_vit(init_values, "token")
    fast = TangentViT.from_timm(vit, 6, linearized_blocks=k, linearize_cls=linearize_cls)
    full = TangentViT.from_timm(vit, 6, linearized_blocks=k, linearize_cls=linearize_cls, cls_only=False)
    assert fast.linearized.blocks[-1].cls_only and not full.linearized.blocks[-1].cls_only
    assert fast.base_digest() == full.base_digest()
    delta = random_delta(fast)
    fast.load_delta(delta)
    full.load_delta(delta)
    x = images()
    with torch.no_grad():
        assert rel_err(fast(x), full(x)) <= 1e-12
    # Δ round-trips through the rewritten (transposed / split) parameters
    for key, value in fast.delta_state_dict().items():
        assert torch.equal(value, delta[key]), key


def test_contract_trunk_linearized_and_delta_names():
    vit = tiny_vit(1e-5, "token")
    model = TangentViT.from_timm(vit, num_classes=7, linearized_blocks=1, linearize_cls=True)
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x), model.linearized(model.trunk(x)))
        # Δ = 0: the tangent model is the base model
        assert rel_err(model(x), model.base_model()(x)) <= 1e-12
        tokens = model.trunk(x)
    assert tokens.shape == (3, 17, 32)
    assert not any(p.requires_grad for p in model.trunk.parameters())
    delta = model.delta_state_dict()
    assert set(delta) == {"blocks.2.norm1.weight", "blocks.2.norm1.bias", "blocks.2.attn.qkv.weight",
                          "blocks.2.attn.qkv.bias", "blocks.2.attn.proj.weight", "blocks.2.attn.proj.bias",
                          "blocks.2.norm2.weight", "blocks.2.norm2.bias", "blocks.2.mlp.fc1.weight",
                          "blocks.2.mlp.fc1.bias", "blocks.2.mlp.fc2.weight", "blocks.2.mlp.fc2.bias",
                          "norm.weight", "norm.bias", "head.weight", "head.bias", CLS_DELTA_KEY}
    base = dict(model.base_model().named_parameters())
    for k, v in delta.items():
        assert v.shape == (base[k].shape if k != CLS_DELTA_KEY else (1, 1, 32))
        assert not v.any()
    trainable = sum(p.numel() for p in model.linearized.parameters() if p.requires_grad)
    # all Δ and nothing else (the inert key-bias Δ is a buffer: its gradient is identically 0)
    assert trainable == sum(v.numel() for v in delta.values()) - 32
    with pytest.raises(KeyError):
        model.load_delta({k: v for k, v in delta.items() if k != "head.bias"})


def test_w0_is_deterministic_and_reinit_is_seeded():
    vit = tiny_vit(0.1, "token")
    a = TangentViT.from_timm(vit, 5, seed=1)
    b = TangentViT.from_timm(tiny_vit(0.1, "token"), 5, seed=1)
    c = TangentViT.from_timm(vit, 5, seed=2)
    assert a.base_digest() == b.base_digest() != c.base_digest()
    assert a.base_digest() != TangentViT.from_timm(vit, 5, seed=1, linearize_cls=True).base_digest()
    assert a.base_digest() != TangentViT.from_timm(vit, 5, seed=1, linearized_blocks=2).base_digest()
    kept = TangentViT.from_timm(vit, 5, reinit=False, seed=1).base_model()
    reset = a.base_model()
    assert torch.equal(kept.blocks[2].attn.qkv.weight, vit.blocks[2].attn.qkv.weight)
    assert not torch.equal(reset.blocks[2].attn.qkv.weight, vit.blocks[2].attn.qkv.weight)
    assert torch.equal(reset.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    # a head is always drawn from the seed (DINOv2 has none): never zero, same on every client
    assert kept.head.weight.abs().min() > 0
    assert torch.equal(kept.head.weight, TangentViT.from_timm(vit, 5, reinit=False, seed=1).base_model().head.weight)


def test_composes_dtype_and_modes():
    model = TangentViT.from_timm(tiny_vit(0.1, "avg", dtype=torch.float32), 3)
    assert model.linearized.head.weight.dtype == torch.float32
    model.double()
    assert model.base_model().head.weight.dtype == D
    with pytest.raises(ValueError):
        model.output_mode = "nonlinear"


def test_trunk_shares_w0_tensors_without_changing_w0():
    vit = tiny_vit(0.1, "token")
    model = TangentViT.from_timm(vit, 5, linearized_blocks=1)
    base = model.base_model()  # a copy: compare against the model's own w0 below
    w0 = model._base
    assert model.trunk.vit.blocks[0].attn.qkv.weight.data_ptr() == w0.blocks[0].attn.qkv.weight.data_ptr()
    assert model.trunk.vit.pos_embed.data_ptr() == w0.pos_embed.data_ptr()
    # the trunk's truncation and identities did not touch w0
    assert len(w0.blocks) == 3 and len(model.trunk.vit.blocks) == 2
    assert isinstance(w0.norm, torch.nn.LayerNorm) and isinstance(w0.head, torch.nn.Linear)
    x = images()
    with torch.no_grad():
        assert torch.equal(w0(x), base(x))
        model.double()  # conversions reach the shared tensors once, consistently
        assert rel_err(model(x), base(x)) <= 1e-12


def test_per_head_fast_path_equals_the_opacus_layout():
    """The k/v Δ applied by einsum (no hooks) and through their nn.Linear (hooked, as Opacus does)."""
    model = TangentViT.from_timm(tiny_vit(0.1, "token"), 6, linearized_blocks=1)
    model.load_delta(random_delta(model))
    attn = model.linearized.blocks[-1].attn
    tokens = model.trunk(images())
    with torch.no_grad():
        fast = model.linearized(tokens)
        handles = [m.register_forward_hook(lambda *a: None) for m in (attn.k_delta_t, attn.v_delta)]
        hooked = model.linearized(tokens)
    for h in handles:
        h.remove()
    assert rel_err(fast, hooked) <= 1e-12


def test_drop_frozen_keeps_the_tail_and_refuses_w0():
    model = TangentViT.from_timm(tiny_vit(0.1, "token"), 6)
    model.load_delta(random_delta(model))
    tokens = model.trunk(images())
    with torch.no_grad():
        before = model.linearized(tokens)
        model.drop_frozen()
        assert torch.equal(model.linearized(tokens), before)
    assert not hasattr(model, "trunk")
    with pytest.raises(RuntimeError, match="drop_frozen"):
        model.base_digest()
