"""The phase-hiding defenses (cvconvert/defense.py) and the exchange key law they train for (keylaws.py)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cvconvert.complex.functional import encode, rotation_key
from cvconvert.defense import DefenseConfig, PaperDefense, SignCritic, make_defense, negatives, odd_moments
from cvconvert.device.keylaws import KEY_LAWS, quadrant_sign
from cvconvert.errors import CvError
from cvconvert.model import ModelSpec, build_model


def tiny(key_law=None, variant="complex"):
    torch.manual_seed(0)
    spec = ModelSpec("lenet", "conv1", None, variant, 10, (1, 16, 16), [0.5], [0.5], key_law=key_law)
    return build_model(spec).eval()  # eval: batch-norm must not mix the image and fool batches


def _keys(law: str, theta: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(KEY_LAWS[law].of_angle(theta.numpy()))


def test_quadrant_sign_follows_theta_quarter():
    q = math.pi / 2
    theta = np.array([0.1, q + 0.1, 2 * q + 0.1, 3 * q + 0.1, -0.1, 4 * q + 0.1], np.float32)
    assert quadrant_sign(theta).tolist() == [1.0, -1.0, 1.0, -1.0, -1.0, 1.0]


def test_exchange_law_puts_the_fool_in_the_natural_reading_for_half_the_keys():
    # x = e^{it}(a + i s b); for s = -1 it equals e^{i(t - pi/2)}(b + i a): the fool becomes the real part
    m = tiny("exchange")
    img, fool = torch.rand(4, 1, 16, 16), torch.rand(4, 1, 1, 16, 16)
    theta = torch.tensor([0.3, 1.9, 3.5, 5.0])  # quarters 0, 1, 2, 3
    key = _keys("exchange", theta)
    with torch.no_grad():
        x = m.encoder(img, fool, key)
        a, b = m.encoder.features(img), m.encoder.features(fool[:, 0])
    s = torch.tensor([1.0, -1.0, 1.0, -1.0]).reshape(-1, 1, 1, 1)
    assert torch.allclose(x, encode(a, s * b, theta), atol=1e-5)
    swapped = encode(b, a, theta - math.pi / 2)
    assert torch.allclose(x[[1, 3]], swapped[[1, 3]], atol=1e-5)
    assert not torch.allclose(x[[0, 2]], swapped[[0, 2]], atol=1e-3)
    # the sign is the key's second column: the decoder reads the first, so the rotation key decodes too
    with torch.no_grad():
        logits = m(img, fool, key)
        again = m.decoder(m.processing(x), rotation_key(theta))
    assert torch.allclose(logits, again, atol=1e-5)


def test_rotation_law_gives_the_papers_x():
    """The P = 2 key law `rotation` at angle t gives exactly the paper's x = e^{it}(a + ib)."""
    m = tiny()
    assert m.spec.law.name == "rotation"
    img, fool, theta = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 1, 16, 16), torch.tensor([2.0, 4.5])
    with torch.no_grad():
        a, b = m.encoder.features(img), m.encoder.features(fool[:, 0])
        assert torch.allclose(m.encoder(img, fool, _keys("rotation", theta)), encode(a, b, theta), atol=1e-6)


def test_model_dir_round_trip(tmp_path):
    from cvconvert.build import convert_to_dir
    from cvconvert.modeldir import load_model, read_manifest

    convert_to_dir("lenet", tmp_path / "q", input_shape=(1, 16, 16), num_classes=10, key_law="exchange")
    m, man = load_model(tmp_path / "q")
    assert man["key_law"] == "exchange" and m.spec.law.name == "exchange" and man["format_version"] == 2
    convert_to_dir("lenet", tmp_path / "p", input_shape=(1, 16, 16), num_classes=10)
    assert read_manifest(tmp_path / "p")["key_law"] == "rotation"
    assert load_model(tmp_path / "p")[0].spec.law.name == "rotation"
    with pytest.raises(CvError, match="unknown key law 'sideways'"):
        tiny("sideways")


def test_make_defense_errors():
    m = tiny()
    with pytest.raises(CvError, match="unknown defense"):
        make_defense("magic", m)
    with pytest.raises(CvError, match="unknown defense option"):
        make_defense("symmetric", m, {"wieght": 1})
    with pytest.raises(CvError, match="complex model"):
        make_defense("exchange", tiny(variant="original"))
    with pytest.raises(CvError, match="weight"):
        make_defense("symmetric", tiny(), {"weight": -1})
    d = make_defense("exchange", m)
    assert m.spec.law.name == "exchange" and d.manifest_updates()["key_law"] == "exchange"
    paper = make_defense("paper", tiny())
    assert isinstance(paper, PaperDefense) and paper.history()["k"] == 8 and d.history() is None
    with pytest.raises(CvError, match="complex model"):
        make_defense("paper", tiny(variant="original"))
    with pytest.raises(CvError, match="unknown defense option"):
        make_defense("paper", tiny(), {"moment_weight": 1.0})  # each defense takes its own options


def test_odd_moments_vanish_for_symmetric_data():
    z = torch.randn(64, 3, 8, 8)
    sym = torch.cat((z, -z))
    assert float(odd_moments(sym)) < 1e-6
    assert float(odd_moments(sym.abs())) > 0.5  # non-negative features: large mean and skew


def _step(m, d, opt, img, y, step):
    a = m.encoder.features(img)
    b = a.roll(1, 0)
    key = m.random_key(len(a))
    x = m.encoder.combine(a, b[:, None], key)
    cstats = d.update(a, b, x)
    extra, estats = d.extra_loss(a, b, x, step)
    loss = F.cross_entropy(m.decoder(m.processing(x), key), y) + extra
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach()), cstats, estats


