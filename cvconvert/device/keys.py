"""Secret randomness for the device side: angles, normals and Haar orthogonal matrices (keylaws.py draws keys with them).

Torch-free: the ONNX Runtime inference path imports it too. Every draw comes from the OS's CSPRNG
(os.urandom), never from a seeded generator.
"""

from __future__ import annotations

import math
import os

import numpy as np



def _bits53(n: int) -> np.ndarray:
    """n integers uniform in [0, 2^53) (float64's mantissa) from os.urandom."""
    return np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)


def secure_angles(n: int) -> np.ndarray:
    """n angles uniform in [0, 2 pi) from the OS's CSPRNG (os.urandom), never a seeded generator."""
    return (_bits53(n).astype(np.float64) * (2 * math.pi / 2.0 ** 53)).astype(np.float32)


def secure_normal(n: int) -> np.ndarray:
    """n standard normal float64 values from os.urandom (Box-Muller on 53-bit uniforms)."""
    m = (n + 1) // 2
    u = _bits53(2 * m).astype(np.float64) / 2.0 ** 53
    r = np.sqrt(-2.0 * np.log1p(-u[:m]))  # 1 - u lies in (0, 1]: the log is finite
    t = 2 * math.pi * u[m:]
    return np.concatenate((r * np.cos(t), r * np.sin(t)))[:n]


def haar_orthogonal(n: int, p: int) -> np.ndarray:
    """n orthogonal p x p matrices [n, p, p] (float32), uniform (Haar) on O(p): reflections included.

    QR of a Gaussian matrix, then each column of Q times the sign of R's diagonal entry: without that
    fix the law depends on the QR routine's sign convention (LAPACK makes Q[0, 0] <= 0 always) and is
    not Haar (Mezzadri 2007, "How to generate random matrices from the classical compact groups").
    """
    if p < 2:
        raise ValueError("an orthogonal key needs at least 2 parts")
    g = secure_normal(n * p * p).reshape(n, p, p)
    q, r = np.linalg.qr(g)
    d = np.diagonal(r, axis1=1, axis2=2)
    q = q * np.where(d < 0, -1.0, 1.0)[:, None, :]
    return q.astype(np.float32)


def transform_np(x: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Q x on the part axis in numpy: x [N, P, ...], key [N, P, P] -> [N, P, ...] float32."""
    x = np.asarray(x, dtype=np.float32)
    return np.matmul(np.asarray(key, dtype=np.float32), x.reshape(x.shape[:2] + (-1,))).reshape(x.shape)
