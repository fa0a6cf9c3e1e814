"""Each closed-form JVP rule against torch.func.jvp, in float64, on its own."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp

from tangent.model import layers

D = torch.float64
TOL = 1e-12


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=D)


@pytest.mark.parametrize("with_dx", [True, False])
def test_linear(gen, with_dx):
    x, dx = randn(gen, 4, 5, 6), randn(gen, 4, 5, 6)
    w, dw, b, db = randn(gen, 3, 6), randn(gen, 3, 6), randn(gen, 3), randn(gen, 3)
    if not with_dx:
        dx = torch.zeros_like(x)
    want_y, want_dy = jvp(F.linear, (x, w, b), (dx, dw, db))
    y, dy = layers.linear_jvp(x, dx if with_dx else None, w, b, partial(F.linear, weight=dw, bias=db))
    assert rel_err(y, want_y) < TOL and rel_err(dy, want_dy) < TOL


def test_linear_delta_as_nn_linear(gen):
    """The Δ term of a Linear is exactly a standard nn.Linear on the primal input."""
    x, w = randn(gen, 7, 6), randn(gen, 3, 6)
    delta = torch.nn.Linear(6, 3, dtype=D)
    _, want_dy = jvp(lambda w_, b_: F.linear(x, w_, b_), (w, torch.zeros(3, dtype=D)),
                     (delta.weight.detach(), delta.bias.detach()))
    _, dy = layers.linear_jvp(x, None, w, torch.zeros(3, dtype=D), delta)
    assert rel_err(dy.detach(), want_dy) < TOL


@pytest.mark.parametrize("with_dx", [True, False])
def test_layer_norm(gen, with_dx):
    x, dx = randn(gen, 4, 5, 8) * 3 + 1, randn(gen, 4, 5, 8)
    g, dg, b, db = randn(gen, 8), randn(gen, 8), randn(gen, 8), randn(gen, 8)
    dx_in = dx if with_dx else torch.zeros_like(x)
    want_y, want_dy = jvp(lambda x_, g_, b_: F.layer_norm(x_, (8,), g_, b_, 1e-6),
                          (x, g, b), (dx_in, dg, db))
    delta = torch.nn.LayerNorm(8, eps=1e-6, dtype=D)
    with torch.no_grad():
        delta.weight.copy_(dg)
        delta.bias.copy_(db)
    y, dy = layers.layer_norm_jvp(x, dx if with_dx else None, g, b, 1e-6, delta)
    assert rel_err(y, want_y) < TOL and rel_err(dy.detach(), want_dy) < TOL


def test_gelu(gen):
    x, dx = randn(gen, 50) * 4, randn(gen, 50)
    want_y, want_dy = jvp(F.gelu, (x,), (dx,))
    y, dy = layers.gelu_jvp(x, dx)
    assert rel_err(y, want_y) < TOL and rel_err(dy, want_dy) < TOL
    # x = 0 is where gelu(x)/x tricks break down
    _, dy0 = layers.gelu_jvp(torch.zeros(3, dtype=D), torch.ones(3, dtype=D))
    assert torch.allclose(dy0, torch.full((3,), 0.5, dtype=D))


def test_softmax(gen):
    s, ds = randn(gen, 2, 3, 7, 7), randn(gen, 2, 3, 7, 7)
    want_a, want_da = jvp(lambda s_: s_.softmax(-1), (s,), (ds,))
    a, da = layers.softmax_jvp(s, ds)
    assert rel_err(a, want_a) < TOL and rel_err(da, want_da) < TOL


@pytest.mark.parametrize("zero", [None, "dq", "dk", "dv"])
def test_attention(gen, zero):
    shape = (2, 3, 7, 4)
    q, k, v = randn(gen, *shape), randn(gen, *shape), randn(gen, *shape)
    dq, dk, dv = randn(gen, *shape), randn(gen, *shape), randn(gen, *shape)
    tangents = {"dq": dq, "dk": dk, "dv": dv}
    if zero:
        tangents[zero] = None
    want = jvp(lambda q_, k_, v_: (q_ @ k_.transpose(-2, -1) * 4 ** -0.5).softmax(-1) @ v_, (q, k, v),
               tuple(torch.zeros(shape, dtype=D) if t is None else t for t in tangents.values()))
    o, do = layers.attention_jvp(q, k, v, *tangents.values(), scale=4 ** -0.5)
    assert rel_err(o, want[0]) < TOL and rel_err(do, want[1]) < TOL


def test_layer_scale_and_residual(gen):
    x, dx, y, dy, gamma = (randn(gen, 3, 5) for _ in range(5))
    want = jvp(lambda x_, y_: x_ + y_ * gamma, (x, y), (dx, dy))
    ys, dys = layers.layer_scale_jvp(y, dy, gamma)
    out, dout = layers.residual_jvp(x, dx, ys, dys)
    assert rel_err(out, want[0]) < TOL and rel_err(dout, want[1]) < TOL
    assert layers.layer_scale_jvp(x, None, gamma)[1] is None
    assert layers.add_tangents(None, None) is None
