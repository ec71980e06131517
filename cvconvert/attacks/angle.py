"""The paper's angle estimation (Sec. 4.3): a new discriminator D' learns to tell real features a
from rotated ones Re[e^{i d}(a + ib)]; theta_hat = argmax over an angle grid of D'(Re[x e^{-i t}]),
and a* = Re[x e^{-i theta_hat}]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..complex.functional import encode, unrotate_real
from ..gan import Discriminator
from .base import AngleAttack
from .common import Standardize


def train_dprime(ctx) -> torch.nn.Module:
    a_tr = ctx.tr["a"]
    n = a_tr.shape[0]
    net = torch.nn.Sequential(Standardize(a_tr[:1024]), Discriminator(a_tr.shape[1]))
    margin = math.pi / 16  # negatives rotated by less than this are practically positives

    def batch_fn(idx, gen):
        a, b = a_tr[idx], a_tr[ctx.partners(idx, n, gen)]
        d = margin + torch.rand(len(idx), generator=gen) * (2 * math.pi - 2 * margin)
        neg = unrotate_real(encode(a, b, d), torch.zeros(len(idx)))
        inp = torch.cat((a, neg)).to(ctx.device)
        return inp, torch.cat((torch.ones(len(idx)), torch.zeros(len(idx)))).to(ctx.device)

    ctx.trainer.fit("angle_dprime", net, n, batch_fn, F.binary_cross_entropy_with_logits,
                    epochs=ctx.budget.epochs("dprime"), batch_size=64)
    return net


@torch.no_grad()
def estimate(ctx, net, x: torch.Tensor, label: str = "angle grid search") -> torch.Tensor:
    """theta_hat for each x [N, 2, C, H, W]: a coarse grid, then a fine grid around its best point."""
    coarse, fine = ctx.budget.grid
    grid = torch.arange(coarse) * (2 * math.pi / coarse)
    step = 2 * math.pi / coarse
    per = int(x[0, 0].numel())
    bs = max(1, (1 << 22) // (per * max(coarse, fine)))
    out = []
    task = ctx.progress.add_task(label, total=x.shape[0]) if ctx.progress is not None else None
    for i in range(0, x.shape[0], bs):
        xb = x[i:i + bs].to(ctx.device)
        best = _argmax(net, xb, grid.to(ctx.device).expand(len(xb), -1))
        local = best[:, None] + torch.linspace(-step, step, fine, device=ctx.device)[None]
        out.append(_argmax(net, xb, local).cpu() % (2 * math.pi))
        if task is not None:
            ctx.progress.advance(task, len(xb))
    return torch.cat(out)


def _argmax(net, xb, angles):
    b, g = angles.shape
    rep = xb.repeat_interleave(g, 0)
    scores = net(unrotate_real(rep, angles.reshape(-1))).reshape(b, g)
    return angles.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)


class PaperDPrime(AngleAttack):
    """The paper's attack: D' trained on the attacker's own features, then the grid search."""
    id, label, stage = "paper_dprime", "paper D' grid search", "paper angle attack"

    def _fit(self, public) -> None:
        self.net = train_dprime(public)

    def _estimate(self, x: torch.Tensor) -> torch.Tensor:
        return estimate(self.public, self.net, x, "D' angle grid search")
