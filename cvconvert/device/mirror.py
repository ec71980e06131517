"""Mirrored fools: the symmetric geometry for an image related to one sent before (numpy + PIL, torch-free).

An image a2 whose feature lies near an earlier image a1 (cosine c >= the guard's floor: a shift, a crop, a
re-encoding, a look-alike) shares a direction with a1's transmission. Sent with unrelated fools, that shared
direction is the image's, and the cloud's principal vector names it (docs/privacy.md). So the device gives
each of the new transmission's fools a partner too: fool j of the new transmission mirrors fool j of the
earlier one (``source``), at a cosine on a ladder around c,

    rank q of the P vectors: c + (r - q) d,   d drawn in [margin, 2 margin], r the image's rank,

so every vector of the new transmission has a counterpart in the earlier one and the P principal cosines
are a ladder of step d whatever the image's place in it. The top of the ladder is what the cloud's best
pair names in both transmissions: the order of the ladder is drawn uniformly, so the top is a fresh coin
for the new transmission and, through its counterpart, for the earlier one, which the new one renames.
(Keeping the earlier coin on top instead named the image 0 of 30 times at P = 2: the mirror is reached
mostly when the earlier coin is a fool, the pool's fools keeping an earlier image's coin easily.) The
guard sends a mirror only when a ladder with the other kind on top (``image_top``) fits too, so that
whether an image is mirrored tells nothing of its coin.

A mirror fool is, in this order: an unused pool fool whose feature lies at the target cosine to the source
(a natural look-alike of the earlier fool), else a small random affine change of the source fool's picture
(rotation, shift, scale) whose strength puts it at the target. The ladder must fit below ``ceiling`` for
every coin (a rule on c alone, so which images are sent tells nothing of the coin); when it does not (c
within (P - 1) 2 margin of the ceiling: the image is all but a copy of the earlier one) the earlier image's
answer is used instead.
"""

from __future__ import annotations

import secrets

import numpy as np

VARIANTS = 24       # affine strengths tried per direction
DIRECTIONS = 3      # random directions tried per fool
MAX_ROTATE = 14.0   # degrees, at strength 1
MAX_SHIFT = 2.5     # pixels (of a 32-pixel side), at strength 1
MAX_SCALE = 0.12    # relative, at strength 1
TAPER = 0.03        # the ceiling a ladder must fit under is drawn per mirror from this far below the guard's
                    # (a hard ceiling left the strip above the highest image on top to fools: at P = 2 a best
                    # pair at 0.98 or more named its image 0.31 of the time, 84 three-degree rotations)


def _uniform() -> float:
    return secrets.randbits(53) / 2.0 ** 53


def ladder(c: float, parts: int, margin: float, ceiling: float, image_top: bool | None = None):
    """(targets [P-1]: the cosine fool j must have with the earlier transmission's fool j, the new
    transmission's coin: the vector on top of the ladder, drawn uniformly) or None when the ladder cannot fit
    below `ceiling` (then nothing is mirrored). ``image_top``: the order drawn uniformly among those with
    the image (True) or a fool (False) on top."""
    if c + (parts - 1) * 2 * margin > ceiling or margin <= 0:
        return None
    d = margin * (1.0 + _uniform())
    order = list(range(parts))  # order[q]: the vector at rank q (0: the image, j: fool j)
    secrets.SystemRandom().shuffle(order)
    r = order.index(0)
    if image_top and r:  # the image to the top; the fools' order stays uniform
        order[0], order[r] = order[r], order[0]
    elif image_top is False and not r:  # a uniform other rank for the image: uniform over fool-topped orders
        k = 1 + secrets.randbelow(parts - 1)
        order[0], order[k] = order[k], order[0]
    r = order.index(0)
    values = c + (r - np.arange(parts)) * d
    targets = np.zeros(parts - 1)
    for q, v in enumerate(order):
        if v:
            targets[v - 1] = values[q]
    return targets, order[0]


