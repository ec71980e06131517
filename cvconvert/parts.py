"""Keyed split networks for every P >= 2: the image's feature hidden among P-1 fools by an orthogonal key.

    device: x = Q [a; b_1; ...; b_{P-1}]          a = g(image), b_i = g(fool_i), Q [P, P] orthogonal, secret
    cloud:  h = Phi(x)                            Phi(Q F) = Q Phi(F) (the converted layers commute with Q)
    device: logits = d((Q^T h)[0])

How Q is drawn is the model's key law (cvconvert/device/keylaws.py): Haar on O(P) by default, so every
row of [a; b_1; ...] is equally likely to be the one the image sits in; for P = 2 the paper's angle is
the law Q = R(theta), and the exchange defense's Q = R(theta) diag(1, s). The graphs are the same for
every law: only the drawing differs.
"""

from __future__ import annotations

import torch
from torch import nn

from .complex.functional import encode_parts, untransform_first
from .device.keylaws import KeyLaw, draw_keys
from .errors import CvError

MAX_PARTS = 4


def check_parts(parts) -> int:
    """The number of parts as an int in 2..MAX_PARTS, or a one-line CvError."""
    try:
        p = int(parts)
    except (TypeError, ValueError):
        raise CvError(f"--parts must be an integer, got {parts!r}") from None
    if p != parts or not 2 <= p <= MAX_PARTS:
        raise CvError(f"--parts must be between 2 and {MAX_PARTS}, got {parts!r}")
    return p


def random_key(n: int, parts: int, law: KeyLaw, device=None) -> torch.Tensor:
    """n secret keys [n, P, P] drawn by `law` from the OS's CSPRNG."""
    return torch.from_numpy(draw_keys(law, n, parts)).to(device)


def derangement(n: int, device=None) -> torch.Tensor:
    """A random permutation with no fixed point (b must come from another sample)."""
    p = torch.randperm(n, device=device)
    out = torch.empty_like(p)
    out[p] = p.roll(1)
    return out


def fool_indices(n: int, count: int, law: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """[n, count] indices into a batch of n: each sample's `count` fools, distinct and never itself.

    law: an optional [n, n] pairing law (row i: how likely each sample is to be image i's fool, zero on
    the diagonal); uniform over the other samples without it. A batch too small for distinct fools
    repeats some (training only: the device never reuses a fool).
    """
    if n < 2:
        return torch.zeros(n, count, dtype=torch.long, device=device)
    if law is None and count == 1:  # one fool each: a derangement, exact and cheaper than sampling rows
        return derangement(n, device)[:, None]
    off = torch.ones(n, n) - torch.eye(n)
    w = law.detach().float().cpu() * off if law is not None else off
    w = w + 1e-12 * off  # every row keeps some weight off the diagonal
    return torch.multinomial(w, count, replacement=n - 1 < count).to(device)


class KeyedEncoder(nn.Module):
    """(image [N,C,H,W], fool [N,P-1,C,H,W], key [N,P,P]) -> x = key @ [g(image); g(fool_1); ...]."""

    def __init__(self, features: nn.Module, parts: int):
        super().__init__()
        self.features, self.parts = features, parts

    def combine(self, a, b, key):
        """x from the features a [N, ...] (image) and b [N, P-1, ...] (fools): forward after g."""
        return encode_parts(a, b, key)

    def forward(self, image, fool, key):
        # One run of g over [image; fool_1; ...; fool_{P-1}] stacked part-major on the batch axis.
        stacked = torch.cat((image.unsqueeze(0), fool.transpose(0, 1)), 0).flatten(0, 1)
        f = self.features(stacked).unflatten(0, (self.parts, -1))  # [P, N, C', H', W']
        return self.combine(f[0], f[1:].transpose(0, 1), key)


class KeyedDecoder(nn.Module):
    """(h [N,P,...], key [N,P,P]) -> logits = d((key^T h)[0])."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, h, key):
        return self.decoder(untransform_first(h, key))
