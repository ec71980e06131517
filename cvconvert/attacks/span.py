"""The multi-query attack: intersecting the spans of transmissions, and testing public features for
membership in a span. No learning, no key.

A transmission x = e^{i theta}(a + i s b) has Re(x) and Im(x) in span{a, b}. A cloud that keeps every x
it receives compares them all:

- Two transmissions that carry one feature vector (a reused fool, an image sent twice, an image that is
  another's fool) have 2-D spans that meet in exactly that vector. With orthonormal bases Q_s, Q_t of the
  two spans, the SVD of Q_s^T Q_t gives the cosines of the principal angles; the first is 1 when the
  spans share a vector, and its principal vectors Q_s U[:, 0] = Q_t V[:, 0] are that vector. Near-copies
  (a photo sent twice after re-encoding) give a cosine just below 1 and a vector just as close.
- A fool taken from data the attacker also holds lies in span(x): the attacker computes the public
  encoder's feature of each public image and keeps those whose projection onto span(x) loses (almost)
  nothing.

Once one vector u of span(x) is known, the rest follows in closed form: with u = al Re(x) + be Im(x) and
(al, be) scaled to unit length, al Re(x) + be Im(x) is the shared vector and be Re(x) - al Im(x) the
other one, both at their true scale (up to a common sign), and the angle is atan2(be, al) modulo pi when
u is the image. So a transmission that shares one vector gives away both, and the other's angle.

Everything is batched matrix algebra (torch, float64): all pairs of T transmissions come from one
[2T, 2T] Gram matrix and T^2 / 2 SVDs of 2x2 blocks; the membership test is one [M, D] x [D, 2T] product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DETECT = 0.995   # the attacker keeps pairs whose first principal cosine reaches this (near-copies included)
EXACT = 0.999    # |cos| with the true feature at which an image counts as exposed exactly
CHUNK = 4096     # pairs (or public features) per batched step: bounds memory for thousands of them


def bases(x: torch.Tensor) -> torch.Tensor:
    """x [T, P, ...] -> orthonormal bases [T, D, P] of the span of its P parts (span{Re(x), Im(x)} for
    P = 2; float64)."""
    flat = x.reshape(len(x), x.shape[1], -1).to(torch.float64).transpose(1, 2)  # [T, D, P]
    q, _ = torch.linalg.qr(flat)
    return q


@dataclass
class Recovery:
    """What the attacker recovered: candidate vectors at true scale (up to sign) and where they came from."""
    vectors: torch.Tensor      # [K, D] float64
    owner: torch.Tensor        # [K] the transmission each vector was read from
    role: torch.Tensor         # [K] 0: the shared (or public) vector, 1: the other one (its completion)
    partner: torch.Tensor      # [K] the other transmission of the pair (-1: a public image)
    cosine: torch.Tensor       # [K] the pair's first principal cosine (or the public feature's)
    angle: torch.Tensor        # [K] the angle if this vector is the image (mod pi: the sign is unknown)
    read: torch.Tensor         # [K] which reading each vector belongs to (a shared vector and its completion)

    def __len__(self) -> int:
        return len(self.owner)


def _empty(d: int) -> Recovery:
    z = torch.zeros(0, dtype=torch.long)
    return Recovery(torch.zeros(0, d, dtype=torch.float64), z, z, z, torch.zeros(0, dtype=torch.float64),
                    torch.zeros(0, dtype=torch.float64), z)


def split(x: torch.Tensor, t: torch.Tensor, u: torch.Tensor):
    """For transmissions t and unit vectors u [K, D] in their spans: (shared, other, angle_shared,
    angle_other), the two vectors at true scale and the angle each would give if it were the image."""
    re = x[t, 0].reshape(len(t), -1).to(torch.float64)
    im = x[t, 1].reshape(len(t), -1).to(torch.float64)
    basis = torch.stack((re, im), 2)                                          # [K, D, 2]
    coef = torch.linalg.lstsq(basis, u.unsqueeze(2)).solution.squeeze(2)      # u = al Re + be Im
    coef = coef / coef.norm(dim=1, keepdim=True).clamp_min(1e-300)
    al, be = coef[:, :1], coef[:, 1:]
    shared, other = al * re + be * im, be * re - al * im
    # image = cos t Re + sin t Im: as the shared vector (cos, sin) = (al, be); as the other, (be, -al)
    return shared, other, torch.atan2(be, al).squeeze(1), torch.atan2(-al, be).squeeze(1)


def _recovery(x, t, u, partner, cos) -> Recovery:
    shared, other, ang_s, ang_o = split(x, t, u)
    two = lambda a, b: torch.cat((a, b))  # noqa: E731
    reads = torch.arange(len(t))
    return Recovery(two(shared, other), two(t, t), two(torch.zeros_like(t), torch.ones_like(t)),
                    two(partner, partner), two(cos, cos), two(ang_s, ang_o), two(reads, reads))


def intersect(x: torch.Tensor, detect: float = DETECT) -> Recovery:
    """Every pair of transmissions whose spans (nearly) meet: the vector read from each side, and its
    completion in that transmission."""
    q = bases(x)
    t_all = len(q)
    if t_all < 2:
        return _empty(q.shape[1])
    flat = q.transpose(1, 2).reshape(2 * t_all, -1)                           # [2T, D]
    gram = (flat @ flat.T).reshape(t_all, 2, t_all, 2).permute(0, 2, 1, 3)   # [T, T, 2, 2] = Q_s^T Q_t
    s_idx, t_idx = torch.triu_indices(t_all, t_all, 1)
    keep_s, keep_t, vec_s, vec_t, cosines = [], [], [], [], []
    for i in range(0, len(s_idx), CHUNK):
        s, t = s_idx[i:i + CHUNK], t_idx[i:i + CHUNK]
        sv = torch.linalg.svdvals(gram[s, t])[:, 0]
        hit = sv >= detect
        if not hit.any():
            continue
        s, t = s[hit], t[hit]
        u_mat, sig, vh = torch.linalg.svd(gram[s, t])
        keep_s.append(s), keep_t.append(t), cosines.append(sig[:, 0])
        vec_s.append(torch.einsum("kdj,kj->kd", q[s], u_mat[:, :, 0]))      # Q_s U[:, 0]
        vec_t.append(torch.einsum("kdj,kj->kd", q[t], vh[:, 0, :]))         # Q_t V[:, 0]
    if not keep_s:
        return _empty(q.shape[1])
    s, t, cos = torch.cat(keep_s), torch.cat(keep_t), torch.cat(cosines)
    return _recovery(x, torch.cat((s, t)), torch.cat((torch.cat(vec_s), torch.cat(vec_t))), torch.cat((t, s)),
                     torch.cat((cos, cos)))


def members(x: torch.Tensor, public: torch.Tensor, detect: float = EXACT) -> Recovery:
    """Public features [M, ...] that lie in some span(x_t): |cos| between the feature and its projection
    onto the span >= detect. Each hit is read as that transmission's shared vector."""
    q = bases(x)
    t_all = len(q)
    if not len(public) or not t_all:
        return _empty(q.shape[1])
    flat = q.transpose(1, 2).reshape(2 * t_all, -1)
    hits_t, hits_p, cosines = [], [], []
    for i in range(0, len(public), CHUNK):
        p = public[i:i + CHUNK].reshape(min(CHUNK, len(public) - i), -1).to(torch.float64)
        p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-300)
        proj = (p @ flat.T).reshape(len(p), t_all, 2)                         # coordinates in each basis
        cos = proj.norm(dim=2)                                                # [M, T]
        j, t = torch.nonzero(cos >= detect, as_tuple=True)
        hits_t.append(t), hits_p.append(j + i), cosines.append(cos[j, t])
    t, j, cos = torch.cat(hits_t), torch.cat(hits_p), torch.cat(cosines)
    if not len(t):
        return _empty(q.shape[1])
    u = torch.einsum("kdj,kj->kd", q[t], _coords(q, t, public, j))       # the projection onto span(x_t)
    u = u / u.norm(dim=1, keepdim=True)
    return _recovery(x, t, u, torch.full_like(t, -1), cos)


