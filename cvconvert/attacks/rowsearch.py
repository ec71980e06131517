"""The attacker's view of a P-part transmission and its best rotation search.

A P-part device sends x = Q F with F = [a; b_1; ...; b_{P-1}] (the image's feature a, P-1 fools'
features) and Q a secret Haar orthogonal P x P key. Any orthogonal R gives P candidate rows R x; the
attacker wants R = Q^T (up to the rows' order and signs), where every row is a natural feature.

``simulate`` builds the attacker's own transmissions (its images, fools drawn by the deployment's rule
from its own images, its own Haar keys from a seeded generator: these keys are not secret).
``RowSearch`` trains a scorer D that tells a natural feature from any other unit mix v^T F of the rows,
then, for each x, searches R over O(P) by gradient ascent of sum_i log sigmoid D((R x)_i) from a few
random starts (R = R0 expm(A - A^T)), and finally gives each row the sign D prefers. When the fools are
natural features as well, the best R finds the P features but not which one is the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..gan import Discriminator
from .base import Memo, _FitsOnPublic
from .common import Standardize, uniform_angles

STARTS = 3        # random starts of the search per transmission
STEPS = 40        # gradient steps per start
CHUNK = 64        # transmissions searched at once


def haar(n: int, p: int, gen: torch.Generator) -> torch.Tensor:
    """n Haar orthogonal [p, p] matrices from a seeded generator (the attacker's own simulated keys):
    QR of a Gaussian matrix with the sign of R's diagonal moved into Q."""
    q, r = torch.linalg.qr(torch.randn(n, p, p, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r, dim1=1, dim2=2)).unsqueeze(1)).float()


def fool_rows(public, idx: torch.Tensor, count: int, gen: torch.Generator, bank=None) -> torch.Tensor:
    """[n, count, ...]: each item's `count` fools' features, drawn by the deployment's rule from the
    attacker's own features (or from ``bank``, any other set of features)."""
    a = public.tr["a"] if bank is None else bank
    own = bank is None
    picks = [public.partners(idx, len(a), gen) if own else torch.randint(len(a), (len(idx),), generator=gen)
             for _ in range(count)]
    return torch.stack([a[p] for p in picks], 1)


def key_matrix(combine, theta: torch.Tensor) -> torch.Tensor:
    """The [N, 2, 2] orthogonal K with combine(a, b, theta) = K [a; b] for a two-part encoder (combine is
    linear in a and b: its columns are the images of [1; 0] and [0; 1]), e.g. a rotation, or with the
    exchange defense a rotation times diag(1, +-1)."""
    one, zero = torch.ones(len(theta), 1), torch.zeros(len(theta), 1)
    return torch.stack((combine(one, zero, theta), combine(zero, one, theta)), 2).squeeze(-1)


def simulate(public, idx: torch.Tensor, parts: int, gen: torch.Generator, bank=None):
    """(x, F, Q) for the attacker's images idx: F = [a; b_1; ...] [n, P, ...], x = Q F with Q drawn by the
    deployment's key law (Haar; for an angle law, the public encoder's key at uniform angles)."""
    f = torch.cat((public.tr["a"][idx].unsqueeze(1), fool_rows(public, idx, parts - 1, gen, bank)), 1)
    q = haar(len(idx), parts, gen) if public.combine is None else key_matrix(public.combine, uniform_angles(len(idx), gen))
    return torch.matmul(q, f.flatten(2)).reshape(f.shape), f, q