def test_symmetric_defense_trains_and_its_critic_uses_the_features():
    torch.manual_seed(0)
    m = tiny().train()
    d = make_defense("symmetric", m, DefenseConfig(weight=1.0, critic_lr=3e-3))
    critic_ids = {id(p) for p in d.parameters()}
    assert not critic_ids & {id(p) for p in m.parameters()}  # the critic is not part of the model
    params = [p for n, p in m.named_parameters() if not n.startswith("discriminator")]
    opt = torch.optim.Adam(params, lr=1e-3)
    img, y = torch.rand(16, 1, 16, 16), torch.randint(0, 10, (16,))
    before = [p.detach().clone() for p in d.parameters()]
    enc_before = [p.detach().clone() for p in m.encoder.parameters()]
    hist = [_step(m, d, opt, img, y, i) for i in range(6)]
    # the critic's parameters moved, its loss and the encoder's terms changed over the steps
    assert any(not torch.equal(b, p) for b, p in zip(before, d.parameters()))
    assert any(not torch.equal(b, p) for b, p in zip(enc_before, m.encoder.parameters()))
    closs = [h[1]["sign_critic_loss"] for h in hist]
    conf = [h[2]["sign_confusion"] for h in hist]
    assert max(closs) - min(closs) > 1e-3 and max(conf) - min(conf) > 1e-4
    assert all(math.isfinite(h[0]) for h in hist)
    # the critic really reads its input: different features give a different loss
    with torch.no_grad():
        a = m.encoder.features(img)
    l1 = float(d.extra_loss(a, a, None, 0)[0])
    l2 = float(d.extra_loss(torch.randn_like(a), a, None, 0)[0])
    assert abs(l1 - l2) > 1e-4
    # extra_loss sends gradient to the encoder only, never to the critic
    for p in d.parameters():
        p.grad = None
    loss, _ = d.extra_loss(m.encoder.features(img), None, None, 0)
    loss.backward()
    assert all(p.grad is None for p in d.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.encoder.features.generator.parameters())


def test_sign_critic_learns_to_tell_a_from_minus_a():
    # a non-negative feature gives its sign away: the critic must find that within a few dozen steps
    torch.manual_seed(0)
    m = tiny()
    d = make_defense("symmetric", m, DefenseConfig(weight=0.0, critic_lr=3e-3))
    a = torch.rand(32, 6, 12, 12) + 0.1
    for _ in range(40):
        stats = d.update(a, a, None)
    assert stats["sign_critic_acc"] > 0.95
    assert make_defense("symmetric", tiny(), {"weight": 0.0}).extra_loss(a, a, None, 0)[0].item() == 0.0


def test_state_dict_round_trip():
    m = tiny()
    d = make_defense("symmetric", m)
    a = torch.randn(8, 6, 12, 12)
    d.update(a, a, None)
    d2 = make_defense("symmetric", tiny())
    d2.load_state_dict(d.state_dict())
    with torch.no_grad():
        assert torch.equal(d.critic(a), d2.critic(a))
    with pytest.raises(CvError, match="does not match"):
        d2.load_state_dict({"critic": {}})
    assert isinstance(SignCritic(3, 8, 2)(torch.randn(2, 3)), torch.Tensor)  # flat features work too


def test_negatives_are_rotations_decoded_with_wrong_angles():
    a, b = torch.randn(14, 3, 4, 4), torch.randn(14, 3, 4, 4)
    neg = negatives(a, b, k=8, offset=0)
    # a' = Re[(a + ib) e^{i dtheta}], dtheta = j pi / 8 with j cycling over 1..7
    for i in range(14):
        t = torch.tensor((i % 7 + 1) * torch.pi / 8)
        want = torch.real(torch.complex(a[i], b[i]) * torch.exp(1j * t))
        assert torch.allclose(neg[i], want, atol=1e-5)


def test_paper_defense_critic_learns_and_plays_only_on_its_steps():
    """The WGAN-GP critic scores a above its rotated negatives after training; with every=2 the odd steps
    leave critic and loss alone; the encoder's term reaches the generator, never the critic."""
    torch.manual_seed(0)
    m = tiny().train()
    d = make_defense("paper", m, {"weight": 1.0, "k": 4, "every": 2, "critic_lr": 3e-3})
    with torch.no_grad():
        a = m.encoder.features(torch.rand(16, 1, 16, 16))
    b = a.roll(1, 0)
    before = [p.detach().clone() for p in m.discriminator.parameters()]
    assert d.update(a, b, None, step=1) == {} and float(d.extra_loss(a, b, None, 1)[0]) == 0.0
    assert all(torch.equal(x, y) for x, y in zip(before, m.discriminator.parameters()))
    hist = [d.update(a, b, None, step=2 * i) for i in range(30)]
    assert hist[-1]["wdist"] > hist[0]["wdist"] and hist[-1]["wdist"] > 0  # it tells a from a' better
    for p in m.parameters():
        p.grad = None
    loss, stats = d.extra_loss(m.encoder.features(torch.rand(16, 1, 16, 16)), b, None, 0)
    loss.backward()
    assert stats["gan_loss"] != 0 and all(p.grad is None for p in m.discriminator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.encoder.features.generator.parameters())
    d2 = make_defense("paper", tiny(), {"k": 4})
    d2.load_state_dict(d.state_dict())
    assert d2.opt.state_dict()["state"].keys() == d.opt.state_dict()["state"].keys()
