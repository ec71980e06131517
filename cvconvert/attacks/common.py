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


def make_partners(rule: str, images: torch.Tensor, gen: torch.Generator, per: int = 8, chunk: int = 64):
    """The attacker's partners(idx, n, gen) for the deployment's fool rule (Kerckhoffs: it knows the rule,
    not the victim's pool). ``match``: for each of its own images, a set of itself and 63 others and ``per``
    partners drawn once from the set's pairing law (cvconvert/fools.py); calls pick one of them."""
    from ..device.fools import MATCH_SET, check_rule, match_law

    if check_rule(rule) == "random":
        return partners
    n = len(images)
    flat = images.flatten(1)
    table = torch.empty(n, per, dtype=torch.long)
    k = min(MATCH_SET, n)
    for i in range(0, n, chunk):
        idx = torch.arange(i, min(n, i + chunk))
        others = torch.stack([torch.randperm(n - 1, generator=gen)[:k - 1] for _ in idx])
        sets = torch.cat((idx[:, None], others + (others >= idx[:, None]).long()), 1)  # never the image twice
        law = torch.from_numpy(match_law(flat[sets].numpy()))[:, 0]
        table[idx] = sets.gather(1, torch.multinomial(law.float(), per, replacement=True, generator=gen))

    def match_partners(idx: torch.Tensor, n_: int, gen_: torch.Generator) -> torch.Tensor:
        return table[idx, torch.randint(per, (len(idx),), generator=gen_)]
    return match_partners


def uniform_angles(n: int, gen: torch.Generator) -> torch.Tensor:
    # The attacker's own simulated keys (not secret): a seeded generator is fine here.
    return torch.rand(n, generator=gen) * (2 * torch.pi)


def combiner(model):
    """x from (a, b [N, ...], theta) exactly as the public encoder forms it at the key its key law draws for
    that angle (the attacker reads the released code: with the exchange law the fool's sign follows theta);
    None for a law without an angle (Haar keys: the attacks then fall back to the paper's encode)."""
    law = model.spec.law
    if law.of_angle is None:
        return None

    def combine(a, b, theta):
        key = torch.from_numpy(law.of_angle(theta.detach().cpu().numpy())).to(a.device)
        return model.encoder.combine(a, b.unsqueeze(1), key)
    return combine
