"""Each complex layer is rotation-equivariant, and pooling/dropout behave as specified."""

import math

import pytest
import torch
from torch import nn

from cvconvert.complex import (CAdaptiveAvgPool2d, CAvgPool2d, CBatchNorm, CConv2d, CDelta, CDropout, CFlatten,
                               CLinear, CMaxModPool2d, CShortcutA, rotate, unrotate_real)
from cvconvert.complex.functional import encode, modulus
from reference import brute_maxmod, tied


def rand_x(*shape):
    return torch.randn(*shape[:1], 2, *shape[1:])


def angles(n):
    return torch.rand(n) * 2 * math.pi


def assert_equivariant(layer, x, train=False, atol=1e-5):
    layer.train(train)
    t = angles(x.shape[0])
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)  # dropout: the same draw for both calls
    y_rot = layer(rotate(x, t))
    scale = y.abs().max().clamp_min(1.0)
    assert (y_rot - rotate(y, t)).abs().max() / scale < atol
    return y


LAYERS = [
    ("conv", lambda: CConv2d.from_real(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True)), (3, 3, 8, 8), (False,)),
    ("conv-groups", lambda: CConv2d.from_real(nn.Conv2d(4, 4, 3, padding=1, groups=2)), (2, 4, 6, 6), (False,)),
    ("linear", lambda: CLinear.from_real(nn.Linear(6, 5)), (3, 6), (False,)),
    ("delta-fixed", lambda: CDelta(c=1.0), (3, 4, 5, 5), (False,)),
    ("delta-channel", lambda: CDelta(mode="channel"), (3, 4, 5, 5), (False,)),
    ("delta-channel-1d", lambda: CDelta(mode="channel"), (3, 7), (False,)),
    ("bn2d", lambda: CBatchNorm.from_real(nn.BatchNorm2d(4)), (4, 4, 5, 5), (False, True)),
    ("bn1d", lambda: CBatchNorm.from_real(nn.BatchNorm1d(6)), (4, 6), (False, True)),
    ("maxmod", lambda: CMaxModPool2d(2), (3, 4, 8, 8), (False,)),
    ("maxmod-overlap", lambda: CMaxModPool2d(3, 2, 1), (2, 3, 9, 7), (False,)),
    ("avgpool", lambda: CAvgPool2d.from_real(nn.AvgPool2d(2)), (3, 4, 8, 8), (False,)),
    ("adaptive", lambda: CAdaptiveAvgPool2d.from_real(nn.AdaptiveAvgPool2d((2, 3))), (3, 4, 8, 9), (False,)),
    ("dropout", lambda: CDropout(0.5), (3, 4, 6, 6), (False, True)),
    ("flatten", lambda: CFlatten.from_real(nn.Flatten()), (3, 4, 2, 2), (False,)),
    ("shortcutA", lambda: CShortcutA(2), (3, 4, 8, 8), (False,)),
]


@pytest.mark.parametrize("name,make,shape,modes", LAYERS, ids=[entry[0] for entry in LAYERS])
def test_layer_is_rotation_equivariant(name, make, shape, modes):
    layer = make()
    for train in modes:
        assert_equivariant(layer, rand_x(*shape), train=train)


def test_encode_decode_roundtrip():
    a, b, t = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5), angles(4)
    x = encode(a, b, t)
    torch.testing.assert_close(unrotate_real(x, t), a, atol=1e-5, rtol=1e-5)
    # A wrong key mixes in the fooling feature.
    assert (unrotate_real(x, t + 1.0) - a).abs().max() > 0.1


def test_conv_carries_weights_and_drops_bias():
    real = nn.Conv2d(3, 4, 3, bias=True)
    c = CConv2d.from_real(real)
    assert torch.equal(c.weight, real.weight)
    x = rand_x(2, 3, 6, 6)
    # On the real part alone (imag = 0), the complex conv is the real conv without its bias.
    x[:, 1] = 0
    y = c(x)
    torch.testing.assert_close(y[:, 0], real(x[:, 0]) - real.bias.view(1, -1, 1, 1))
    assert y[:, 1].abs().max() == 0


def test_delta_formula():
    x = rand_x(2, 3, 4, 4)
    y = CDelta(c=0.7)(x)
    m = modulus(x)
    expected = x * (m / torch.clamp(m, min=0.7)).unsqueeze(1)
    torch.testing.assert_close(y, expected)
    # Large moduli pass unchanged, small ones are scaled by |f|/c: the phase never changes.
    assert torch.allclose(torch.atan2(y[:, 1], y[:, 0]), torch.atan2(x[:, 1], x[:, 0]), atol=1e-5)


def test_batchnorm_running_stats_and_scale():
    bn = CBatchNorm(3)
    x = rand_x(8, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3, 1, 1)
    bn.train()
    for _ in range(200):
        bn(x)
    ms = (x[:, 0] ** 2 + x[:, 1] ** 2).mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_ms, ms, rtol=1e-3, atol=1e-3)
    bn.eval()
    y = bn(x)
    torch.testing.assert_close((y[:, 0] ** 2 + y[:, 1] ** 2).mean(dim=(0, 2, 3)), torch.ones(3), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 1, 0)])
def test_maxmod_pool_matches_brute_force(k, s, p):
    x = rand_x(3, 2, 7, 6)
    torch.testing.assert_close(CMaxModPool2d(k, s, p)(x), brute_maxmod(x, k, s, p))


def test_maxmod_pool_ties_pick_first_in_window():
    # Same modulus, different phase in every window: the first element (row-major) must win.
    x = tied(2, 3, 4, 4)
    torch.testing.assert_close(CMaxModPool2d(2)(x), brute_maxmod(x, 2, 2, 0))
    torch.testing.assert_close(CMaxModPool2d(2)(x), x[..., ::2, ::2])


def test_dropout_one_mask_for_both_parts():
    d = CDropout(0.5).train()
    x = torch.rand(4, 2, 3, 8, 8) + 0.1  # no zeros before dropout
    y = d(x)
    zero_re, zero_im = y[:, 0] == 0, y[:, 1] == 0
    assert zero_re.any() and (~zero_re).any()
    assert torch.equal(zero_re, zero_im)
    kept = ~zero_re
    torch.testing.assert_close(y[:, 0][kept], (x[:, 0] * 2)[kept])
    assert torch.equal(CDropout(0.5).eval()(x), x)
