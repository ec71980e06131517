"""The paper's GAN parts (Appendix B): a residual generator after the encoder and a scalar critic."""

from __future__ import annotations

import torch
from torch import nn


class _ResBlock(nn.Module):
    def __init__(self, ch, norm: bool, act):
        super().__init__()
        layers = [nn.Conv2d(ch, ch, 3, 1, 1, bias=not norm)]
        layers += [nn.BatchNorm2d(ch)] if norm else []
        layers += [act(), nn.Conv2d(ch, ch, 3, 1, 1, bias=not norm)]
        layers += [nn.BatchNorm2d(ch)] if norm else []
        self.body, self.act = nn.Sequential(*layers), act()

    def forward(self, x):
        return self.act(x + self.body(x))


class Generator(nn.Module):
    """Input conv, one residual block, output conv (four convs); output has the input's size.

    The output conv has no activation, so the feature a = g(I) may take both signs: non-negative
    features would give the phase away (of the readings (a, b), (-b, a), (-a, -b), (b, -a) of a rotated
    x, only the one with a >= 0 would look natural; see cvconvert/defense.py).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.inp = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.block = _ResBlock(channels, True, nn.ReLU)
        self.out = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, a):
        return self.out(self.block(self.inp(a)))


class Discriminator(nn.Module):
    """Same family as the generator, scalar output; no batch-norm so a gradient penalty is well defined."""

    def __init__(self, channels: int, width: int | None = None):
        super().__init__()
        w = width or max(16, min(64, channels))
        act = lambda: nn.LeakyReLU(0.2)  # noqa: E731
        self.inp = nn.Sequential(nn.Conv2d(channels, w, 3, 2, 1), act())
        self.block = _ResBlock(w, False, act)
        self.out = nn.Sequential(nn.Conv2d(w, w, 3, 2, 1), act(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, 1))

    def forward(self, a):
        return self.out(self.block(self.inp(a))).squeeze(1)


class NoiseInjection(nn.Module):
    """Noisy-DNN baseline: a + gamma * eps, eps Gaussian scaled to a's mean magnitude per sample."""

    def __init__(self, gamma: float):
        super().__init__()
        self.gamma = float(gamma)

    def forward(self, a):
        eps = torch.randn_like(a)
        dims = tuple(range(1, a.dim()))
        scale = a.abs().mean(dim=dims, keepdim=True) / (eps.abs().mean(dim=dims, keepdim=True) + 1e-12)
        return a + self.gamma * eps * scale
