"""Rotation-equivariant layers and helpers on the [N, 2, ...] real-pair layout."""

from .functional import complex_pair, encode, modulus, modulus_sq, rotate, unrotate_real
from .layers import (CAdaptiveAvgPool2d, CAvgPool2d, CBatchNorm, CConv2d, CDelta, CDropout, CFlatten,
                     CLinear, CMaxModPool2d, CShortcutA)

__all__ = [
    "complex_pair", "encode", "modulus", "modulus_sq", "rotate", "unrotate_real",
    "CAdaptiveAvgPool2d", "CAvgPool2d", "CBatchNorm", "CConv2d", "CDelta", "CDropout", "CFlatten",
    "CLinear", "CMaxModPool2d", "CShortcutA",
]
