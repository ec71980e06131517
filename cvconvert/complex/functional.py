"""Helpers on the real-pair layout [N, 2, ...] (index 0 = real part, 1 = imaginary part)."""

from __future__ import annotations

import torch

EPS = 1e-12


def _bcast(theta: torch.Tensor, ndim: int) -> torch.Tensor:
    # theta [N] -> [N, 1, ...] matching a tensor of `ndim` dims without its pair axis.
    return theta.reshape((-1,) + (1,) * (ndim - 1))


def complex_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + ib as [N, 2, ...]."""
    return torch.stack((a, b), dim=1)


def rotate(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """e^{i theta} x for x [N, 2, ...], theta [N] (one angle per sample)."""
    re, im = x[:, 0], x[:, 1]
    t = _bcast(theta, re.dim())
    c, s = torch.cos(t), torch.sin(t)
    return torch.stack((re * c - im * s, re * s + im * c), dim=1)


def unrotate_real(h: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Re[h e^{-i theta}] for h [N, 2, ...] -> [N, ...] (the decoder's first step)."""
    re, im = h[:, 0], h[:, 1]
    t = _bcast(theta, re.dim())
    return re * torch.cos(t) + im * torch.sin(t)


def encode(a: torch.Tensor, b: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """x = e^{i theta}(a + ib)."""
    return rotate(complex_pair(a, b), theta)


def modulus_sq(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """|x|^2 over the pair axis: [N, 2, ...] -> [N, ...] ([N, 1, ...] with keepdim).

    One reduction over the size-2 axis: it exports as Mul + ReduceSum, which ONNX Runtime runs faster
    than slicing out both parts (Split) and multiplying them separately.
    """
    return (x * x).sum(1, keepdim=keepdim)  # Mul, not Pow: ONNX Runtime's Pow is the slower kernel


def modulus(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    # The epsilon keeps the gradient finite at 0; |x|^2 + eps is still rotation-invariant.
    return torch.sqrt(modulus_sq(x, keepdim) + EPS)


def exporting() -> bool:
    """True while torch.export / torch.onnx traces the module: layers then pick the formulation that
    is fastest in ONNX Runtime, which is not always the fastest in PyTorch eager (same math)."""
    try:
        if torch.compiler.is_exporting():
            return True
    except AttributeError:  # older torch
        pass
    return bool(torch.onnx.is_in_onnx_export())


def modulus_l2(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """|x| as one reduction (ONNX ReduceL2): fewer graph nodes than sqrt(sum of squares)."""
    return torch.linalg.vector_norm(x, 2, dim=1, keepdim=keepdim)


def pairs_as_batch(x: torch.Tensor) -> torch.Tensor:
    """[N, 2, C, ...] -> [2N, C, ...] (a view): real weights act on both parts in one call."""
    return x.flatten(0, 1)


def batch_as_pairs(y: torch.Tensor) -> torch.Tensor:
    """[2N, C, ...] -> [N, 2, C, ...]; -1 keeps the batch axis symbolic in exported graphs."""
    return y.reshape((-1, 2) + tuple(y.shape[1:]))