def _coords(q, t, public, j):
    """Coordinates of public feature j in the basis of transmission t, for each hit: [K, 2]."""
    p = public[j].reshape(len(j), -1).to(torch.float64)
    return torch.einsum("kdj,kd->kj", q[t], p)


def merge(*parts: Recovery) -> Recovery:
    offsets = [0]
    for p in parts[:-1]:
        offsets.append(offsets[-1] + (int(p.read.max()) + 1 if len(p) else 0))
    out = {f: torch.cat([getattr(p, f) for p in parts]) for f in
           ("vectors", "owner", "role", "partner", "cosine", "angle")}
    return Recovery(**out, read=torch.cat([p.read + o for p, o in zip(parts, offsets)]))


def best_match(rec: Recovery, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each true feature [n, ...]: the largest |cos| with any recovered vector, and that vector's index
    (-1 when nothing was recovered)."""
    n = len(truth)
    if not len(rec):
        return torch.zeros(n, dtype=torch.float64), torch.full((n,), -1, dtype=torch.long)
    a = truth.reshape(n, -1).to(torch.float64)
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-300)
    v = rec.vectors / rec.vectors.norm(dim=1, keepdim=True).clamp_min(1e-300)
    best, idx = [], []
    for i in range(0, len(v), CHUNK):
        c = (a @ v[i:i + CHUNK].T).abs()
        m, k = c.max(1)
        best.append(m), idx.append(k + i)
    best, idx = torch.stack(best, 1), torch.stack(idx, 1)
    m, k = best.max(1)
    return m, idx.gather(1, k[:, None]).squeeze(1)


def recurring(rec: Recovery, exact: float = EXACT) -> torch.Tensor:
    """bool [K]: whether each recovered vector also turns up in another transmission (or is public)."""
    if not len(rec):
        return torch.zeros(0, dtype=torch.bool)
    v = rec.vectors / rec.vectors.norm(dim=1, keepdim=True).clamp_min(1e-300)
    out = torch.zeros(len(v), dtype=torch.bool)
    for i in range(0, len(v), CHUNK):
        c = (v[i:i + CHUNK] @ v.T).abs() >= exact
        c &= rec.owner[i:i + CHUNK, None] != rec.owner[None, :]
        out[i:i + CHUNK] = c.any(1)
    return out | (rec.partner == -1) & (rec.role == 0)
