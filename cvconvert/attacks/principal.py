"""The cloud's cross-transmission attack on related transmissions: for each transmission, its best partner
among everything received (largest first principal cosine) and the first principal vector u of the pair.
Scored against the truth the device knows (a and its fools): which-is-real = how often u lies nearer the
image than every fool (chance 1/P), and |cos(u, a)| (how well one direction estimates the image).

numpy only; used by the multi-query audit (experiments/query_guard.py, tests/test_query_guard.py).
"""

from __future__ import annotations

import numpy as np


def _bases(x: np.ndarray) -> np.ndarray:
    flat = np.asarray(x, np.float64).reshape(len(x), x.shape[1], -1).transpose(0, 2, 1)   # [T, D, P]
    return np.linalg.qr(flat)[0]


def principal(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [T, P, ...] -> (partner [T], s0 [T], u [T, D]): each transmission's best partner, the pair's first
    principal cosine and the first principal vector in the transmission's own span."""
    q = _bases(x)
    t = len(q)
    flat = q.transpose(0, 2, 1).reshape(t * q.shape[2], -1)
    gram = (flat @ flat.T).reshape(t, q.shape[2], t, q.shape[2]).transpose(0, 2, 1, 3)   # [T, T, P, P]
    s = np.linalg.svd(gram, compute_uv=False)[..., 0]
    np.fill_diagonal(s, -1.0)
    partner = s.argmax(1)
    u_mat, sig, _ = np.linalg.svd(gram[np.arange(t), partner])
    u = np.einsum("tdp,tp->td", q, u_mat[:, :, 0])
    return partner, sig[:, 0], u


def which_is_real(u: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """bool [T]: u [T, D] nearer the image a [T, D] than each fool b [T, P-1, D] (|cos|)."""
    unit = lambda v: v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-300)  # noqa: E731
    ca = np.abs((unit(u) * unit(a)).sum(-1))
    cb = np.abs(np.einsum("td,tkd->tk", unit(u), unit(b))).max(1)
    return ca > cb


def angle_from(u: np.ndarray, x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """P = 2: the angle the attacker reads from u taken as the image (sign fixed by the public features'
    mean), for the public decoder."""
    re = x[:, 0].reshape(len(x), -1).astype(np.float64)
    im = x[:, 1].reshape(len(x), -1).astype(np.float64)
    u = u * np.where(u @ mean >= 0, 1.0, -1.0)[:, None]
    coef = np.stack([np.linalg.lstsq(np.stack([r, i], 1), v, rcond=None)[0] for r, i, v in zip(re, im, u)])
    return np.arctan2(coef[:, 1], coef[:, 0]).astype(np.float32)
