"""Key laws: how a device draws the secret key of a keyed model, for every number of parts P.

A key is an orthogonal matrix Q [N, P, P]; the encoder sends x = Q [a; b_1; ...; b_{P-1}] and the decoder
reads (Q^T h)[0]. Which Q is drawn is the model's *key law* (manifest "key_law"), and it is the only thing
that tells the paper's angle, the exchange defense and a Haar key apart: the graphs are the same.

    haar       any P: uniform on O(P), reflections included (Mezzadri 2007)
    rotation   P = 2: the paper's angle, Q = R(theta) with theta uniform in [0, 2 pi)
    exchange   P = 2: Q = R(theta) diag(1, s), s = +1 where theta lies in the 1st or 3rd quarter-circle,
               -1 in the 2nd or 4th (cvconvert/defense.py, ExchangeDefense): the fool's sign follows theta

Every draw comes from os.urandom (keys.py). Adding a law is one module with its draw function and one
`register` line below (the draw named "module:function"); see docs/keys.md. Torch-free: the device imports it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import CvError
from .keys import haar_orthogonal, secure_angles


def rotation_key_np(theta: np.ndarray) -> np.ndarray:
    """[N, 2, 2] float32 R(theta) = [[cos, -sin], [sin, cos]]: x = R [a; b] is e^{i theta}(a + i b)."""
    t = np.asarray(theta, dtype=np.float32).reshape(-1)
    c, s = np.cos(t), np.sin(t)
    return np.stack((np.stack((c, -s), -1), np.stack((s, c), -1)), 1)


def quadrant_sign(theta: np.ndarray) -> np.ndarray:
    """+1 where theta lies in the 1st or 3rd quarter-circle, -1 in the 2nd or 4th (float32)."""
    t = np.asarray(theta, dtype=np.float32)
    return np.where(np.sin(2 * t) >= 0, np.float32(1), np.float32(-1))


def signed_rotation_key(theta: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """R(theta) @ diag(1, sign): the second column (the fool's) times the sign; still orthogonal."""
    key = rotation_key_np(theta)
    key[:, :, 1] *= np.asarray(sign, dtype=np.float32).reshape(-1, 1)
    return key


def key_angle(key: np.ndarray) -> np.ndarray:
    """theta in [0, 2 pi) of P = 2 keys R(theta) diag(1, s) (the first column is (cos, sin) for every s)."""
    key = np.asarray(key)
    return np.mod(np.arctan2(key[:, 1, 0], key[:, 0, 0]), 2 * np.pi).astype(np.float32)


@dataclass(frozen=True)
class KeyLaw:
    """name; parts: the one P it is for (None: any P >= 2); draw(n, P) -> [n, P, P] float32 from os.urandom,
    a callable or "module:function" (imported on first use, so a law in its own module needs no import here);
    of_angle: for angle laws, theta [n] -> the key the law draws at that angle (attacks simulate with it);
    private_fools: a noise fool would show which reading is the image, so the device needs a fool pool."""

    name: str
    parts: int | None
    draw: Callable[[int, int], np.ndarray] | str
    of_angle: Callable[[np.ndarray], np.ndarray] | None = None
    private_fools: bool = True
    doc: str = ""

    def sample(self, n: int, parts: int) -> np.ndarray:
        draw = self.draw
        if isinstance(draw, str):
            module, _, fn = draw.partition(":")
            draw = getattr(importlib.import_module(module), fn)
        return draw(n, parts)


KEY_LAWS: dict[str, KeyLaw] = {}


def register(law: KeyLaw) -> KeyLaw:
    if law.name in KEY_LAWS:
        raise ValueError(f"key law {law.name!r} is registered twice")
    KEY_LAWS[law.name] = law
    return law


def _exchange_of_angle(theta):
    return signed_rotation_key(theta, quadrant_sign(theta))


register(KeyLaw("haar", None, haar_orthogonal, doc="uniform on O(P), reflections included"))
register(KeyLaw("rotation", 2, lambda n, p: rotation_key_np(secure_angles(n)), rotation_key_np, private_fools=False,
                doc="the paper's angle: R(theta), theta uniform"))
register(KeyLaw("exchange", 2, lambda n, p: _exchange_of_angle(secure_angles(n)), _exchange_of_angle,
                doc="R(theta) diag(1, s), s = sign(sin 2 theta): the exchange defense"))


def default_law(parts: int, fool_sign: str = "none") -> str:
    """The law of a model dir that names none (format 1): the paper's angle, the exchange defense's signed
    angle (fool_sign "quadrant"), or Haar for P > 2."""
    return "exchange" if fool_sign == "quadrant" else ("rotation" if parts == 2 else "haar")


def get_law(name: str, parts: int) -> KeyLaw:
    """The registered law `name`, checked against the model's number of parts; else a one-line CvError."""
    law = KEY_LAWS.get(name)
    if law is None:
        raise CvError(f"unknown key law {name!r} (choose from {', '.join(KEY_LAWS)})")
    if law.parts is not None and law.parts != parts:
        raise CvError(f"key law {name!r} is for {law.parts} parts; this model has {parts}")
    return law


def law_of(manifest: dict) -> KeyLaw:
    """The key law a model dir's manifest records (format 2), or the one a format-1 manifest implies."""
    parts = int(manifest.get("parts", 2))
    return get_law(manifest.get("key_law") or default_law(parts, manifest.get("fool_sign", "none")), parts)


def draw_keys(law: KeyLaw, n: int, parts: int) -> np.ndarray:
    """n fresh secret keys [n, P, P] float32 by `law`, from os.urandom; a law that draws anything but
    orthogonal [n, P, P] keys is refused (the decoder's Q^T would not undo it)."""
    key = np.ascontiguousarray(law.sample(n, parts), dtype=np.float32)
    if key.shape != (n, parts, parts):
        raise CvError(f"key law {law.name!r} drew keys of shape {list(key.shape)}, expected [{n}, {parts}, {parts}]")
    if n and not np.allclose(key @ key.transpose(0, 2, 1), np.eye(parts, dtype=np.float32), atol=1e-4):
        raise CvError(f"key law {law.name!r} drew a key that is not orthogonal")
    return key
