"""Any torchvision classification model, built without weights (no hub access at run time)."""

from __future__ import annotations

import torchvision

from ._adapt import replace_first_conv


def torchvision_model(name: str, num_classes: int, input_shape):
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    return replace_first_conv(model, input_shape[0])
