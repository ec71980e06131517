"""What the device keeps of each vector and picture it sends (numpy and PIL, torch-free): the feature itself
(unit, float16) up to EXACT_DIM numbers, else a count sketch (inner products, and principal cosines with them,
kept to about 1/sqrt(SKETCH_DIM)), and a small grey picture, the model-independent record a new model
version re-embeds (cvconvert.device.guard).

Exact where it fits: the guard's margin is its error on principal cosines, and a margin of the sketch's
0.02 made every kept fool on top land 0.02 or more above the image's own relation, which a cloud that
learnt it from its own principal cosines read (docs/results.md, stop 29)."""

from __future__ import annotations

import numpy as np

from .screen import unit

SKETCH_DIM = 1024
EXACT_DIM = 8192        # features up to this many numbers are kept as they are (LeNet's 4704: 9.4 kB a vector)
SKETCH_MARGIN = 0.02    # the count sketch's error on principal cosines (p99, experiments/results/query_geometry.json)
EXACT_MARGIN = 0.005    # exact features, kept in float16: a lead the cloud's own numbers cannot reorder
SKETCH_SEED = 20200214  # public and fixed: the sketch only has to be the same on every call
PICTURE = 32            # side of the kept pictures
PICTURE_THRESHOLD = 0.995  # 16 x 16 pixel cosine: a copy or re-encoding of a picture (measured: JPEG 70 0.997+)


def sketch(features: np.ndarray) -> np.ndarray:
    """[n, ...] features -> [n, k] unit vectors: the features themselves for D <= EXACT_DIM, else a count
    sketch to k = SKETCH_DIM numbers."""
    features = np.asarray(features, dtype=np.float32)
    flat = features.reshape(len(features), int(np.prod(features.shape[1:])))
    d = flat.shape[1]
    if d > EXACT_DIM:
        rng = np.random.default_rng(SKETCH_SEED)
        bucket = rng.integers(0, SKETCH_DIM, d)
        sign = rng.choice(np.array([-1.0, 1.0], np.float32), d)
        order = np.argsort(bucket, kind="stable")
        starts = np.searchsorted(bucket[order], np.arange(SKETCH_DIM))
        flat = np.add.reduceat((flat * sign)[:, order], starts, axis=1)  # every bucket is non-empty for d >> k
    return unit(flat)


def default_margin(width: int) -> float:
    """The guard's margin for kept vectors of `width` numbers: the sketch's error, or the exact one's."""
    return SKETCH_MARGIN if width == SKETCH_DIM else EXACT_MARGIN


def picture(images: np.ndarray) -> np.ndarray:
    """[n, C, H, W] in [0, 1] -> [n, 32, 32] uint8 grey pictures (the model-independent record)."""
    from PIL import Image

    grey = np.asarray(images, np.float32).mean(1)
    out = [np.asarray(Image.fromarray(np.rint(np.clip(g, 0, 1) * 255).astype(np.uint8)).resize(
        (PICTURE, PICTURE), Image.BILINEAR)) if g.shape != (PICTURE, PICTURE) else np.rint(np.clip(g, 0, 1) * 255)
        for g in grey]
    return np.stack(out).astype(np.uint8) if out else np.zeros((0, PICTURE, PICTURE), np.uint8)


def unpicture(pics: np.ndarray, input_shape) -> np.ndarray:
    """Kept pictures back to model inputs [n, C, H, W] (grey in every channel), for a new model's features."""
    from PIL import Image

    c, h, w = input_shape
    out = [np.asarray(Image.fromarray(p).resize((w, h), Image.BILINEAR)) if (h, w) != p.shape else p for p in pics]
    grey = np.stack(out).astype(np.float32) / 255
    return np.repeat(grey[:, None], c, 1)


def picture_sketch(pics: np.ndarray) -> np.ndarray:
    """[n, 32, 32] uint8 -> [n, 256] zero-mean unit vectors of the 16 x 16 block means."""
    x = np.asarray(pics, np.float32).reshape(len(pics), 16, 2, 16, 2).mean((2, 4)).reshape(len(pics), -1)
    return unit(x - x.mean(1, keepdims=True))
