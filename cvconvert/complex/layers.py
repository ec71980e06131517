"""Equivariant layers on the part layout [N, P, C, ...] (P = 2: the complex real-pair layout).

Every layer L satisfies L(Q x) == Q L(x) for any per-sample orthogonal Q [N, P, P] acting on the part
axis; for P = 2 this is L(rotate(x, t)) == rotate(L(x), t) for per-sample angles t (paper Eq. 5).
They achieve it by applying real weights to each part alike and by depending on the parts otherwise
only through their norm |f| = sqrt(sum_p f_p^2) (the modulus for P = 2).
Each class with a real counterpart builds itself with ``from_real(module, **options)``, the way
torch.ao.quantization modules build themselves with ``from_float``.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from .functional import EPS, batch_as_parts, exporting, modulus, modulus_l2, modulus_sq, parts_as_batch


class CConv2d(nn.Module):
    """Bias-free conv with real weights shared by all P parts: one conv over the [P*N, C, H, W] view."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1):
        super().__init__()
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *k))
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    @classmethod
    def from_real(cls, conv: nn.Conv2d, **_):
        if conv.padding_mode != "zeros":
            # Reflect/replicate padding is linear too, but keep one code path that exports cleanly.
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups)
        new.weight.data.copy_(conv.weight.data)
        return new

    def forward(self, x):
        y = F.conv2d(parts_as_batch(x), self.weight, None, self.stride, self.padding, self.dilation, self.groups)
        return batch_as_parts(y, x.shape[1])


class CLinear(nn.Module):
    """Bias-free linear map on [N, P, F]: the real weight acts on the last axis of every part."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    @classmethod
    def from_real(cls, lin: nn.Linear, **_):
        new = cls(lin.in_features, lin.out_features)
        new.weight.data.copy_(lin.weight.data)
        return new

    def forward(self, x):
        return F.linear(x, self.weight)


class CDelta(nn.Module):
    """delta(f) = |f| / max(|f|, c) * f (paper Eq. 6): keeps the phase, squashes small moduli.

    |f| is the norm over the part axis, so the factor is invariant under any orthogonal key.

    mode="fixed": one constant c (the paper's ResNets use c = 1).
    mode="channel": c_k = E_ij |f_ijk| per sample and channel (the paper's LeNet/VGG/AlexNet); for
    features without spatial axes the mean runs over the feature axis instead.
    """

    def __init__(self, c: float = 1.0, mode: str = "fixed", eps: float = 1e-6):
        super().__init__()
        if mode not in ("fixed", "channel"):
            raise ValueError(f"unknown activation mode {mode!r}")
        if c <= 0:
            raise ValueError("the activation constant c must be positive")
        self.c, self.mode, self.eps = float(c), mode, eps

    @classmethod
    def from_real(cls, _relu: nn.Module, c: float = 1.0, mode: str = "fixed", **_):
        return cls(c=c, mode=mode)

    def forward(self, x):
        # keepdim: the factor broadcasts over the part axis without an Unsqueeze in the exported graph.
        export = exporting()
        if self.mode == "fixed":
            if export:  # ReduceL2 -> Mul -> Clip -> Mul: the fewest passes over the tensor in ONNX Runtime
                m = modulus_l2(x, keepdim=True)
                return x * torch.clamp(m if self.c == 1.0 else m * (1.0 / self.c), max=1.0)
            # Eager: min(|f| / c, 1) = sqrt(min(|f|^2, c^2)) / c, one clamp on the square.
            f = torch.sqrt(torch.clamp(modulus_sq(x, keepdim=True) + EPS, max=self.c * self.c))
            return x * (f if self.c == 1.0 else f * (1.0 / self.c))
        m = modulus_l2(x, keepdim=True) if export else modulus(x, keepdim=True)  # [N, 1, C, ...]
        dims = tuple(range(3, m.dim())) if m.dim() > 3 else (2,)
        c = m.mean(dim=dims, keepdim=True) + self.eps
        return x * torch.clamp(m / c, max=1.0)

    def extra_repr(self):
        return f"mode={self.mode}" + (f", c={self.c}" if self.mode == "fixed" else "")


class CBatchNorm(nn.Module):
    """Norm-only batch-norm (paper Eq. 7): f / sqrt(E|f|^2) per channel, times a real scale.

    No mean is subtracted and no bias added, so the phase is untouched. The running E|f|^2 serves
    eval mode; in eval the layer is a positive-or-real per-channel scale and folds into a conv.
    Works for [N, P, C] and [N, P, C, H, W] (channel axis 2); E|f|^2 sums the squares over the P parts.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.register_buffer("running_ms", torch.ones(num_features))

    @classmethod
    def from_real(cls, bn: nn.modules.batchnorm._BatchNorm, **_):
        new = cls(bn.num_features, bn.eps, bn.momentum if bn.momentum is not None else 0.1, bn.affine)
        if bn.affine:
            new.weight.data.copy_(bn.weight.data)
        if bn.track_running_stats and bn.running_var is not None:
            # E[f^2] of the real feature is the closest carried estimate of E|f|^2.
            new.running_ms.copy_(bn.running_var + bn.running_mean ** 2)
        return new

    def _view(self, t, x):
        return t.reshape((1, 1, -1) + (1,) * (x.dim() - 3))

    def scale(self) -> torch.Tensor:
        """The eval-mode per-channel factor (what export folds into the previous conv)."""
        s = torch.rsqrt(self.running_ms + self.eps)
        return s * self.weight if self.weight is not None else s

    def forward(self, x):
        if self.training:
            ms_all = modulus_sq(x)  # [N, C, ...]
            dims = (0,) + tuple(range(2, ms_all.dim()))
            ms = ms_all.mean(dim=dims)
            with torch.no_grad():
                self.running_ms.mul_(1 - self.momentum).add_(self.momentum * ms.detach())
            s = torch.rsqrt(ms + self.eps)
            if self.weight is not None:
                s = s * self.weight
        else:
            s = self.scale()
        return x * self._view(s, x)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"


class CMaxModPool2d(nn.Module):
    """Max-modulus pooling: in each window pick the element of largest |f| (all P parts of it).

    Ties go to the first element in row-major window order, as PyTorch's max_pool2d does.
    """

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride if stride is not None else kernel_size
        self.padding, self.dilation, self.ceil_mode = padding, dilation, ceil_mode

    @classmethod
    def from_real(cls, pool: nn.MaxPool2d, **_):
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)

    def forward(self, x):
        m = modulus_sq(x)  # [N, C, H, W]
        _, idx = F.max_pool2d(m, self.kernel_size, self.stride, self.padding, self.dilation,
                              self.ceil_mode, return_indices=True)
        # idx counts within each (N, C) plane, so gathering on the flattened H*W axis is exact.
        flat = x.flatten(3)
        g = torch.gather(flat, 3, idx.flatten(2).unsqueeze(1).expand(-1, x.shape[1], -1, -1))
        return g.reshape(x.shape[:3] + idx.shape[2:])

    def top_gap(self, x) -> torch.Tensor:
        """Per sample [N]: the smallest gap, over all windows, between the largest and second-largest |f|^2,
        in units of the sample's largest |f|^2. The pooling is discontinuous where this is 0: a window
        whose top two are that close can pick either under float rounding (two runtimes may differ)."""
        m = modulus_sq(x)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(v) for v in (self.kernel_size, self.stride,
                                                                        self.padding, self.dilation))
        ho, wo = F.max_pool2d(m, (kh, kw), (sh, sw), (ph, pw), (dh, dw), self.ceil_mode).shape[2:]
        # pad like max_pool2d (-inf, never picked), with ceil_mode's extra right/bottom rows, then window
        extra_h = max(0, (ho - 1) * sh + dh * (kh - 1) + 1 - (m.shape[2] + 2 * ph))
        extra_w = max(0, (wo - 1) * sw + dw * (kw - 1) + 1 - (m.shape[3] + 2 * pw))
        padded = F.pad(m, (pw, pw + extra_w, ph, ph + extra_h), value=float("-inf"))
        win = F.unfold(padded, (kh, kw), dilation=(dh, dw), stride=(sh, sw))  # [N, C*kh*kw, L]
        top2 = win.view(m.shape[0], m.shape[1], kh * kw, -1).topk(min(2, kh * kw), dim=2).values
        gap = (top2[:, :, 0] - top2[:, :, -1]) if kh * kw > 1 else torch.full_like(top2[:, :, 0], float("inf"))
        gap = torch.where(torch.isnan(gap), torch.full_like(gap, float("inf")), gap)  # -inf - -inf
        peak = m.flatten(1).amax(1).clamp_min(torch.finfo(m.dtype).tiny)
        return gap.flatten(1).amin(1) / peak


