"""The device runs the cloud's cross-transmission attack before it sends (numpy only, torch-free).

What the cloud computes from two transmissions s, t (docs/privacy.md): orthonormal bases Q_s, Q_t of the
spans of their P parts, and the singular values s_0 >= ... of Q_s^T Q_t, the cosines of the principal
angles. When s_0 is high and the rest are not (a near-duplicate or a look-alike of an earlier image, sent
with an unrelated fool), the first principal vector is the image's direction: it names the image and
estimates it better than one transmission does. When all P cosines are about equal (the fools as related
as the images) the principal vectors are any mixture of the P parts, and the pair tells nothing new.

The cloud, for each transmission, takes its best pair (largest s_0 over everything it holds) and reads the
vector its first principal vector lies nearest as the image. The device draws a secret coin per
transmission (which of its P vectors that is to be) and sends only what keeps every coin: the new
transmission's best pair names its coin (at every level, with a lead of ``margin``), and every earlier
transmission it becomes the best pair of (once s_0 reaches ``floor``) still has its own coin named. Then the
cloud's reading is right 1/P of the time. A second secret coin says whether the principal vectors of the
new transmission's two best pairs are to agree (``AGREE``): a cloud that learnt "they agree, so the named
vector is the image" from its own simulation read it otherwise. ``History`` holds the past spans (exact
features, or count sketches for large ones: a count sketch keeps inner products to about 1/sqrt(k), and
principal cosines with them, see tests/test_query_guard.py) and says which candidate fools keep every coin.
"""

from __future__ import annotations

import secrets

import numpy as np

DEFAULT_FLOOR = 0.80   # measured (docs/privacy.md): near-duplicates and look-alikes of an earlier image reach it
BAND = 0.05           # width of the levels of best-pair cosine over which the device keeps its own which-is-real
DEFAULT_MARGIN = 0.02  # the count sketch's error on principal cosines (p99 0.02): the named vector's lead must beat it
AGREE = 0.9           # |cos| between the principal vectors of the two best pairs from which on they "agree"
LIFT = 3.0             # a fool kept on top lies at most LIFT margins above the image's own relation (History.fine)


