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


# -- the adaptive reading: a cloud that learns when "u is the image" is right ----------------------------
FOLDS = 5


def observables(x: np.ndarray) -> np.ndarray:
    """x [T, P, ...] -> [T, 6]: what the cloud computes per transmission without a key, beyond u: its best
    pair's first and second principal cosines, the second-best pair's first, |cos| between the principal
    vectors (in its own span) of the two best pairs, how many transmissions it is related to, and whether its
    best partner's best partner is itself. The guard keeps "u is the image" at chance per level of the first
    cosine; a cloud that simulates the device on public data can learn whether any of these tell more."""
    from ..device.screen import DEFAULT_FLOOR as RELATED  # public: the cloud knows the device's algorithm

    q = _bases(x)
    t, p = len(q), q.shape[2]
    flat = q.transpose(0, 2, 1).reshape(t * p, -1)
    gram = (flat @ flat.T).reshape(t, p, t, p).transpose(0, 2, 1, 3)   # [T, T, P, P]
    u_all, s_all, _ = np.linalg.svd(gram)
    s0 = s_all[..., 0].copy()
    np.fill_diagonal(s0, -1.0)
    order = np.argsort(-s0, axis=1)
    rows = np.arange(t)
    best, second = order[:, 0], order[:, 1] if t > 2 else order[:, 0]
    agree = np.abs(np.einsum("tp,tp->t", u_all[rows, best][:, :, 0], u_all[rows, second][:, :, 0]))
    return np.stack([s0[rows, best], s_all[rows, best, 1] if p > 1 else np.zeros(t), s0[rows, second], agree,
                     (s0 >= RELATED).sum(1), (best[best] == rows).astype(float)], 1)


def adaptive(features: np.ndarray, real: np.ndarray, parts: int, seed: int = 0) -> dict:
    """The best reading of a cloud that predicts from `features` [T, d] (``observables``) whether u is the
    image: a cross-validated L2 logistic fit (folds by a public seed), then per transmission u when the
    predicted chance reaches 1/P, else a guess among the other P - 1 parts. Returns its expected
    which-is-real over the held-out transmissions (chance 1/P; a reading that learns nothing scores
    max(p, (1 - p)/(P - 1)) less the fit's noise) and the predictions' AUC."""
    from ..device.pool_audit import auc

    real = np.asarray(real, bool)
    t = len(real)
    if t < 2 * FOLDS or real.all() or not real.any():  # nothing to learn from: the better constant reading
        p = float(real.mean()) if t else 0.0
        return {"adaptive_real": max(p, (1 - p) / (parts - 1)) if t else None, "adaptive_auc": None, "n": int(t)}
    z = np.asarray(features, np.float64)
    fold = np.random.default_rng(seed).permutation(t) % FOLDS
    prob = np.zeros(t)
    for f in range(FOLDS):
        prob[fold == f] = fit_predict(z[fold != f], real[fold != f], z[fold == f])
    return {"adaptive_real": reading(prob, real, parts), "adaptive_auc": auc(prob, real.astype(float)), "n": int(t)}


def fit_predict(train: np.ndarray, real: np.ndarray, test: np.ndarray) -> np.ndarray:
    """The cloud's model: an L2 logistic fit of `real` on standardized `train` features; the predicted chance
    that u is the image for each row of `test`."""
    from ..device.pool_audit import _fit

    mu, sd = train.mean(0), train.std(0) + 1e-9
    w = _fit((train - mu) / sd, np.asarray(real, float))
    return 1 / (1 + np.exp(-np.clip(np.hstack([(test - mu) / sd, np.ones((len(test), 1))]) @ w, -30, 30)))


def reading(prob: np.ndarray, real: np.ndarray, parts: int) -> float:
    """Expected which-is-real of reading u where `prob` reaches 1/P, else guessing among the other P - 1."""
    real = np.asarray(real, bool)
    return float(np.where(prob >= 1.0 / parts, real, (~real) / (parts - 1)).mean())
