"""AlexNet (Krizhevsky et al. 2012), torchvision's definition; small inputs get a 5x5 stride-1 stem."""

from __future__ import annotations

import torchvision
from torch import nn

from ._adapt import replace_first_conv
from cvconvert.archs import register_model


# Paper: the output of the first three conv layers feeds the GAN; the decoder is the FC head.
@register_model(splits={"paper": ("features.7", "classifier")}, default_split="paper", activation=("channel", 1.0))
def alexnet(num_classes: int = 10, input_shape=(3, 32, 32)):
    """AlexNet (torchvision definition; 5x5 stem and 1024-512 head below 64x64 inputs)"""
    c, h, w = input_shape
    model = torchvision.models.alexnet(weights=None, num_classes=num_classes)
    if min(h, w) < 64:
        replace_first_conv(model, c, kernel_size=5, stride=1, padding=2)
        model.avgpool = nn.AdaptiveAvgPool2d(2)
        model.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(256 * 4, 512), nn.ReLU(True),
            nn.Dropout(), nn.Linear(512, 512), nn.ReLU(True),
            nn.Linear(512, num_classes))
    else:
        replace_first_conv(model, c)
    return model