@contextlib.contextmanager
def max_pool_gaps(module: nn.Module | None):
    """Within the block, each forward through one of module's max-modulus pools records its `top_gap`;
    the yielded object's .gaps is the per-sample minimum over all of them (numpy [N]; None when nothing
    ran through such a pool)."""
    rec = SimpleNamespace(gaps=None)

    def hook(pool, args, _out):
        with torch.no_grad():
            g = pool.top_gap(args[0]).cpu().numpy()
        rec.gaps = g if rec.gaps is None else np.minimum(rec.gaps, g)

    pools = [m for m in module.modules() if isinstance(m, CMaxModPool2d)] if module is not None else []
    handles = [p.register_forward_hook(hook) for p in pools]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


class CAvgPool2d(nn.Module):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
        super().__init__()
        self.args = (kernel_size, stride if stride is not None else kernel_size, padding, ceil_mode,
                     count_include_pad)

    @classmethod
    def from_real(cls, pool: nn.AvgPool2d, **_):
        if pool.divisor_override is not None:
            raise ValueError("AvgPool2d with divisor_override is not supported")
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, pool.count_include_pad)

    def forward(self, x):
        return batch_as_parts(F.avg_pool2d(parts_as_batch(x), *self.args), x.shape[1])


class CAdaptiveAvgPool2d(nn.Module):
    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    @classmethod
    def from_real(cls, pool: nn.AdaptiveAvgPool2d, **_):
        return cls(pool.output_size)

    def forward(self, x):
        return batch_as_parts(F.adaptive_avg_pool2d(parts_as_batch(x), self.output_size), x.shape[1])


class CDropout(nn.Module):
    """Dropout with ONE mask for all parts, so a dropped element is dropped whole (as a complex number
    for P = 2): the mask is invariant under any orthogonal key."""

    def __init__(self, p=0.5):
        super().__init__()
        self.p = p

    @classmethod
    def from_real(cls, drop: nn.Module, **_):
        return cls(drop.p)

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        shape = (x.shape[0], 1) + tuple(x.shape[2:])
        keep = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class CFlatten(nn.Module):
    """Flatten that skips the part axis: real start_dim d becomes d + 1."""

    def __init__(self, start_dim=1, end_dim=-1):
        super().__init__()
        if start_dim < 1:
            raise ValueError("flattening the batch axis is not rotation-equivariant per sample")
        self.start_dim, self.end_dim = start_dim + 1, end_dim if end_dim < 0 else end_dim + 1

    @classmethod
    def from_real(cls, flat: nn.Flatten, **_):
        return cls(flat.start_dim, flat.end_dim)

    def forward(self, x):
        return torch.flatten(x, self.start_dim, self.end_dim)
