"""The device runs the cloud's cross-transmission attack before it sends (numpy only, torch-free).

What the cloud computes from two transmissions s, t (docs/privacy.md): orthonormal bases Q_s, Q_t of the
spans of their P parts, and the singular values s_0 >= ... of Q_s^T Q_t, the cosines of the principal
angles. When s_0 is high and the rest are not (a near-duplicate or a look-alike of an earlier image, sent
with an unrelated fool), the first principal vector is the image's direction: it names the image and
estimates it better than one transmission does. When all P cosines are about equal (the fools as related
as the images) the principal vectors are any mixture of the P parts, and the pair tells nothing new.

So a transmission is fine against a past one when s_0 < ``floor`` (the pair shares no direction more than
unrelated pairs do) or s_0 - s_last <= ``margin`` (every direction is about equally shared). ``History``
holds the past spans (count-sketched: a count sketch keeps inner products to about 1/sqrt(k), and
principal cosines with them, see tests/test_query_guard.py) and says which candidate fools keep a new
transmission fine against every one of them.
"""

from __future__ import annotations

import numpy as np

DEFAULT_FLOOR = 0.80   # measured (docs/privacy.md): near-duplicates and look-alikes of an earlier image reach it
DEFAULT_MARGIN = 0.02  # the count sketch's error on principal cosines (p99 0.02): the coin's lead must beat it


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def orth(vectors: np.ndarray) -> np.ndarray:
    """[p, K] vectors -> [K, p] orthonormal basis of their span."""
    q, _ = np.linalg.qr(np.asarray(vectors, np.float64).T)
    return q


def cosines(qs: np.ndarray, qt: np.ndarray) -> np.ndarray:
    """Principal cosines between each past span qs [G, K, s] and the span qt [K, p]: [G, min(s, p)], largest
    first."""
    m = np.einsum("gks,kp->gsp", qs, qt)
    return np.linalg.svd(m, compute_uv=False)


