"""Adaptive, training-free angle estimators from the phases of x = e^{i theta}(a + ib).

window: when a, b >= 0 every phase of x lies in [theta, theta + pi/2]; theta_hat is the start of the
        quarter-circle window holding the most |x|-weighted phase mass.
mean:   arg(sum_k w_k sum_ij x_kij) with w_k the sign-carrying mean of channel k (from the public
        encoder on public images) is theta + atan2(sum w b, sum w a) ~ theta + pi/4 whenever a and b
        share a non-zero mean; the constant offset is calibrated on the attacker's own simulated x.
No network is trained; the only statistics are channel means of a on public images."""

from __future__ import annotations

import math

import torch

from ..complex.functional import encode, modulus
from .metrics import circular_error
from .base import AngleAttack
from .common import uniform_angles


@torch.no_grad()
def window_estimate(x: torch.Tensor, grid: int = 180) -> torch.Tensor:
    out = []
    t = torch.arange(grid) * (2 * math.pi / grid)
    for i in range(0, x.shape[0], 64):
        xb = x[i:i + 64].flatten(2)                          # [B, 2, M]
        phi = torch.atan2(xb[:, 1], xb[:, 0])                # [B, M]
        w = modulus(xb)                                      # [B, M]
        rel = (phi[:, :, None] - t[None, None]) % (2 * math.pi)  # [B, M, G]
        mass = ((rel <= math.pi / 2).float() * w[:, :, None]).sum(1)
        out.append(t[mass.argmax(1)])
    return torch.cat(out)


def channel_weights(a_tr: torch.Tensor) -> torch.Tensor:
    dims = [0] + list(range(2, a_tr.dim()))
    return a_tr.float().mean(dims)


@torch.no_grad()
def mean_phase(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 3)
    s = (x * w.reshape(shape).unsqueeze(1)).flatten(2).sum(2)  # [N, 2] complex sum
    return torch.atan2(s[:, 1], s[:, 0])


def calibrate(ctx, a_tr: torch.Tensor, seed: int, n: int = 1024):
    """The constant offset of the mean estimator, and the attacker's own simulated x to score both
    estimators on (so the better one is chosen without looking at the victim's data)."""
    gen = torch.Generator().manual_seed(seed + 2)
    idx = torch.arange(min(n, len(a_tr)))
    t = uniform_angles(len(idx), gen)
    x = (ctx.combine or encode)(a_tr[idx], a_tr[ctx.partners(idx, len(a_tr), gen)], t)
    w = channel_weights(a_tr)
    d = mean_phase(x, w) - t
    offset = torch.atan2(d.sin().mean(), d.cos().mean())
    return w, offset, x, t


def mean_estimate(x: torch.Tensor, w: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return (mean_phase(x, w) - offset) % (2 * math.pi)


class PhaseSupport(AngleAttack):
    """One of the two training-free estimators (``kind`` "window" or "mean"). ``calibration_error`` is
    its mean error on the attacker's own simulated x, which is how the attacker picks between them."""
    stage = "adaptive angle attacks"
    LABELS = {"window": "phase support: quarter-circle window", "mean": "phase support: channel-weighted mean phase"}

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.id, self.label = kind, f"phase_{kind}", self.LABELS[kind]

    def _fit(self, public) -> None:
        if "phase_support" not in public.cache:  # one calibration for both estimators
            public.cache["phase_support"] = calibrate(public, public.tr["a"], public.seed)
        self.w, self.offset, x_cal, t_cal = public.cache["phase_support"]
        self.calibration_error = float(circular_error(self._estimate(x_cal), t_cal).mean())

    def _estimate(self, x: torch.Tensor) -> torch.Tensor:
        return window_estimate(x) if self.kind == "window" else mean_estimate(x, self.w, self.offset)


def window() -> PhaseSupport:
    return PhaseSupport("window")


def mean() -> PhaseSupport:
    return PhaseSupport("mean")


def best(attacks) -> PhaseSupport:
    """The phase-support estimator with the lower error on the attacker's own data (never the victim's)."""
    return min((a for a in attacks if isinstance(a, PhaseSupport)), key=lambda a: a.calibration_error)
