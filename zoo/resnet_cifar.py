"""CIFAR ResNet-20/32/44/56/110 (He et al. 2016, Sec. 4.2) with option-A (zero-pad) shortcuts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cvconvert.archs import register_model
from cvconvert.convert import register_complex


class ShortcutA(nn.Module):
    """Option A: subsample by 2 and pad the new channels with zeros (no parameters)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x[..., ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class CShortcutA(nn.Module):
    """Its complex twin: the same subsampling and zero channels (linear, so rotation-equivariant)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    @classmethod
    def from_real(cls, shortcut: ShortcutA, **_):
        return cls(shortcut.pad)

    def forward(self, x):
        # Channel axis is -3 in both layouts; F.pad pads (W, H, C) from the last axis backwards.
        return F.pad(x[..., ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


# The converter sees the shortcut as one layer and turns it into its complex twin (same padding).
register_complex(ShortcutA, CShortcutA, leaf=True)


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = ShortcutA(planes // 4) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("CIFAR ResNet depth must be 6n + 2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        self.layer1 = self._make(16, n, 1)
        self.layer2 = self._make(32, n, 2)
        self.layer3 = self._make(64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make(self, planes, n, stride):
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet_splits(depth: int):
    n = (depth - 2) // 6
    # alpha: the GAN gets the output of the layer before the first 16x16 map (layer1); the decoder is
    # what follows the first 8x8 block (layer3.1 on). beta: the decoder is the last residual block on.
    return {"alpha": ("layer1", "layer3.1"), "beta": ("layer1", f"layer3.{n - 1}")}


def _make_entry(depth: int):
    def fn(num_classes: int = 10, input_shape=(3, 32, 32)):
        return CifarResNet(depth, num_classes, input_shape[0])
    fn.__name__ = f"resnet{depth}"
    fn.__doc__ = f"CIFAR ResNet-{depth} (option-A shortcuts), He et al. 2016"
    return register_model(splits=_resnet_splits(depth), default_split="alpha", activation=("fixed", 1.0))(fn)


resnet20, resnet32, resnet44, resnet56, resnet110 = (_make_entry(d) for d in (20, 32, 44, 56, 110))
