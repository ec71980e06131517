"""Adaptive white-box attack: optimise images I, I' so that rotate(g(I) + i g(I'), theta) matches x,
through the public encoder g. For fixed I, I' the best theta has a closed form,
theta = arg sum conj(g(I) + i g(I')) x, so only the images are searched by gradient descent.

The answer is a pair: x is equally explained by (I, I', theta) and, when the features are symmetric
enough, by (I', -I, theta + pi/2), so the attacker learns the pair {I, I'} but not which one is real."""

from __future__ import annotations

import torch

from ..complex.functional import encode
from .base import AngleAttack, Memo, ReconstructionAttack
from .metrics import per_sample_mae


def closed_form_theta(a, b, x):
    re, im = x[:, 0], x[:, 1]
    dims = tuple(range(1, a.dim()))
    return torch.atan2((a * im - b * re).sum(dims), (a * re + b * im).sum(dims))


def _fit_theta(enc, a, b, x, norm):
    """Closed-form theta for fool sign +1 and -1 (an encoder may flip the fool's sign with theta);
    keep, per sample, whichever the encoder's own rule reproduces best."""
    cands = [closed_form_theta(a, b, x), closed_form_theta(a, -b, x)]
    res = torch.stack([(enc(a, b, t) - x).pow(2).flatten(1).sum(1) / norm for t in cands])
    best = res.argmin(0)
    return torch.where(best == 0, cands[0], cands[1]), res.gather(0, best[None]).squeeze(0)


def invert(ctx, g, x: torch.Tensor, image_shape, steps: int, lr: float = 0.05):
    """Returns (I_hat, I'_hat, theta_hat, final relative residual) for every x."""
    for p in g.parameters():
        p.requires_grad_(False)
    g.eval()
    enc = ctx.combine or encode
    outs = []
    task = ctx.progress.add_task("white-box inversion", total=steps * ((len(x) + 127) // 128)) \
        if ctx.progress is not None else None
    gen = torch.Generator().manual_seed(ctx.seed + 3)
    for i in range(0, len(x), 128):
        xb = x[i:i + 128].to(ctx.device)
        n = len(xb)
        z = (0.5 * torch.randn((2 * n,) + tuple(image_shape), generator=gen)).to(ctx.device).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        norm = xb.pow(2).flatten(1).sum(1)
        for _ in range(steps):
            a, b = g(torch.sigmoid(z)).chunk(2, 0)
            theta, res = _fit_theta(enc, a, b, xb, norm)
            opt.zero_grad(set_to_none=True)
            res.sum().backward()
            opt.step()
            if task is not None:
                ctx.progress.advance(task)
        with torch.no_grad():
            imgs = torch.sigmoid(z)
            a, b = g(imgs).chunk(2, 0)
            theta, res = _fit_theta(enc, a, b, xb, norm)
            first, second = imgs.chunk(2, 0)
        outs.append((first.cpu(), second.cpu(), (theta % (2 * torch.pi)).cpu(), res.cpu()))
    return tuple(torch.cat(t) for t in zip(*outs))


class WhiteBox(AngleAttack):
    """The white-box search as an angle attack on the first ``limit`` victims (it is costly); the images
    it finds are read by ``WhiteBoxImage`` and ``WhiteBoxPair``."""
    id, label, stage = "whitebox", "white-box optimisation (closed-form theta)", "white-box"

    def _fit(self, public) -> None:
        self.limit = public.budget.whitebox_n
        self.runs = Memo()

    def run(self, x: torch.Tensor):
        """(I_hat, I'_hat, theta_hat, residual) for x[:limit], computed once per x."""
        p = self.public
        return self.runs.get(x, lambda v: invert(p, p.encoder.features, v[:self.limit], p.tr["images"].shape[1:],
                                                 p.budget.whitebox_steps))

    def _estimate(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[2]


class WhiteBoxImage(ReconstructionAttack):
    id, label, stage = "whitebox", "white-box: I_hat", "white-box"

    def __init__(self, search: WhiteBox):
        super().__init__()
        self.search = search

    def _fit(self, public) -> None:
        self.search.fit(public)
        self.limit = self.search.limit

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.search.run(x)[0]

    def pictures(self, images: torch.Tensor, k: int) -> list:
        return []  # the pair's row shows both images


class WhiteBoxPair(WhiteBoxImage):
    """The search recovers the pair {I, I'} but not which one is real: scored by the better of the two."""
    id, label = "whitebox_pair", "white-box: better of the pair {I_hat, I'_hat}"

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        first, second, _, _ = self.search.run(x)
        return torch.stack((first, second))

    def score(self, images: torch.Tensor, truth: torch.Tensor) -> dict:
        err = torch.minimum(per_sample_mae(images[0], truth), per_sample_mae(images[1], truth))
        return {"mae": float(err.mean()), "psnr": None, "ssim": None,
                "note": "the attacker recovers the pair {I, I'} but cannot tell which is real"}

    def pictures(self, images: torch.Tensor, k: int) -> list:
        return [("white-box I_hat", images[0][:k]), ("white-box I'_hat", images[1][:k])]
