"""VGG-16 (Simonyan & Zisserman 2015), torchvision's definition; small inputs get a CIFAR-sized head."""

from __future__ import annotations

import torchvision
from torch import nn

from ._adapt import replace_first_conv
from cvconvert.archs import register_model


# Paper: all layers before the last 56x56 map (of 224) form the encoder -> through conv3_2 + ReLU;
# the decoder is the fully-connected head.
@register_model(splits={"paper": ("features.13", "classifier")}, default_split="paper", activation=("channel", 1.0))
def vgg16(num_classes: int = 10, input_shape=(3, 32, 32)):
    """VGG-16 (torchvision definition; 512-512 head below 64x64 inputs)"""
    c, h, w = input_shape
    if min(h, w) < 32:
        raise ValueError(f"VGG-16 needs inputs of at least 32x32, got {h}x{w}")
    model = replace_first_conv(torchvision.models.vgg16(weights=None, num_classes=num_classes), c)
    if min(h, w) < 64:
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(),
            nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(),
            nn.Linear(512, num_classes))
    return model
