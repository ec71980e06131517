"""How each image's fooling image I' is picked (numpy only: the device runtime uses it, torch-free).

``random`` (the paper): any other image, uniformly.

``match``: a symmetric pairing law that favours distant pairs (docs/results.md, "Choosing the fool").
Over a set of images (the image plus up to 63 candidates, or a training batch), W = Sinkhorn(exp(lam D /
mean D)) with a zero diagonal, D the mean absolute pixel distance, and the fool is drawn from the image's
row of W. W is symmetric and doubly stochastic, so for an iid set P(I, I') = P(I', I): the pair stays
exchangeable, which is what the exchange defense rests on, while the pair's expected distance rises from
~0.21 to ~0.27 on Fashion-MNIST and with it the error of any attacker that cannot tell the two apart.
Picking the farthest candidate instead leaks which image is real (measured: a classifier tells them apart
91% of the time), so it is not offered.
"""

from __future__ import annotations

import numpy as np

FOOL_RULES = ("random", "match")
MATCH_LAMBDA = 16.0  # measured value (experiments/results/farfool.md)
MATCH_SET = 64  # the image + 63 candidates


def check_rule(rule: str) -> str:
    from .errors import CvError

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