def _affine(channel: np.ndarray, angle: float, dx: float, dy: float, scale: float) -> np.ndarray:
    from PIL import Image

    h, w = channel.shape
    a, cx, cy = np.deg2rad(angle), (w - 1) / 2, (h - 1) / 2
    cos, sin = np.cos(a) / scale, np.sin(a) / scale
    # PIL maps each output pixel (x, y) to the input (ax + by + c, dx + ey + f): rotate and scale about the
    # centre, then shift
    coef = (cos, sin, cx - cos * (cx + dx) - sin * (cy + dy), -sin, cos, cy + sin * (cx + dx) - cos * (cy + dy))
    pic = Image.fromarray(channel.astype(np.float32), mode="F")
    return np.asarray(pic.transform((w, h), Image.AFFINE, coef, resample=Image.BILINEAR, fillcolor=float(
        np.median(np.concatenate([channel[0], channel[-1], channel[:, 0], channel[:, -1]])))))


def variants(image: np.ndarray, n: int = VARIANTS) -> np.ndarray:
    """[n, C, H, W]: `image` changed by one random affine direction at n strengths, weakest first, each
    rounded to 8 bits like a photo."""
    g = np.array([_uniform() * 2 - 1 for _ in range(4)])
    g /= max(np.abs(g).max(), 1e-6)
    side = max(image.shape[1:]) / 32.0
    out = []
    for s in np.linspace(1.0 / n, 1.0, n):
        angle, dx, dy, sc = s * g[0] * MAX_ROTATE, s * g[1] * MAX_SHIFT * side, s * g[2] * MAX_SHIFT * side, \
            1.0 + s * g[3] * MAX_SCALE
        out.append(np.stack([_affine(ch, angle, dx, dy, sc) for ch in image]))
    return np.clip(np.rint(np.stack(out) * 255) / 255, 0, 1).astype(np.float32)


def pool_choice(source: np.ndarray, lo: float, hi: float, ok):
    """A `choose` for FoolPool.take_where: an unused pool fool whose sketch lies in [lo, hi] of `source` and
    that ``ok(sketches, images)`` lets through (drawn uniformly among those), or None."""
    def choose(free, sketches, images):
        if not len(free):
            return None
        cos = np.asarray(sketches[free], np.float32) @ source
        hits = free[(cos >= lo) & (cos <= hi)]
        if len(hits):
            hits = hits[np.asarray(ok(np.asarray(sketches[hits], np.float32), np.asarray(images[hits])), bool)]
        return None if not len(hits) else [int(hits[secrets.randbelow(len(hits))])]
    return choose


def derived(source_image: np.ndarray, source: np.ndarray, lo: float, hi: float, features, ok):
    """(image, feature) of an affine variant of `source_image` whose sketch lies in [lo, hi] of `source`
    and that ``ok(sketches, images) -> bool [k]`` lets through, or None. features: images -> features."""
    from .sketches import sketch

    for _ in range(DIRECTIONS):
        cands = variants(source_image)
        feats = features(cands)
        sk = sketch(feats)
        good = np.flatnonzero(((sk @ source) >= lo) & ((sk @ source) <= hi))
        if len(good):
            good = good[np.asarray(ok(sk[good], cands[good]), bool)]
        if len(good):
            k = int(good[secrets.randbelow(len(good))])
            return cands[k], feats[k]
    return None

class Mirrored:
    """The mirror fools of one image as they are found: images, features, and the pool indices taken."""

    def __init__(self):
        self.images, self.features, self.index = [], [], []

    def add(self, image, feature, index) -> None:
        self.images.append(np.asarray(image, np.float32))
        self.features.append(np.asarray(feature, np.float32))
        if index is not None:
            self.index.append(int(index))

    def done(self) -> "Mirrored":
        self.images, self.features = np.stack(self.images), np.stack(self.features)
        return self
