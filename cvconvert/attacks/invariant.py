"""Adaptive attack with no angle at all: |x_k| and x_j conj(x_k) do not change when x is rotated,
so a network trained on them (on the attacker's own simulated x) is immune to any hidden key.

Re(x_j conj x_k) = a_j a_k + b_j b_k and Im(x_j conj x_k) = b_j a_k - a_j b_k, per pixel."""

from __future__ import annotations

import torch

from ..complex.functional import modulus
from .base import ReconstructionAttack
from .common import batched

MAX_PAIRS = 64


def channel_pairs(c: int) -> torch.Tensor:
    """All channel pairs j < k, or, for wide features, each channel with its next few neighbours."""
    pairs = [(j, k) for j in range(c) for k in range(j + 1, c)]
    if len(pairs) > MAX_PAIRS:
        d = max(1, MAX_PAIRS // c)
        pairs = [(j, (j + s) % c) for j in range(c) for s in range(1, d + 1)][:MAX_PAIRS]
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def invariants(x: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """x [N, 2, C, ...] -> [N, C + 2P, ...]: moduli, then Re and Im of x_j conj(x_k)."""
    re, im = x[:, 0], x[:, 1]
    j, k = pairs[:, 0].to(x.device), pairs[:, 1].to(x.device)
    cross_re = re[:, j] * re[:, k] + im[:, j] * im[:, k]
    cross_im = im[:, j] * re[:, k] - re[:, j] * im[:, k]
    return torch.cat((modulus(x), cross_re, cross_im), 1)


class InvariantInverter(ReconstructionAttack):
    """A U-Net from the invariants of the attacker's own simulated x to the image: no angle needed."""
    id, label = "invariant", "adaptive: dec(|x|, x_j conj x_k), no angle"
    stage = "inversion and invariant U-Nets"

    def _fit(self, public) -> None:
        from .inversion import simulate_x, train_unet

        a_tr, images = public.tr["a"], public.tr["images"]
        self.pairs = channel_pairs(a_tr.shape[1])
        inv_fn = lambda idx, gen: invariants(simulate_x(public, idx, gen), self.pairs)  # noqa: E731
        sample = inv_fn(torch.arange(min(1024, len(images))), torch.Generator().manual_seed(public.seed + 4))
        self.net, hist = train_unet(public, "invariant_inversion", inv_fn, len(images), sample, images)
        self.history = {"invariant U-Net L1 (train)": hist}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The invariants the U-Net (and the invariant property probe) read."""
        return batched(lambda xb: invariants(xb, self.pairs), x, device=self.public.device)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        from .inversion import decode
        return decode(self.public, self.net, self.features(x))