def _over(n: int, named_image: int, parts: int, image: bool) -> bool:
    """Whether one more transmission naming its image (else a fool), among n of which named_image name their
    image, puts that kind's share over its chance share (1/P, (P-1)/P) by more than one transmission (fools:
    by more than P - 1). The slacks give both readings the same bound: k images named too many lift "the
    named vector is the image" by k/n, k too few lift "it is one of the others" by k/(n (P - 1)); at P = 3 a
    slack of one on the fools' side answered 5-7% of distinct images from another image's answer."""
    if image:
        return named_image + 1 > (n + 1) / parts + 1
    return n - named_image + 1 > (n + 1) * (parts - 1) / parts + (parts - 1)


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
    each belongs to, each transmission's best pair so far (its largest first principal cosine with another
    transmission: what the cloud pairs it with, stored on each of its vectors) and its secret coin (``top``:
    the vector that pair's principal vector must name)."""

    def __init__(self, vectors, groups, best=None, floor: float = DEFAULT_FLOOR, margin: float = DEFAULT_MARGIN,
                 top=None):
        self.floor, self.margin = float(floor), float(margin)
        vectors = np.asarray(vectors, np.float32)
        self.v = unit(vectors.reshape(len(groups), vectors.shape[-1] if vectors.ndim > 1 else 0)).astype(np.float64)
        self.g = np.asarray(groups, np.int64)
        self._bases()
        self.best = np.asarray(best, np.float64) if best is not None else self._all_best()
        self.top = np.asarray(top, bool) if top is not None else self._named_now()

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

    def __len__(self) -> int:
        return len(self.ids)

    def _pairs(self, basis: np.ndarray):
        """Against the span with orthonormal `basis` [K, p]: per past transmission the first principal cosine
        [G], the principal vector's coefficients in the past span [G, d] (the vector itself, for row j:
        ``self.q[j] @ u[j]``, formed only where it is read: at G = 5000 forming all of them was most of the
        screen's time) and its coefficients in `basis` [G, p]."""
        m = np.matmul(self.q.transpose(0, 2, 1), basis)
        u, s, vt = np.linalg.svd(m)
        return s[:, 0], u[:, :, 0], vt[:, 0, :]

    @staticmethod
    def _names(u: np.ndarray, vectors: np.ndarray) -> tuple[int, float]:
        """Which of `vectors` [p, K] the direction u lies nearest (|cos|), and by how much over the next."""
        c = np.sort(np.abs(vectors @ u))[::-1]
        return int(np.argmax(np.abs(vectors @ u))), float(c[0] - (c[1] if len(c) > 1 else 0.0))

    def _all_best(self) -> np.ndarray:
        best = np.zeros(len(self.g))
        for j in range(len(self.ids)):
            s0, _, _ = self._pairs(self.q[j])
            s0[j] = 0.0
            best[self.inv == j] = s0.max() if len(s0) else 0.0
        return best

    def _named_now(self) -> np.ndarray:
        """Coins unknown (an older memory): the vector each transmission's best pair names now."""
        top = np.zeros(len(self.g), dtype=bool)
        for j in range(len(self.ids)):
            rows = np.flatnonzero(self.inv == j)
            s0, u, _ = self._pairs(self.q[j])
            s0[j] = -1.0
            b = int(np.argmax(s0))
            top[rows[self._names(self.q[b] @ u[b], self.v[rows])[0] if len(s0) > 1 else 0]] = True
        return top

    def relation(self, vector: np.ndarray) -> float:
        """A vector's own relation to what was sent: the largest first principal cosine between it and a past
        span (where an image on top puts its transmission's best pair)."""
        if not len(self.ids):
            return 0.0
        v = unit(np.asarray(vector, np.float64).reshape(-1))
        return float(np.linalg.norm(np.einsum("gks,k->gs", self.q, v), axis=1).max())

    def fine(self, vectors: np.ndarray, top: int | None, margin: float | None = None,
             renamed: tuple[int, int] | None = None, cap: float | None = None,
             agree: bool | None = None) -> tuple[bool, str]:
        """Whether the transmission of `vectors` [p, K] (the image first) keeps every coin: its best pair's
        principal vector, and that of every pair within the margin of it (at every level: below the floor,
        left to the geometry, the image was named 0.65 of the time with exact features), names vector `top`
        by at least the margin (``top`` None: not asked), and every
        earlier transmission whose best pair it becomes still has its own coin named (``renamed`` (group,
        k): that transmission must name its vector k instead). Then "the vector the best pair names is the
        image" is right 1/P of the time. ``cap``: a fool on top may not lift the best pair's cosine over it
        (else the cosine tells the coin: fools kept on top lay above the image's own relation, and at P = 2 a
        cloud that learnt it from s0 named the image 0.63-0.68 of the time). ``agree`` (with ``top``): whether
        the principal vectors of its two best pairs must agree (|cos| >= AGREE) or not; the image is related
        to more of what was sent than a pool fool, so left alone they agreed where the image was named (0.55
        of those named it, 0.32-0.41 of the others) and a cloud that learnt it read 0.57. (ok, why not)."""
        if not len(self.ids):
            return True, ""
        vectors = unit(np.asarray(vectors, np.float64))
        basis = orth(vectors)
        s0, u_past, coef = self._pairs(basis)
        j = int(np.argmax(s0))
        if cap is not None and top not in (None, 0) and s0[j] > cap:
            return False, "the level"
        if top is not None:
            # every pair within the sketch's error of the best one could be the best in the cloud's exact
            # features: each must name the coin (with the best alone, the exact reading named the image 0.38
            # of the time at P = 2 where the coins said 0.43: an image on top is undone by any fool that
            # lies nearly as near another span, a fool on top by nothing)
            for k in np.flatnonzero(s0 >= s0[j] - self.margin):
                named, lead = self._names(basis @ coef[k], vectors)
                if named != top or lead < (self.margin if margin is None else margin):
                    return False, "the coin"
        for j in self._renamed(s0):
            rows = np.flatnonzero(self.inv == j)
            named, _ = self._names(self.q[j] @ u_past[j], self.v[rows])
            fresh = renamed is not None and self.ids[j] == renamed[0]  # a mirror's partner: its fresh coin
            if (named != renamed[1]) if fresh else not self.top[rows[named]]:
                return False, "an earlier transmission's coin"
        if top is not None and agree is not None and len(s0) > 1:
            first, second = np.argsort(-s0)[:2]
            if (abs(float(coef[first] @ coef[second])) >= AGREE) != agree:
                return False, "the agreement"
        return True, ""

    def _renamed(self, s0: np.ndarray) -> np.ndarray:
        """The earlier transmissions a new one at first principal cosines `s0` [G] becomes the best pair of."""
        return np.flatnonzero((s0 > self.best_of_group()) & (s0 >= self.floor))

    def named(self, vectors: np.ndarray) -> int:
        """The vector of a transmission [p, K] that its best pair's principal vector names now (0: no history)."""
        return self.reading(vectors)[0]

    def reading(self, vectors: np.ndarray) -> tuple[int, float]:
        """(the vector its best pair's principal vector names, that pair's first principal cosine)."""
        if not len(self.ids):
            return 0, 0.0
        vectors = unit(np.asarray(vectors, np.float64))
        basis = orth(vectors)
        s0, _, coef = self._pairs(basis)
        j = int(np.argmax(s0))
        return self._names(basis @ coef[j], vectors)[0], float(s0[j])

    def over_share(self, s0: float, parts: int, image: bool) -> bool:
        """Whether one more transmission whose best pair (at cosine s0) names its image (`image`; else one of
        its fools) would put that kind's share among the transmissions of its level (bands of BAND from the
        floor) over 1/P (for fools (P-1)/P) by more than one (fools: P - 1, see _over): reading "the named
        vector is the image" at that level, or its opposite, would then beat chance."""
        if s0 < self.floor or not len(self.ids):
            return False
        first = np.unique(self.g, return_index=True)[1]  # each transmission's image (its first vector)
        best = self.best_of_group()
        same = self._band(best) == self._band(s0)
        # the level's share and the share over every level above the floor (the cloud can count either)
        return any(_over(int(m.sum()), int(self.top[first][m].sum()), parts, image)
                   for m in (same, best >= self.floor))

    def coin(self, parts: int, level: float | None = None, rise: float = 0.0) -> int:
        """A secret coin for a transmission that keeps it (which of its P vectors its best pair is to name),
        leaning against the image's deficit. When the image has been named at least one transmission fewer
        than its chance share the coin falls on the image with probability 1/P + 1/P (P = 2: always); when
        more, never; else 1/P. The share is counted over every level above the floor; with ``level`` (where
        the image on top puts the best pair) over the bands the transmission can land in: the image's, and
        the one `rise` above it where a fool on top puts it. A fool kept on top lies above the image's own
        relation, so a fair coin fills the upper bands with fools (at P = 2 the band 0.95-0.98 named its image
        0.12-0.20 of the time, 0.80-0.85 0.63-0.71, and a cloud that learnt it from s0 named the image 0.63-0.68
        of the time); transmissions sent without a kept coin (SentGuard._balanced) name their image less often
        than 1/P at P = 3, and the share rule then answered them from another image."""
        deficit = 0.0
        if len(self.ids):
            named = self.top[np.unique(self.g, return_index=True)[1]]
            best = self.best_of_group()

            def short(m):
                return m.sum() / parts - named[m].sum()
            bands = [v for v in (level, level + rise) if v >= self.floor] if level is not None else []
            # an image deficit at either band asks for the image (at the fool's band a fool deepens it)
            deficit = sum(short(self._band(best) == self._band(v)) for v in bands) if bands else \
                short(best >= self.floor)
        lean = 1 if deficit >= 1 else -1 if deficit <= -1 else 0
        if secrets.randbelow(parts) < 1 + lean:  # 2/P, 0 or 1/P of the time
            return 0
        return 1 + secrets.randbelow(parts - 1)

    def cap(self, own: float, lift: float) -> float:
        """The highest best-pair cosine a fool kept on top may give a transmission whose image's own relation
        is `own`: `lift` above it, and never out of the image's band (below the floor: under the floor). An
        image on top lands at `own`; had fools on top landed in the bands above, the upper bands would name
        fools (images that high are rarely sent: the pool has no fool above them for the other side of the
        coin) and the lower ones images: at P = 2 the band 0.95-0.98 named its image 0.14 of the time."""
        edge = self.floor + BAND * (self._band(own) + 1) if own >= self.floor else self.floor
        return float(min(own + lift, edge))

    def _band(self, s0):
        """The level (band of BAND from the floor) of best-pair cosines."""
        return np.floor((np.asarray(s0) - self.floor) / BAND)

    def best_of_group(self) -> np.ndarray:
        out = np.zeros(len(self.ids))
        np.maximum.at(out, self.inv, self.best)
        return out

    def accept(self, chosen: np.ndarray, cands: np.ndarray, top: int | None, final: bool,
               strict: bool = True, cap: float | None = None, agree: bool | None = None) -> np.ndarray:
        """bool [c]: which candidate fools [c, K] may join `chosen` [j, K] (the image, then the fools picked so
        far). ``final``: the candidate completes the transmission; a partial one is not judged (P > 2).
        ``strict`` False (a transmission sent whatever the coin, SentGuard._typical): the coin `top` named
        with no margin (None: not asked), and no need that the pool could have served either side. ``cap``,
        ``agree`` (strict only): see ``fine``."""
        cands = unit(np.asarray(cands, np.float32).reshape(len(cands), -1)).astype(np.float64)
        chosen = np.asarray(chosen, np.float64)
        if len(self.ids) and not final and not strict and top == 0:
            # P > 2, the image asked for: a first fool that already outbids the image leaves no last fool
            # that could hand it back (at P = 3 the image was named too rarely on this path otherwise)
            return np.array([self.named(np.concatenate([chosen, c[None]])) == 0 for c in cands], dtype=bool)
        if not len(self.ids) or not final:
            return np.ones(len(cands), dtype=bool)
        if not strict:
            return np.array([self.fine(np.concatenate([chosen, c[None]]), top, 0.0, cap=cap)[0] for c in cands],
                            dtype=bool)
        ok = np.zeros(len(cands), dtype=bool)
        sides = np.zeros((len(cands), 2), dtype=bool)  # would pass with the coin on the image / on this fool
        for i in range(len(cands)):
            both = np.concatenate([chosen, cands[i:i + 1]])
            for k, side in enumerate((0, len(both) - 1)):
                sides[i, k] = self.fine(both, side, cap=cap, agree=agree)[0]
            ok[i] = sides[i, 0] if top == 0 else sides[i, 1] if top == len(both) - 1 else \
                self.fine(both, top, cap=cap, agree=agree)[0]
        if not (sides[:, 0].any() and sides[:, 1].any()):
            # send only when the pool could have served either side of the coin: otherwise which images get
            # sent would depend on the coin, and the sent ones would tell it
            ok[:] = False
        return ok

    def add(self, vectors: np.ndarray, group: int, top: int = 0) -> None:
        vectors = unit(np.asarray(vectors, np.float32).reshape(len(vectors), -1)).astype(np.float64)
        basis = orth(vectors)
        if len(self.ids):
            s0, u_past, _ = self._pairs(basis)
            for j in self._renamed(s0):  # their best pair is the new one now: record what it names (a kept coin
                rows = np.flatnonzero(self.inv == j)  # reads the same; a transmission sent without one may not)
                named, _ = self._names(self.q[j] @ u_past[j], self.v[rows])
                self.top[rows] = np.arange(len(rows)) == named
            self.best = np.maximum(self.best, s0[self.inv])
            own = float(s0.max())
        else:
            own = 0.0
        self.top = np.append(self.top, np.arange(len(vectors)) == top)
        self.v = np.concatenate([self.v.reshape(len(self.v), vectors.shape[1]), vectors])
        self.g = np.append(self.g, np.full(len(vectors), group))
        self.best = np.append(self.best, np.full(len(vectors), own))
        if len(self.ids) and self.q.shape[2] >= basis.shape[1]:
            pad = np.zeros((1,) + self.q.shape[1:])
            pad[0, :, :basis.shape[1]] = basis
            self.q = np.concatenate([self.q, pad])
            self.ids = np.append(self.ids, group)
            self.inv = np.append(self.inv, np.full(len(vectors), len(self.ids) - 1))
        else:
            self._bases()


# -- how related the device's own fools are: the floor above which an image stands out ------------------
FOOL_QUANTILE = 0.99  # an image nearer its best match than 99% of the fools sent are to theirs stands out
FOOL_COUNT = 50       # fewer fools sent: the fixed floor alone


def nearest(vectors: np.ndarray, groups: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """[n] per vector: its largest |cosine| with a vector of another transmission (unit rows)."""
    v = np.asarray(vectors, np.float32)
    g = np.asarray(groups)
    out = np.zeros(len(v), np.float32)
    for s in range(0, len(v), chunk):
        c = np.abs(v[s:s + chunk] @ v.T)
        c[g[s:s + chunk, None] == g[None, :]] = 0.0
        out[s:s + chunk] = c.max(1) if len(v) else 0.0
    return out


def raise_nearest(near: np.ndarray, old: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A new transmission `new` [p, K] joins `old` [n, K]: the raised nearest matches of the old vectors and
    the new vectors' own."""
    if not len(old):
        return near, np.zeros(len(new), np.float32)
    c = np.abs(np.asarray(old, np.float32) @ np.asarray(new, np.float32).T)
    return np.maximum(near, c.max(1)), c.max(0).astype(np.float32)


def fool_floor(near_of_fools: np.ndarray, floor: float, q: float = FOOL_QUANTILE) -> float:
    """The cosine above which an image's best match is unlike its fools': the q-quantile of how near the fools
    sent lie to their best matches (a stream of one distribution: images and fools alike), never below
    `floor`. Below it the image and its fools are exchangeable; above it the image stands out."""
    if len(near_of_fools) < FOOL_COUNT or q <= 0:
        return float(floor)
    return max(float(floor), float(np.quantile(near_of_fools, q)))
