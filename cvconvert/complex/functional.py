"""Helpers on the part layout [N, P, ...].

P = 2 is the complex layout (index 0 = real part, 1 = imaginary part), keyed by an angle theta.
P > 2 generalises it: the key is an orthogonal matrix Q [N, P, P] acting on the part axis, and
everything the layers compute depends on the parts only through their norm, so it commutes with Q.
For P = 2 the rotation by theta is the key [[cos, -sin], [sin, cos]] (see ``rotation_key``).
"""

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
    """|x|^2 over the part axis: [N, P, ...] -> [N, ...] ([N, 1, ...] with keepdim).

    One reduction over the part axis: it exports as Mul + ReduceSum, which ONNX Runtime runs faster
    than slicing out both parts (Split) and multiplying them separately.
    """
    return (x * x).sum(1, keepdim=keepdim)  # Mul, not Pow: ONNX Runtime's Pow is the slower kernel


def modulus(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    # The epsilon keeps the gradient finite at 0; |x|^2 + eps is still invariant under any orthogonal key.
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
    """[N, P, C, ...] -> [P*N, C, ...] (a view): real weights act on every part in one call."""
    return x.flatten(0, 1)


parts_as_batch = pairs_as_batch


def batch_as_parts(y: torch.Tensor, parts: int) -> torch.Tensor:
    """[P*N, C, ...] -> [N, P, C, ...]; -1 keeps the batch axis symbolic in exported graphs."""
    return y.reshape((-1, parts) + tuple(y.shape[1:]))


def batch_as_pairs(y: torch.Tensor) -> torch.Tensor:
    """[2N, C, ...] -> [N, 2, C, ...]."""
    return batch_as_parts(y, 2)


# --- orthogonal keys (P parts) ---------------------------------------------------------------------

def transform(x: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Q x on the part axis: x [N, P, ...], key [N, P, P] -> [N, P, ...] (row p = sum_q Q[p, q] x[q])."""
    return torch.matmul(key, x.flatten(2)).reshape(x.shape)


def untransform_first(h: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """(Q^T h)[0] for h [N, P, ...] -> [N, ...]: the part that carried the image (the decoder's first step)."""
    first = key[:, :, :1].transpose(1, 2)  # [N, 1, P]: the first column of Q, as a row
    return torch.matmul(first, h.flatten(2)).reshape(h.shape[:1] + h.shape[2:])


def stack_parts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[a; b_1; ...; b_{P-1}] as [N, P, ...] from a [N, ...] and b [N, P-1, ...]."""
    return torch.cat((a.unsqueeze(1), b), dim=1)


def encode_parts(a: torch.Tensor, b: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """x = Q [a; b_1; ...; b_{P-1}]: the image's feature a hidden among P-1 fool features b [N, P-1, ...]."""
    return transform(stack_parts(a, b), key)


def rotation_key(theta: torch.Tensor) -> torch.Tensor:
    """The P = 2 key of an angle: [N, 2, 2] with transform(x, rotation_key(t)) == rotate(x, t)."""
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack((torch.stack((c, -s), -1), torch.stack((s, c), -1)), 1)
