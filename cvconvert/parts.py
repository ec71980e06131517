"""P-part split networks (P > 2): the image's feature hidden among P-1 fools by an orthogonal key.

    device: x = Q [a; b_1; ...; b_{P-1}]          a = g(image), b_i = g(fool_i), Q [P, P] Haar, secret
    cloud:  h = Phi(x)                            Phi(Q F) = Q Phi(F) (the same converted layers as P = 2)
    device: logits = d((Q^T h)[0])

Q is drawn uniformly from the orthogonal group (reflections included), fresh per image, so every row of
[a; b_1; ...] is equally likely to be the one the image sits in: an attacker cannot name the image more
often than 1/P. P = 2 is the complex model with its angle theta (see cvconvert/model.py) and is not
built here.
"""

from __future__ import annotations

import torch
from torch import nn

from .complex.functional import encode_parts, untransform_first
from .errors import CvError
from .device.keys import haar_orthogonal

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


def random_key(n: int, parts: int, device=None) -> torch.Tensor:
    """n secret keys [n, P, P], Haar on the orthogonal group, from the OS's CSPRNG."""
    return torch.from_numpy(haar_orthogonal(n, parts)).to(device)


def fool_indices(n: int, count: int, law: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """[n, count] indices into a batch of n: each sample's `count` fools, distinct and never itself.

    law: an optional [n, n] pairing law (row i: how likely each sample is to be image i's fool, zero on
    the diagonal); uniform over the other samples without it. A batch too small for distinct fools
    repeats some (training only: the device never reuses a fool).
    """
    if n < 2:
        return torch.zeros(n, count, dtype=torch.long, device=device)
    off = torch.ones(n, n) - torch.eye(n)
    w = law.detach().float().cpu() * off if law is not None else off
    w = w + 1e-12 * off  # every row keeps some weight off the diagonal
    return torch.multinomial(w, count, replacement=n - 1 < count).to(device)


class PartsEncoder(nn.Module):
    """(image [N,C,H,W], fool [N,P-1,C,H,W], key [N,P,P]) -> x = key @ [g(image); g(fool_1); ...]."""

    def __init__(self, features: nn.Module, parts: int):
        super().__init__()
        self.features, self.parts = features, parts
        self.fool_sign = "none"  # the angle defenses do not apply: a Haar key already mixes every row

    def combine(self, a, b, key):
        """x from the features a [N, ...] (image) and b [N, P-1, ...] (fools): forward after g."""
        return encode_parts(a, b, key)

    def forward(self, image, fool, key):
        # One run of g over [image; fool_1; ...; fool_{P-1}] stacked part-major on the batch axis.
        stacked = torch.cat((image.unsqueeze(0), fool.transpose(0, 1)), 0).flatten(0, 1)
        f = self.features(stacked).unflatten(0, (self.parts, -1))  # [P, N, C', H', W']
        return self.combine(f[0], f[1:].transpose(0, 1), key)


class PartsDecoder(nn.Module):
    """(h [N,P,...], key [N,P,P]) -> logits = d((key^T h)[0])."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, h, key):
        return self.decoder(untransform_first(h, key))
