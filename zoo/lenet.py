"""LeNet-5 (LeCun et al. 1998) with max pooling, for 32x32 inputs (28x28 works too)."""

from __future__ import annotations

import torch
from torch import nn

from cvconvert.archs import register_model


class LeNet(nn.Module):
    def __init__(self, num_classes=10, input_shape=(3, 32, 32)):
        super().__init__()
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, 6, 5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        if fh < 1 or fw < 1:
            raise ValueError(f"LeNet needs inputs of at least 16x16, got {h}x{w}")
        self.fc1 = nn.Linear(16 * fh * fw, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(self.relu4(self.fc2(self.relu3(self.fc1(x)))))


@register_model(splits={"paper": ("conv1", None)}, default_split="paper", activation=("channel", 1.0))
def lenet(num_classes: int = 10, input_shape=(3, 32, 32)):
    """LeNet-5; paper split: encoder = conv1 + GAN, decoder = softmax only"""
    return LeNet(num_classes, tuple(input_shape))
