"""`cvconvert fools audit`: can the pool's fools be told from the images this device has sent? (numpy only)

The exchange defense holds only while image and fool are exchangeable. A cloud that sees many
transmissions can learn what the device's images look like against what its fools look like; the device
can run that test first: a small cross-validated logistic classifier (PCA to a few dimensions, L2) on the
sketched features of the images it sent (from the guard) against the pool's unused fools, scored by AUC.
0.5: exchangeable; 1: the pool is another distribution, and fools can be named.
"""

from __future__ import annotations

import numpy as np

DEFAULT_WARN_AUC = 0.70  # measured (docs/privacy.md): same-distribution pool 0.48-0.59, footwear vs all 0.85-0.88
FOLDS = 5
DIMS = 16


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U from ranks; ties averaged)."""
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    for v in np.unique(score):  # average ranks of ties
        tie = score == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    pos = label.astype(bool)
    n1, n0 = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / max(n1 * n0, 1))


def _fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 300) -> np.ndarray:
    """Logistic regression by gradient descent on [x, 1]; returns the weights."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(xb.shape[1])
    lr = 1.0 / (0.25 * (xb ** 2).sum(1).mean() + l2)  # a step the loss's curvature allows
    for _ in range(steps):
        p = 1 / (1 + np.exp(-np.clip(xb @ w, -30, 30)))
        w -= lr * (xb.T @ (p - y) / len(y) + l2 * np.append(w[:-1], 0))
    return w


def separability(sent: np.ndarray, pool: np.ndarray, seed: int = 0) -> dict:
    """Cross-validated AUC of telling `sent` [n, d] from `pool` [m, d] (balanced by subsampling the larger)."""
    rng = np.random.default_rng(seed)  # which rows go to which fold: not a secret
    k = min(len(sent), len(pool))
    if k < 2 * FOLDS:
        return {"auc": None, "sent": len(sent), "pool": len(pool), "why": f"needs at least {2 * FOLDS} of each"}
    a = sent[rng.choice(len(sent), k, replace=False)]
    b = pool[rng.choice(len(pool), k, replace=False)]
    x, y = np.vstack([a, b]).astype(np.float64), np.r_[np.ones(k), np.zeros(k)]
    fold = rng.permutation(len(y)) % FOLDS
    score = np.zeros(len(y))
    for f in range(FOLDS):
        tr, te = fold != f, fold == f
        mu = x[tr].mean(0)
        _, _, vt = np.linalg.svd(x[tr] - mu, full_matrices=False)
        proj = vt[:DIMS].T
        z_tr, z_te = (x[tr] - mu) @ proj, (x[te] - mu) @ proj
        sd = z_tr.std(0) + 1e-9
        w = _fit(z_tr / sd, y[tr])
        score[te] = np.hstack([z_te / sd, np.ones((te.sum(), 1))]) @ w
    return {"auc": auc(score, y), "sent": int(len(sent)), "pool": int(len(pool)), "compared": int(k)}


# --- pictures of the public data set among the fools -----------------------------------------------------

NEAR_PUBLIC = 0.98  # measured (docs/privacy.md): distinct test image vs its nearest public one p99 0.977
SHIFT = 3           # pixels each way the check aligns over (and a mirror)
SHORTLIST = 50      # public candidates per image, by a shift- and mirror-invariant spectrum


def _grey(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, np.float32)
    return x.mean(1) if x.ndim == 4 else x


def _spectrum(grey: np.ndarray, k: int = 8) -> np.ndarray:
    f = np.abs(np.fft.fft2(grey))
    f = 0.5 * (f + np.roll(f[:, ::-1, :], 1, 1))  # |F(-u, v)|: the same for the mirrored picture
    low = np.concatenate([f[:, :k, :k], f[:, -k + 1:, :k]], 1).reshape(len(grey), -1)[:, 1:]  # no DC
    low = np.log1p(low)
    low -= low.mean(1, keepdims=True)
    return low / np.maximum(np.linalg.norm(low, axis=1, keepdims=True), 1e-12)


def _zn(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1)
    x = x - x.mean(1, keepdims=True)  # brightness and contrast do not matter
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _uncrop(im: np.ndarray) -> np.ndarray:
    """The picture a 1-px crop (resized back) came from, approximately: shrunk by 2 px, centred on a border."""
    from PIL import Image

    h, w = im.shape
    small = np.asarray(Image.fromarray(im.astype(np.float32), mode="F").resize((w - 2, h - 2), Image.BILINEAR))
    return np.pad(small, 1, mode="edge")


def near_public(images: np.ndarray, public: np.ndarray, threshold: float = NEAR_PUBLIC) -> np.ndarray:
    """bool [n]: which images are a shifted (up to 3 px), mirrored, cropped or re-encoded copy of a public
    picture: normalised pixel cosine >= threshold at the best alignment, over a shortlist of public pictures
    found by a shift- and mirror-invariant spectrum. Pictures of another size are compared at 32 x 32."""
    mine, pub = _grey(images), _grey(public)
    if mine.shape[1:] != pub.shape[1:]:
        from PIL import Image
        size = pub.shape[1:][::-1]
        mine = np.stack([np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize(size), np.float32) / 255
                         for m in mine])
    spec_pub = _spectrum(pub)
    shortlist = np.argsort(-(_spectrum(mine) @ spec_pub.T), 1)[:, :SHORTLIST]
    out = np.zeros(len(mine), dtype=bool)
    for i, im in enumerate(mine):
        variants = [np.roll(m, (dy, dx), (0, 1)) for s in (im, _uncrop(im)) for m in (s, s[:, ::-1])
                    for dy in range(-SHIFT, SHIFT + 1) for dx in range(-SHIFT, SHIFT + 1)]
        out[i] = (_zn(np.stack(variants)) @ _zn(pub[shortlist[i]]).T).max() >= threshold
    return out