class History:
    """The past transmissions of one model's feature space: unit (sketched) vectors [n, K], the transmission
    each belongs to, and each vector's best match so far (its largest cosine with the span of another
    transmission: what the cloud would pair it with)."""

    def __init__(self, vectors, groups, best=None, floor: float = DEFAULT_FLOOR, margin: float = DEFAULT_MARGIN,
                 top=None):
        self.floor, self.margin = float(floor), float(margin)
        vectors = np.asarray(vectors, np.float32)
        self.v = unit(vectors.reshape(len(groups), vectors.shape[-1] if vectors.ndim > 1 else 0)).astype(np.float64)
        self.g = np.asarray(groups, np.int64)
        self._bases()
        self.best = np.asarray(best, np.float64) if best is not None else self._all_best()
        # top: the vector of each transmission that its secret coin made the best matched one (unknown: the
        # one that is now)
        self.top = np.asarray(top, bool) if top is not None else self._argmax_now()

    def _argmax_now(self) -> np.ndarray:
        top = np.zeros(len(self.g), dtype=bool)
        for j in range(len(self.ids)):
            rows = np.flatnonzero(self.inv == j)
            top[rows[np.argmax(self.best[rows])]] = True
        return top

    def _bases(self) -> None:
        """One orthonormal basis per transmission: Q [G, K, dmax] (zero columns where a span is smaller)."""
        self.ids, inv = np.unique(self.g, return_inverse=True)
        dmax = int(np.bincount(inv).max()) if len(inv) else 0
        k = self.v.shape[1] if len(self.v) else 0
        self.q = np.zeros((len(self.ids), k, dmax))
        for j in range(len(self.ids)):
            rows = self.v[inv == j]
            self.q[j, :, :len(rows)] = orth(rows)
        self.inv = inv

    def _all_best(self) -> np.ndarray:
        return np.array([self.match(v[None], exclude=self.g[i])[0] for i, v in enumerate(self.v)]) \
            if len(self.v) else np.zeros(0)

    def __len__(self) -> int:
        return len(self.ids)

    def match(self, vectors: np.ndarray, exclude: int | None = None) -> np.ndarray:
        """[c] best match of each vector [c, K] over the past spans (0 with no history)."""
        if not len(self.ids):
            return np.zeros(len(vectors))
        w = unit(vectors).astype(np.float64)
        cos = np.sqrt((np.einsum("gkd,ck->cgd", self.q, w) ** 2).sum(2))  # [c, G]
        if exclude is not None:
            cos[:, self.ids == exclude] = 0.0
        return cos.max(1)

    def raised(self, basis: np.ndarray) -> np.ndarray:
        """[n] each past vector's best match once the span with orthonormal `basis` [K, p] is sent."""
        if not len(self.v):
            return np.zeros(0)
        return np.maximum(self.best, np.linalg.norm(self.v @ basis, axis=1))

    def fine(self, vectors: np.ndarray, top: int, m: np.ndarray | None = None) -> tuple[bool, str]:
        """Whether the transmission of `vectors` [p, K] (the image first) keeps the order the device's secret
        coins fixed: once any of its best matches reaches the floor, vector `top` is the best matched one by
        at least the margin; and every earlier transmission it raises keeps its own coin's vector on top.
        Then "the best matched vector is the image" is right 1/P of the time, whatever else is sent.
        Returns (ok, why not)."""
        m = self.match(vectors) if m is None else m
        if m.max() >= self.floor:
            others = np.delete(m, top)
            if len(others) and m[top] < others.max() + self.margin:
                return False, "the coin"
        new = self.raised(orth(vectors))
        for j in np.unique(self.inv[new > self.best + 1e-9]):
            rows = self.inv == j
            new_m, top_m = new[rows], self.top[rows]
            if new_m.max() >= self.floor and new_m[top_m].max() < new_m[~top_m].max(initial=-1.0):
                return False, f"an earlier transmission's best matches would become {np.round(new_m, 3).tolist()}"
        return True, ""

    def accept(self, chosen: np.ndarray, cands: np.ndarray, top: int, final: bool) -> np.ndarray:
        """bool [c]: which candidate fools [c, K] may join `chosen` [j, K] (the image, then the fools picked so
        far). ``final``: the candidate completes the transmission (all rules); else only the best-match
        rules that the partial transmission can already break."""
        cands = unit(np.asarray(cands, np.float32).reshape(len(cands), -1)).astype(np.float64)
        if not len(self.ids):
            return np.ones(len(cands), dtype=bool)
        m_chosen, m_c = self.match(chosen), self.match(cands)
        ok = np.ones(len(cands), dtype=bool)
        sides = np.zeros((len(cands), 2), dtype=bool)  # would pass with the coin on the image / on this fool
        for i in range(len(cands)):
            m = np.append(m_chosen, m_c[i])
            if not final:  # the coin's vector may still be missing: only the coin on the image can be judged
                ok[i] = top != 0 or m.max() < self.floor or m[0] >= m[1:].max() + self.margin
                continue
            both = np.concatenate([chosen, cands[i:i + 1]])
            for k, side in enumerate((0, len(m) - 1)):
                sides[i, k] = self.fine(both, side, m)[0]
            ok[i] = self.fine(both, top, m)[0]
        if final and not (sides[:, 0].any() and sides[:, 1].any()):
            # send only when the pool could have served either side of the coin: otherwise which cases get
            # sent would depend on the coin, and the sent ones would tell it
            ok[:] = False
        return ok

    def add(self, vectors: np.ndarray, group: int, top: int = 0) -> None:
        vectors = unit(np.asarray(vectors, np.float32).reshape(len(vectors), -1)).astype(np.float64)
        self.top = np.append(self.top, np.arange(len(vectors)) == top)
        m = self.match(vectors)
        basis = orth(vectors)
        raised = self.raised(basis)
        self.v = np.concatenate([self.v.reshape(len(self.v), vectors.shape[1]), vectors])
        self.g = np.append(self.g, np.full(len(vectors), group))
        self.best = np.concatenate([raised, m])
        if len(self.ids) and self.q.shape[2] >= basis.shape[1]:
            pad = np.zeros((1,) + self.q.shape[1:])
            pad[0, :, :basis.shape[1]] = basis
            self.q = np.concatenate([self.q, pad])
            self.ids = np.append(self.ids, group)
            self.inv = np.append(self.inv, np.full(len(vectors), len(self.ids) - 1))
        else:
            self._bases()
