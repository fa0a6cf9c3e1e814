"""NLFT baseline: same w0 and surface as TAFT; Δ = w − w0; agrees with TAFT to first order."""

import torch

from tangent.model.vit import TangentViT
from tangent.model.nlft import NLFTViT
from tests.helpers import images, random_delta, rel_err, tiny_vit


def test_same_w0_and_delta_is_w_minus_w0():
    vit = tiny_vit(0.1, "token")
    nlft = NLFTViT.from_timm(vit, 5, linearized_blocks=2, linearize_cls=True, seed=7)
    taft = TangentViT.from_timm(vit, 5, linearized_blocks=2, linearize_cls=True, seed=7)
    base_n, base_t = nlft.base_model().state_dict(), taft.base_model().state_dict()
    assert all(torch.equal(base_n[k], base_t[k]) for k in base_t)
    assert set(nlft.delta_state_dict()) == set(taft.delta_state_dict())
    assert not any(p.requires_grad for p in nlft.trunk.parameters())
    x = images()
    with torch.no_grad():
        assert rel_err(nlft(x), nlft.base_model()(x)) <= 1e-12
    # one SGD step moves w; delta_state_dict reports w − w0
    opt = torch.optim.SGD([p for p in nlft.linearized.parameters() if p.requires_grad], lr=0.1)
    nlft.linearized(nlft.trunk(x)).pow(2).sum().backward()
    opt.step()
    delta = nlft.delta_state_dict()
    assert delta["blocks.2.attn.qkv.weight"].abs().max() > 0 and delta["cls_token.delta"].abs().max() > 0
    assert torch.allclose(nlft.linearized.blocks[-1].attn.qkv.weight,
                          nlft.base_model().blocks[2].attn.qkv.weight + delta["blocks.2.attn.qkv.weight"],
                          rtol=0, atol=1e-15)
    with torch.no_grad():
        assert rel_err(nlft(x), nlft.base_model_with_delta(delta)(x)) <= 1e-12
        fresh = NLFTViT.from_timm(vit, 5, linearized_blocks=2, linearize_cls=True, seed=7)
        fresh.load_delta(delta)
        assert rel_err(fresh(x), nlft(x)) <= 1e-12


def test_taft_is_first_order_nlft():
    vit = tiny_vit(0.1, "avg")
    nlft = NLFTViT.from_timm(vit, 4, seed=1)
    taft = TangentViT.from_timm(vit, 4, seed=1)
    delta = random_delta(taft)
    x = images()
    errs = []
    with torch.no_grad():
        for eps in (1e-2, 1e-3):
            small = {k: eps * v for k, v in delta.items()}
            nlft.load_delta(small)
            taft.load_delta(small)
            errs.append((nlft(x) - taft(x)).norm().item())
    assert errs[1] < errs[0] / 50  # second-order remainder
