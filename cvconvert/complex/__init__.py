"""Equivariant layers and helpers on the [N, P, ...] part layout (P = 2: the complex real-pair layout)."""

from .functional import (complex_pair, encode, encode_parts, modulus, modulus_sq, rotate, rotation_key, transform,
                         unrotate_real, untransform_first)
from .layers import (CAdaptiveAvgPool2d, CAvgPool2d, CBatchNorm, CConv2d, CDelta, CDropout, CFlatten,
                     CLinear, CMaxModPool2d)

__all__ = [
    "complex_pair", "encode", "encode_parts", "modulus", "modulus_sq", "rotate", "rotation_key", "transform",
    "unrotate_real", "untransform_first",
    "CAdaptiveAvgPool2d", "CAvgPool2d", "CBatchNorm", "CConv2d", "CDelta", "CDropout", "CFlatten",
    "CLinear", "CMaxModPool2d",
]
