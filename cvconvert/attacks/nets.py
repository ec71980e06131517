"""Attacker networks: the paper's U-Net inversion decoder and a small CNN classifier/regressor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _convs(cin: int, cout: int, n: int) -> nn.Sequential:
    layers = []
    for i in range(n):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """Paper Sec. 5.1: the feature is up-sampled to the input's size, then four down-sampling blocks
    (each halves the map) and four up-sampling blocks (each doubles it, with the U-Net skip), so the
    output has the input's size. The paper uses six convs per block; ``convs`` (1-2 here) keeps it
    trainable on a CPU."""

    def __init__(self, in_ch: int, out_shape, width: int = 16, convs: int = 1, base=None):
        super().__init__()
        self.out_shape = tuple(out_shape)
        # The output is a correction of the attacker's mean training image (in logit space), so an
        # untrained decoder starts at the constant-image chance level instead of grey.
        base = torch.zeros(self.out_shape) if base is None else torch.logit(base.float().clamp(0.02, 0.98))
        self.register_buffer("base", base.reshape(self.out_shape))
        widths = [min(width * 2 ** i, 4 * width) for i in range(5)]
        self.inp = _convs(in_ch, widths[0], convs)
        self.down = nn.ModuleList(_convs(widths[i], widths[i + 1], convs) for i in range(4))
        self.up = nn.ModuleList(_convs(widths[i + 1] + widths[i], widths[i], convs) for i in reversed(range(4)))
        self.out = nn.Conv2d(widths[0], out_shape[0], 1)

    def forward(self, f):
        _, h, w = self.out_shape
        ph, pw = -h % 16, -w % 16  # four halvings need a multiple of 16; pad, then crop back
        z = self.inp(F.interpolate(f, size=(h + ph, w + pw), mode="bilinear", align_corners=False))
        skips = []
        for block in self.down:
            skips.append(z)
            z = block(F.max_pool2d(z, 2))
        for block in self.up:
            s = skips.pop()
            z = block(torch.cat((F.interpolate(z, size=s.shape[-2:], mode="nearest"), s), 1))
        return torch.sigmoid(self.out(z)[..., :h, :w] + self.base)


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head: property classifiers, the angle regressor, probes."""

    def __init__(self, in_ch: int, n_out: int, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(w, 2 * w, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(2 * w, 4 * w, 3, 1, 1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, n_out)

    def forward(self, z):
        if z.dim() == 2:  # a flat feature (split after a linear layer): treat as a 1x1 map
            z = z[:, :, None, None]
        return self.head(self.body(z))
