"""What the attacks share: batched no-grad inference, input standardisation, random partners."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def batched(fn, *tensors, batch_size: int = 256, device=None, out_device="cpu"):
    """fn over minibatches of the given tensors (moved to `device`), concatenated on `out_device`."""
    n = tensors[0].shape[0]
    outs = []
    for i in range(0, n, batch_size):
        args = [t[i:i + batch_size].to(device) if device is not None else t[i:i + batch_size] for t in tensors]
        outs.append(fn(*args).to(out_device))
    return torch.cat(outs, 0) if outs else torch.empty(0)


class Standardize(nn.Module):
    """Per-channel (x - mean) / std with constants from the attacker's training inputs: features of
    different models differ in scale by orders of magnitude, and an attacker would normalise too."""

    def __init__(self, sample: torch.Tensor):
        super().__init__()
        dims = [0] + list(range(2, sample.dim()))
        shape = [1, -1] + [1] * (sample.dim() - 2)
        self.register_buffer("mean", sample.float().mean(dims).reshape(shape))
        self.register_buffer("std", sample.float().std(dims).clamp_min(1e-6).reshape(shape))

    def forward(self, z):
        return (z - self.mean) / self.std


def partners(idx: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """A random other item for each index (the attacker's simulated fooling counterpart)."""
    off = torch.randint(1, max(2, n), (len(idx),), generator=gen)
    return (idx + off) % n


def uniform_angles(n: int, gen: torch.Generator) -> torch.Tensor:
    # The attacker's own simulated keys (not secret): a seeded generator is fine here.
    return torch.rand(n, generator=gen) * (2 * torch.pi)


def combiner(model):
    """x from (a, b, theta) exactly as the public encoder forms it (the attacker reads the released code:
    with fool_sign="quadrant" the fool's sign follows theta), falling back to the paper's encode."""
    from ..complex.functional import encode
    return getattr(model.encoder, "combine", encode)