def rows(r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The candidates R x: r [N, P, P], x [N, P, ...] -> [N, P, ...]."""
    return torch.matmul(r, x.flatten(2)).reshape(x.shape)


def cosines(cand: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """|cos| between each candidate row [N, P, ...] and the image's feature a [N, ...]: [N, P]."""
    c, v = cand.flatten(2), a.flatten(1).unsqueeze(1)
    return ((c * v).sum(-1) / (c.norm(dim=-1) * v.norm(dim=-1)).clamp_min(1e-12)).abs()


def mixes(f: torch.Tensor, gen: torch.Generator, margin: float = 0.9) -> torch.Tensor:
    """Random unit mixes v^T F [n, ...] of the rows, none within acos(margin) of a single row (or its
    negative): the scorer's negatives."""
    n, p = f.shape[:2]
    v = torch.randn(n, p, generator=gen)
    v = v / v.norm(dim=1, keepdim=True)
    peak = v.abs().max(1).values
    # Shrink the largest coordinate until no single row dominates (keeps v a unit vector).
    over = peak > margin
    if over.any():
        i = v.abs().argmax(1)
        rest = (1 - margin ** 2) ** 0.5 / (1 - peak ** 2).clamp_min(1e-9).sqrt()
        v = torch.where(over[:, None], v * rest[:, None], v)
        v[over, i[over]] = torch.sign(v[over, i[over]]) * margin
    return torch.einsum("np,np...->n...", v, f)


def train_scorer(public, parts: int):
    """D: a natural feature (positive) against negated features and unit mixes of P features."""
    a_tr = public.tr["a"]
    n = len(a_tr)
    net = torch.nn.Sequential(Standardize(a_tr[:1024]), Discriminator(a_tr.shape[1]))

    def batch_fn(idx, gen):
        _, f, _ = simulate(public, idx, parts, gen)
        k = len(idx) // 4
        neg = torch.cat((mixes(f, gen), -a_tr[idx[:k]]))
        inp = torch.cat((a_tr[idx], neg)).to(public.device)
        return inp, torch.cat((torch.ones(len(idx)), torch.zeros(len(neg)))).to(public.device)

    hist = public.trainer.fit(f"parts{parts}_row_scorer", net, n, batch_fn, F.binary_cross_entropy_with_logits,
                              epochs=public.budget.epochs("dprime"), batch_size=64)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval(), hist


def _objective(net, cand: torch.Tensor) -> torch.Tensor:
    """sum over rows of log sigmoid D(row): [B, P, ...] -> [B]."""
    b, p = cand.shape[:2]
    return F.logsigmoid(net(cand.flatten(0, 1))).reshape(b, p).sum(1)


def search(net, x: torch.Tensor, gen: torch.Generator, device) -> torch.Tensor:
    """R_hat [N, P, P] (an estimate of Q^T, rows in some order, signs chosen by D) for every x."""
    out = []
    for i in range(0, len(x), CHUNK):
        xb = x[i:i + CHUNK].to(device)
        n, p = xb.shape[:2]
        rep = xb.repeat_interleave(STARTS, 0)
        r0 = haar(n * STARTS, p, gen).to(device)
        skew = torch.zeros(n * STARTS, p, p, device=device, requires_grad=True)
        opt = torch.optim.Adam([skew], lr=0.05)
        for _ in range(STEPS):
            r = torch.matmul(torch.linalg.matrix_exp(skew - skew.transpose(1, 2)), r0)
            loss = -_objective(net, rows(r, rep)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            r = torch.matmul(torch.linalg.matrix_exp(skew - skew.transpose(1, 2)), r0)
            best = _objective(net, rows(r, rep)).reshape(n, STARTS).argmax(1)
            r = r.reshape(n, STARTS, p, p)[torch.arange(n, device=device), best]
            out.append(_fix_signs(net, r, xb).cpu())
    return torch.cat(out)


@torch.no_grad()
def _fix_signs(net, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Flip each row of R to the sign D scores higher (a row's sign keeps R orthogonal)."""
    n, p = r.shape[:2]
    cand = rows(r, x)
    plus = net(cand.flatten(0, 1)).reshape(n, p)
    minus = net(-cand.flatten(0, 1)).reshape(n, p)
    return r * torch.where(plus >= minus, 1.0, -1.0).unsqueeze(-1)


def random_recovery(x: torch.Tensor, a: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The chance level of the search: max |cos| with a over the rows of a random R x, per transmission."""
    return cosines(rows(haar(len(x), x.shape[1], gen), x), a).max(1).values


class RowSearch(_FitsOnPublic):
    """The best rotation search as an attack: ``estimate(x)`` -> R_hat [N, P, P], computed once per x."""
    id, label, stage = "row_search", "best rotation search: max sum log D(rows of R x) over O(P)", "rotation search"

    def __init__(self, parts: int):
        super().__init__()
        self.parts, self._memo = parts, Memo()

    def _fit(self, public) -> None:
        self.net, hist = train_scorer(public, self.parts)
        self.history = {f"row scorer D, P={self.parts} (train)": hist}

    def estimate(self, x: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.public.seed + 21)
        return self._memo.get(x, lambda v: search(self.net, v, gen, self.public.device))

    def candidates(self, x: torch.Tensor) -> torch.Tensor:
        """The P candidate features R_hat x [N, P, ...]."""
        return rows(self.estimate(x), x)
