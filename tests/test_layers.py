"""Each complex layer is rotation-equivariant, and pooling/dropout behave as specified."""

import math

import pytest
import torch
from torch import nn

from cvconvert.complex import (CAdaptiveAvgPool2d, CAvgPool2d, CBatchNorm, CConv2d, CDelta, CDropout, CFlatten,
                               CLinear, CMaxModPool2d, rotate, unrotate_real)
from cvconvert.complex.functional import encode, modulus
from cvconvert.complex.layers import max_pool_gaps
from cvconvert.zoo.resnet_cifar import CShortcutA
from reference import brute_maxmod, brute_top_gap, tied


def rand_x(*shape):
    return torch.randn(*shape[:1], 2, *shape[1:])


def angles(n):
    return torch.rand(n) * 2 * math.pi


def assert_equivariant(layer, x, train=False, atol=1e-5, act=None):
    """layer(act(x)) == act(layer(x)); act: a random per-sample rotation unless given."""
    layer.train(train)
    if act is None:
        t = angles(x.shape[0])
        act = lambda v: rotate(v, t)  # noqa: E731
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)  # dropout: the same draw for both calls
    y_act = layer(act(x))
    scale = y.abs().max().clamp_min(1.0)
    assert (y_act - act(y)).abs().max() / scale < atol
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


@pytest.mark.parametrize("k,s,p,d,ceil", [(2, 2, 0, 1, False), (3, 2, 1, 1, False), (3, 2, 1, 1, True),
                                          (2, 2, 0, 2, False), (3, 1, 0, 1, False)])
def test_maxmod_pool_top_gap_matches_brute_force(k, s, p, d, ceil):
    x = rand_x(3, 4, 9, 11)
    pool = CMaxModPool2d(k, s, p, d, ceil)
    torch.testing.assert_close(pool.top_gap(x), brute_top_gap(x, k, s, p, d, ceil))


def test_max_pool_gaps_records_the_smallest_over_pools_and_then_unhooks():
    net = nn.Sequential(CMaxModPool2d(2), CMaxModPool2d(2))
    x = rand_x(4, 3, 8, 8)
    x[1, :, :, :2, :2] = tied(1, 1, 2, 2)[0, :, :, :2, :2]  # sample 1: an exact tie in its first pool
    with max_pool_gaps(net) as pools:
        net(x)
    want = torch.minimum(net[0].top_gap(x), net[1].top_gap(net[0](x)))
    torch.testing.assert_close(torch.from_numpy(pools.gaps), want)
    assert pools.gaps[1] == 0 and (pools.gaps[[0, 2, 3]] > 0).all()
    with max_pool_gaps(net) as again:
        pass
    assert again.gaps is None and not net[0]._forward_hooks  # nothing ran, and the hooks are gone


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


# --- P parts: equivariance under orthogonal keys Q [N, P, P] (rotations and reflections) -------------

from cvconvert.complex.functional import (encode_parts, rotation_key, transform,  # noqa: E402
                                          untransform_first)
from cvconvert.device.keys import haar_orthogonal  # noqa: E402


def keys(n, p, det):
    """n Haar orthogonal keys with the given determinant (+1 rotations, -1 reflections)."""
    q = torch.from_numpy(haar_orthogonal(n, p))
    flip = torch.linalg.det(q).sign() != det
    q[flip, :, 0] *= -1  # negating a column flips the determinant and keeps Q orthogonal
    assert (torch.linalg.det(q).sign() == det).all()
    return q


def assert_key_equivariant(layer, x, key, train=False, atol=1e-5):
    assert_equivariant(layer, x, train, atol, act=lambda v: transform(v, key))


@pytest.mark.parametrize("det", [1, -1], ids=["rotation", "reflection"])
@pytest.mark.parametrize("parts", [3, 4])
@pytest.mark.parametrize("name,make,shape,modes", LAYERS, ids=[entry[0] for entry in LAYERS])
def test_layer_is_equivariant_for_p_parts(name, make, shape, modes, parts, det):
    layer = make()
    for train in modes:
        x = torch.randn(shape[0], parts, *shape[1:])
        y = layer.train(train)(x)
        assert y.shape[:2] == (shape[0], parts)
        assert_key_equivariant(layer, x, keys(shape[0], parts, det), train=train)


def test_skip_connection_is_equivariant_for_p_parts():
    # A residual block: delta(bn(conv(x)) + shortcut(x)); the sum of equivariant maps is equivariant.
    conv, bn, delta, short = CConv2d(4, 8, 3, stride=2, padding=1), CBatchNorm(8), CDelta(), CShortcutA(2)
    x = torch.randn(3, 4, 4, 8, 8)
    q = keys(3, 4, -1)
    for train in (True, False):
        block = lambda v: delta(bn.train(train)(conv(v)) + short(v))  # noqa: E731
        torch.testing.assert_close(block(transform(x, q)), transform(block(x), q), atol=1e-5, rtol=1e-4)


def test_equivariance_check_catches_a_per_part_nonlinearity():
    # A ReLU on each part alone is not equivariant: the same check must fail on it.
    with pytest.raises(AssertionError):
        assert_key_equivariant(nn.ReLU(), torch.randn(3, 3, 4, 5, 5), keys(3, 3, 1))


def test_rotation_key_is_the_p2_rotation():
    x, t = rand_x(4, 3, 5, 5), angles(4)
    q = rotation_key(t)
    torch.testing.assert_close(transform(x, q), rotate(x, t))
    torch.testing.assert_close(untransform_first(x, q), unrotate_real(x, t))
    torch.testing.assert_close(q @ q.transpose(1, 2), torch.eye(2).expand(4, 2, 2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("parts", [3, 4])
def test_encode_decode_roundtrip_p_parts(parts):
    a, b = torch.randn(4, 3, 5, 5), torch.randn(4, parts - 1, 3, 5, 5)
    q = keys(4, parts, -1)
    x = encode_parts(a, b, q)
    assert x.shape == (4, parts, 3, 5, 5)
    torch.testing.assert_close(untransform_first(x, q), a, atol=1e-5, rtol=1e-5)
    # The transmitted parts are orthogonal mixtures: the Gram matrix over parts is Q's-invariant.
    g = torch.einsum("npm,nqm->npq", x.flatten(2), x.flatten(2))
    f = torch.cat((a.unsqueeze(1), b), 1).flatten(2)
    torch.testing.assert_close(g, q @ torch.einsum("npm,nqm->npq", f, f) @ q.transpose(1, 2), atol=1e-3, rtol=1e-4)
    # Another key reads a mixture of the fools, not the image.
    assert (untransform_first(x, keys(4, parts, 1)) - a).abs().max() > 0.1


def test_maxmod_pool_matches_brute_force_p_parts():
    x = torch.randn(2, 3, 2, 7, 6)
    torch.testing.assert_close(CMaxModPool2d(3, 2, 1)(x), brute_maxmod(x, 3, 2, 1))


def test_dropout_one_mask_for_all_parts():
    x = torch.rand(4, 4, 3, 8, 8) + 0.1
    zero = CDropout(0.5).train()(x) == 0
    assert zero.any() and (~zero).any()
    assert (zero == zero[:, :1]).all()
