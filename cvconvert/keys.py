"""Secret angles for the device side. Torch-free: the ONNX Runtime inference path imports it too."""

from __future__ import annotations

import math
import os

import numpy as np


def secure_angles(n: int) -> np.ndarray:
    """n angles uniform in [0, 2 pi) from the OS's CSPRNG (os.urandom), never a seeded generator."""
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)  # 53 random bits each
    return (raw.astype(np.float64) * (2 * math.pi / 2.0 ** 53)).astype(np.float32)
