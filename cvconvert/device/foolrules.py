"""The fool-picking rules and the single-transmission simulation (numpy only, torch-free).

The picking rules. ``random`` (the paper): any candidate, uniformly. ``match``: a symmetric pairing law
that favours distant pairs (docs/results.md, "Choosing the fool"). Over a set of images (the image plus
up to 63 candidates), W = Sinkhorn(exp(lam D / mean D)) with a zero diagonal, D the mean absolute pixel
distance, and the fool is drawn from the image's row of W. W is symmetric and doubly stochastic, so for an
iid set P(I, I') = P(I', I): the pair stays exchangeable, which is what the exchange defense rests on,
while the pair's expected distance rises from ~0.21 to ~0.27 on Fashion-MNIST and with it the error of any
attacker that cannot tell the two apart. Picking the farthest candidate instead leaks which image is real
(measured: a classifier tells them apart 91% of the time), so it is not offered.
"""

from __future__ import annotations

import os
import secrets

import numpy as np

FOOL_RULES = ("random", "match")
MATCH_LAMBDA = 16.0  # measured value (experiments/results/farfool.md)
MATCH_SET = 64  # the image + 63 candidates


def check_rule(rule: str) -> str:
    from ..errors import CvError

    if rule not in FOOL_RULES:
        raise CvError(f"unknown fool rule {rule!r} (choose from {', '.join(FOOL_RULES)})")
    return rule


def l1_distances(flat: np.ndarray) -> np.ndarray:
    """[..., K, P] flattened images -> [..., K, K] mean absolute differences (one image of each set at a
    time, so memory stays that of the input)."""
    flat = np.asarray(flat, dtype=np.float32)
    return np.stack([np.abs(flat - flat[..., i:i + 1, :]).mean(-1, dtype=np.float64)
                     for i in range(flat.shape[-2])], -2)


def pairing_law(dist: np.ndarray, lam: float = MATCH_LAMBDA, iters: int = 300) -> np.ndarray:
    """[..., K, K] distances -> W [..., K, K]: symmetric, zero diagonal, rows and columns summing to 1
    (to about 0.3% after 300 iterations)."""
    dist = np.asarray(dist, dtype=np.float64)
    k = dist.shape[-1]
    if k < 2:
        raise ValueError("a pairing needs at least two images")
    logk = lam * dist / np.maximum(dist.mean(axis=(-1, -2), keepdims=True), 1e-12)
    logk = np.where(np.eye(k, dtype=bool), -np.inf, logk)
    lu = np.zeros(dist.shape[:-1])
    for _ in range(iters):  # symmetric Sinkhorn in log space: u * (K u) = 1
        z = logk + lu[..., None, :]
        m = z.max(-1, keepdims=True)
        lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
        lu = 0.5 * (lu - lse)
    return np.exp(lu[..., :, None] + logk + lu[..., None, :])


def match_law(flat: np.ndarray, lam: float = MATCH_LAMBDA, iters: int = 300) -> np.ndarray:
    """[..., K, P] flattened images of each set -> its pairing law [..., K, K]; row i: image i's fool."""
    return pairing_law(l1_distances(flat), lam, iters)


def draw(probs: np.ndarray, uniform: float) -> int:
    """The index that a uniform number in [0, 1) picks from an (unnormalised) probability row."""
    c = np.cumsum(probs)
    return int(min(np.searchsorted(c / c[-1], uniform, side="right"), len(probs) - 1))


def _uniform() -> float:
    return secrets.randbits(53) / 2.0 ** 53


def fallback_fool(image: np.ndarray) -> np.ndarray:
    """A fooling input for a lone image: smooth random noise with the image's per-channel mean and std.

    Never zero (b = 0 makes x = e^{i theta} a and the phase of a gives theta away) and never derived from
    the image's content (a flipped copy would put the image into both parts). Fresh per call, so it never
    appears in two transmissions; weaker than a real image, since noise features look unnatural.
    """
    c, h, w = image.shape
    noise = np.frombuffer(os.urandom(4 * c * h * w), dtype=np.uint32).astype(np.float32) / 2.0 ** 32
    noise = noise.reshape(c, h, w)
    k = max(1, min(h, w) // 8)  # box blur: natural images are smooth, white noise is not
    if k > 1:
        kernel = np.ones(k, np.float32) / k
        noise = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), 2, noise)
        noise = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), 1, noise)
    mean, std = image.mean(axis=(1, 2), keepdims=True), image.std(axis=(1, 2), keepdims=True)
    n_mean, n_std = noise.mean(axis=(1, 2), keepdims=True), noise.std(axis=(1, 2), keepdims=True) + 1e-6
    std = np.maximum(std, 0.1)  # a flat image still gets a non-zero fool
    return np.clip((noise - n_mean) / n_std * std + mean, 0.0, 1.0).astype(np.float32)


def pick(image: np.ndarray, candidates: np.ndarray, rule: str) -> int:
    """Index into `candidates` of `image`'s fool: uniform (``random``) or by the ``match`` law over the
    image and the candidates (CSPRNG either way)."""
    if rule == "random" or len(candidates) == 1:
        return secrets.randbelow(len(candidates))
    group = np.concatenate([image[None], candidates]).reshape(len(candidates) + 1, -1)
    return draw(match_law(group)[0, 1:], _uniform())  # row 0 without W_00 = 0: never the image itself


def choose_fools(images: np.ndarray, pool: np.ndarray | None = None, rule: str = "random") -> tuple[np.ndarray, str]:
    """SIMULATION ONLY (training's and the audit's single-transmission model, and the audit's picture of
    the old unsafe device): one fool per image from `pool` drawn with replacement, else another image of the
    batch, else `fallback_fool`. A device never sends these: they break the one-transmission rule.
    Returns (fools, how)."""
    n = images.shape[0]
    check_rule(rule)
    rand = secrets.SystemRandom()
    has_pool = pool is not None and len(pool) > 0
    if not has_pool and n == 1:
        return np.stack([fallback_fool(im) for im in images]), "noise"
    out = []
    for i, image in enumerate(images):
        if has_pool:
            cands = pool[rand.sample(range(len(pool)), min(len(pool), MATCH_SET - 1))]
        else:
            cands = images[rand.sample([j for j in range(n) if j != i], min(n - 1, MATCH_SET - 1))]
        out.append(cands[pick(image, cands, rule)])
    return np.ascontiguousarray(np.stack(out), dtype=np.float32), "fool-dir" if has_pool else "batch"
