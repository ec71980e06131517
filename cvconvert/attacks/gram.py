"""Key-free attacks on P-part transmissions: what x = Q F keeps whatever the orthogonal key Q is.

x^T x = F^T Q^T Q F = F^T F, so per pixel the norm over the parts of each channel, |x_j|, and the dot
products over the parts of channel pairs, sum_p x_pj x_pk, are the same for every key. (The P x P Gram
x x^T = Q F F^T Q^T is not, but its eigenvalues are: ``spectra`` gives them per channel.) For P = 2 these
are the complex model's |x_k| and Re(x_j conj x_k); Im(x_j conj x_k) is only invariant under rotations,
not reflections, and a Haar key includes reflections.

``GramInverter``: a U-Net from these invariants of the attacker's own simulated x to the image.
"""

from __future__ import annotations

import torch

from .base import ReconstructionAttack
from .common import batched
from .invariant import channel_pairs


def gram_features(x: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """x [N, P, C, ...] -> [N, C + len(pairs), ...]: |x_j| over the parts, then sum_p x_pj x_pk."""
    j, k = pairs[:, 0].to(x.device), pairs[:, 1].to(x.device)
    norms = x.pow(2).sum(1).clamp_min(0).sqrt()
    return torch.cat((norms, (x[:, :, j] * x[:, :, k]).sum(1)), 1)


def spectra(x: torch.Tensor) -> torch.Tensor:
    """x [N, P, C, ...] -> [N, C, P]: the eigenvalues (ascending) of each channel's P x P Gram x_c x_c^T."""
    xc = x.flatten(3).transpose(1, 2)                       # [N, C, P, HW]
    return torch.linalg.eigvalsh(xc.double() @ xc.double().transpose(-1, -2)).float()


class GramInverter(ReconstructionAttack):
    """A U-Net from the key-free features of the attacker's own simulated x to the image."""
    id, label = "gram_inversion", "key-free: dec(|x_j|, sum_p x_pj x_pk)"
    stage = "key-free (Gram) attacks"

    def __init__(self, parts: int):
        super().__init__()
        self.parts = parts

    def _fit(self, public) -> None:
        from .inversion import train_unet
        from .rowsearch import simulate

        a_tr, images = public.tr["a"], public.tr["images"]
        self.pairs = channel_pairs(a_tr.shape[1])
        feat_fn = lambda idx, gen: gram_features(simulate(public, idx, self.parts, gen)[0], self.pairs)  # noqa: E731
        sample = feat_fn(torch.arange(min(1024, len(images))), torch.Generator().manual_seed(public.seed + 4))
        self.net, hist = train_unet(public, f"parts{self.parts}_gram_inversion", feat_fn, len(images), sample, images)
        self.history = {f"Gram U-Net, P={self.parts} L1 (train)": hist}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The key-free features the U-Net (and the Gram class probe) read."""
        return batched(lambda xb: gram_features(xb, self.pairs), x, device=self.public.device)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        from .inversion import decode
        return decode(self.public, self.net, self.features(x))
