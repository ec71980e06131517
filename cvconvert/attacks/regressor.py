"""Adaptive attack: a CNN trained on the attacker's own simulated x to predict (cos theta, sin theta).

An independent reproduction recovered theta to about 0.08 rad on CIFAR ResNets this way. It needs no
discriminator: the key leaks whenever the distribution of x is not rotation-invariant."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..complex.functional import encode
from .base import AngleAttack
from .common import Standardize, batched, uniform_angles
from .inversion import flat_x
from .metrics import circular_error
from .nets import SmallCNN


def train(ctx, eval_x: torch.Tensor | None = None, eval_theta: torch.Tensor | None = None):
    a_tr = ctx.tr["a"]
    n = len(a_tr)
    gen0 = torch.Generator().manual_seed(ctx.seed + 1)
    idx0 = torch.arange(min(1024, n))
    enc = ctx.combine or encode
    sample = flat_x(enc(a_tr[idx0], a_tr[ctx.partners(idx0, n, gen0)], uniform_angles(len(idx0), gen0)))
    net = torch.nn.Sequential(Standardize(sample), SmallCNN(sample.shape[1], 2))

    def batch_fn(idx, gen):
        t = uniform_angles(len(idx), gen)
        x = enc(a_tr[idx], a_tr[ctx.partners(idx, n, gen)], t)
        return flat_x(x).to(ctx.device), torch.stack((t.cos(), t.sin()), 1).to(ctx.device)

    def eval_fn():  # per-epoch angle error on the victim's x (logged only, never used to select)
        return float(circular_error(predict(ctx, net, eval_x), eval_theta).mean())

    hist = ctx.trainer.fit("angle_regressor", net, n, batch_fn, F.mse_loss, epochs=ctx.budget.epochs("regressor"),
                           batch_size=64, eval_fn=eval_fn if eval_x is not None else None)
    return net, hist


def predict(ctx, net, x: torch.Tensor) -> torch.Tensor:
    out = batched(lambda xb: net(flat_x(xb)), x, batch_size=256, device=ctx.device)
    return torch.atan2(out[:, 1], out[:, 0]) % (2 * torch.pi)


class LearnedRegressor(AngleAttack):
    """A CNN from x to (cos theta, sin theta). ``monitor`` = (victim x, theta): logged per epoch only."""
    id, label, stage = "regressor", "learned regressor (cos, sin)", "adaptive angle attacks"

    def __init__(self, monitor=None):
        super().__init__()
        self.monitor = monitor

    def _fit(self, public) -> None:
        self.net, hist = train(public, *(self.monitor or (None, None)))
        if self.monitor is not None:
            self.history = {"angle regressor (eval, rad)": hist}

    def _estimate(self, x: torch.Tensor) -> torch.Tensor:
        return predict(self.public, self.net, x)
