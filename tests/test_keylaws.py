"""Key laws (cvconvert/device/keylaws.py): one key [N, P, P] for every P, the paper's angle and the exchange
defense's sign as ways of drawing it, the registry, and what the device draws through it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cvconvert.device import keylaws
from cvconvert.device.contracts import combine_np
from cvconvert.device.keylaws import (KEY_LAWS, KeyLaw, default_law, draw_keys, get_law, key_angle, law_of,
                                      quadrant_sign, register, rotation_key_np)
from cvconvert.errors import CvError


def _paper_x(a: np.ndarray, b: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """The paper's x = e^{i theta}(a + i b), in numpy complex arithmetic (independent of the code under test)."""
    z = (a + 1j * b) * np.exp(1j * theta.astype(np.float64)).reshape((-1,) + (1,) * (a.ndim - 1))
    return np.stack((z.real, z.imag), 1).astype(np.float32)


@pytest.mark.parametrize("name,parts", [("haar", 2), ("haar", 3), ("haar", 4), ("rotation", 2), ("exchange", 2)])
def test_every_law_draws_orthogonal_float32_keys(name, parts):
    key = draw_keys(KEY_LAWS[name], 64, parts)
    assert key.shape == (64, parts, parts) and key.dtype == np.float32 and key.flags.c_contiguous
    eye = np.broadcast_to(np.eye(parts), key.shape)
    np.testing.assert_allclose(key @ key.transpose(0, 2, 1), eye, atol=1e-5)
    assert len(np.unique(key, axis=0)) == 64  # fresh per image


def test_rotation_law_gives_the_papers_x_for_the_same_angle():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 6, 3, 4, 4)).astype(np.float32)
    theta = (rng.random(6) * 2 * math.pi).astype(np.float32)
    key = KEY_LAWS["rotation"].of_angle(theta)
    np.testing.assert_allclose(key, [[[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]] for t in theta],
                               atol=1e-6)
    np.testing.assert_allclose(combine_np(a, b[:, None], key), _paper_x(a, b, theta), atol=1e-5)
    # the torch encoder of every model forms the same x from the same key
    from cvconvert.model import ModelSpec, build_model

    model = build_model(ModelSpec("lenet", "conv1", None, input_shape=(1, 16, 16))).eval()
    assert model.spec.law.name == "rotation"
    fa, fb = (torch.randn(6, *model.feature_shape) for _ in range(2))
    with torch.no_grad():
        got = model.encoder.combine(fa, fb[:, None], torch.from_numpy(key)).numpy()
    np.testing.assert_allclose(got, _paper_x(fa.numpy(), fb.numpy(), theta), atol=1e-5)


def test_exchange_law_is_the_rotation_times_the_fools_sign():
    q = math.pi / 2
    theta = np.array([0.3, q + 0.3, 2 * q + 0.3, 3 * q + 0.3], np.float32)
    key = KEY_LAWS["exchange"].of_angle(theta)
    s = quadrant_sign(theta)
    assert s.tolist() == [1, -1, 1, -1]
    np.testing.assert_array_equal(key, rotation_key_np(theta) @ np.stack([np.diag([1, v]) for v in s]).astype(np.float32))
    a, b = np.random.default_rng(1).standard_normal((2, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(combine_np(a, b[:, None], key), _paper_x(a, s[:, None] * b, theta), atol=1e-5)
    # its draws show both signs, and the angle read back from a key is the one it was drawn at
    drawn = draw_keys(KEY_LAWS["exchange"], 400, 2)
    dets = np.linalg.det(drawn)
    assert (dets > 0).any() and (dets < 0).any()
    np.testing.assert_allclose(KEY_LAWS["exchange"].of_angle(key_angle(drawn)), drawn, atol=1e-5)
    np.testing.assert_allclose(key_angle(key), theta, atol=1e-5)


def test_draws_come_from_os_urandom(monkeypatch):
    calls = []
    real = keylaws.secure_angles.__globals__["os"].urandom

    def recording(n):
        calls.append(n)
        return real(n)

    monkeypatch.setattr(keylaws.secure_angles.__globals__["os"], "urandom", recording)
    for name, parts in (("rotation", 2), ("exchange", 2), ("haar", 3)):
        calls.clear()
        draw_keys(KEY_LAWS[name], 5, parts)
        assert calls, name


def test_registry_refuses_duplicates_and_laws_for_another_p(monkeypatch):
    with pytest.raises(ValueError, match="registered twice"):
        register(KeyLaw("haar", None, lambda n, p: np.zeros((n, p, p))))
    with pytest.raises(CvError, match="key law 'rotation' is for 2 parts; this model has 3"):
        get_law("rotation", 3)
    with pytest.raises(CvError, match="unknown key law 'nope'"):
        law_of({"parts": 2, "key_law": "nope"})
    with pytest.raises(CvError, match="not orthogonal"):
        draw_keys(KeyLaw("bad", None, lambda n, p: np.ones((n, p, p))), 3, 2)
    with pytest.raises(CvError, match="expected \\[3, 2, 2\\]"):
        draw_keys(KeyLaw("bad", None, lambda n, p: np.ones((n, p))), 3, 2)


def test_a_new_law_is_one_function_and_one_registry_line(monkeypatch):
    """What docs/keys.md says: register a law, name it in the manifest, and the device draws with it."""
    monkeypatch.setattr(keylaws, "KEY_LAWS", dict(KEY_LAWS))  # keep the global registry clean

    def signed_permutation(n, p):  # a toy law: a random signed permutation per image
        perm = np.stack([np.eye(p)[np.random.permutation(p)] for _ in range(n)])
        return (perm * np.where(np.random.random((n, 1, p)) < 0.5, -1, 1)).astype(np.float32)

    keylaws.register(KeyLaw("signed-permutation", None, signed_permutation, doc="a test law"))
    law = keylaws.law_of({"parts": 3, "key_law": "signed-permutation"})
    key = draw_keys(law, 4, 3)
    assert law.name == "signed-permutation" and key.shape == (4, 3, 3) and set(np.abs(key).ravel()) == {0, 1}
    # a law in its own module: named "module:function", imported on first use
    keylaws.register(KeyLaw("haar-by-name", None, "cvconvert.device.keys:haar_orthogonal"))
    np.testing.assert_allclose((lambda q: q @ q.transpose(0, 2, 1))(draw_keys(keylaws.get_law("haar-by-name", 4), 3, 4)),
                               np.broadcast_to(np.eye(4), (3, 4, 4)), atol=1e-5)


def test_format1_manifests_imply_their_law():
    assert default_law(2) == "rotation" and default_law(3) == "haar" and default_law(2, "quadrant") == "exchange"
    assert law_of({"format_version": 1, "fool_sign": "quadrant"}).name == "exchange"
    assert law_of({"format_version": 1, "parts": 4}).name == "haar"
    assert law_of({"format_version": 2, "parts": 2, "key_law": "haar"}).name == "haar"  # P = 2 with Haar keys


def test_pipeline_draws_keys_through_the_manifests_law():
    from cvconvert.device.pipeline import Pipeline

    class Stub(Pipeline):  # the key drawing only: no graphs needed
        def __init__(self, manifest):
            self.law, self.parts = law_of(manifest), int(manifest.get("parts", 2))

    key = Stub({"parts": 2, "key_law": "exchange"}).new_keys(200)
    np.testing.assert_allclose(KEY_LAWS["exchange"].of_angle(key_angle(key)), key, atol=1e-5)
    assert Stub({"parts": 3}).new_keys(2).shape == (2, 3, 3)
