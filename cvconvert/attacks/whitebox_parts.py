"""White-box attack on P-part transmissions: optimise P images I_1..I_P through the public encoder g so
that some orthogonal O maps G = [g(I_1); ...; g(I_P)] onto x. For fixed images the best O is the
orthogonal Procrustes solution O = U V^T (x G^T = U S V^T), so only the images are searched by gradient
descent (O is held fixed within each step: at the optimum its own gradient vanishes).

Like the two-part search it ends with a set: x is explained as well by the P images in any order, so
the attacker still has to say which one is real (``WhiteBoxPicked`` asks the which-row classifier, on
the images' features) and the better of the P is a bound that needs the truth.
"""

from __future__ import annotations

import torch

from .base import Memo, ReconstructionAttack
from .metrics import per_sample_mae
from .whichrow import take


def procrustes(x: torch.Tensor, g: torch.Tensor) -> tuple:
    """(O [N, P, P] orthogonal minimising ||x - O g||, the relative residual [N]) for x, g [N, P, ...]."""
    xf, gf = x.flatten(2), g.flatten(2)
    u, _, vh = torch.linalg.svd(xf @ gf.transpose(1, 2))
    o = (u @ vh).detach()
    res = (xf - o @ gf).pow(2).sum((1, 2)) / xf.pow(2).sum((1, 2)).clamp_min(1e-12)
    return o, res


def invert(ctx, g, x: torch.Tensor, image_shape, steps: int, lr: float = 0.05):
    """(images [N, P, C, H, W], relative residual [N]) for every x [N, P, ...]."""
    for p in g.parameters():
        p.requires_grad_(False)
    g.eval()
    gen = torch.Generator().manual_seed(ctx.seed + 3)
    outs, res_all = [], []
    for i in range(0, len(x), 64):
        xb = x[i:i + 64].to(ctx.device)
        n, parts = xb.shape[:2]
        z = (0.5 * torch.randn((n * parts,) + tuple(image_shape), generator=gen)).to(ctx.device).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        for _ in range(steps):
            _, res = procrustes(xb, g(torch.sigmoid(z)).unflatten(0, (n, parts)))
            opt.zero_grad(set_to_none=True)
            res.sum().backward()
            opt.step()
        with torch.no_grad():
            imgs = torch.sigmoid(z)
            _, res = procrustes(xb, g(imgs).unflatten(0, (n, parts)))
        outs.append(imgs.unflatten(0, (n, parts)).cpu())
        res_all.append(res.cpu())
    return torch.cat(outs), torch.cat(res_all)


class WhiteBoxParts(ReconstructionAttack):
    """The search on the first ``limit`` victims (it is costly); scored by the better of the P images."""
    id, label, stage = "whitebox_parts", "white-box (Procrustes key), the better of the P images (oracle bound)", \
        "white-box"

    def __init__(self):
        super().__init__()
        self.runs = Memo()

    def _fit(self, public) -> None:
        self.limit = public.budget.whitebox_n

    def run(self, x: torch.Tensor):
        p = self.public
        return self.runs.get(x, lambda v: invert(p, p.encoder.features, v[:self.limit], p.tr["images"].shape[1:],
                                                 p.budget.whitebox_steps))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0]

    def score(self, images: torch.Tensor, truth: torch.Tensor) -> dict:
        err = torch.stack([per_sample_mae(images[:, j], truth) for j in range(images.shape[1])]).min(0).values
        return {"mae": float(err.mean()), "psnr": None, "ssim": None,
                "note": "the best of the P recovered images per victim: needs the truth, so a bound"}

    def pictures(self, images: torch.Tensor, k: int) -> list:
        return [(f"white-box I_{j + 1}", images[:k, j]) for j in range(images.shape[1])]


class WhiteBoxPicked(ReconstructionAttack):
    """The white-box search's P images, the one whose feature the which-row classifier picks."""
    id, label, stage = "whitebox_picked", "white-box, the image the which-row classifier picks", "white-box"

    def __init__(self, search: WhiteBoxParts, which):
        super().__init__()
        self.search, self.which = search, which

    def _fit(self, public) -> None:
        self.search.fit(public)
        self.which.fit(public)
        self.limit = self.search.limit

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        imgs = self.search.run(x)[0]
        feats = torch.stack([self.public.encoder.features(imgs[:, j].to(self.public.device)).detach().cpu()
                             for j in range(imgs.shape[1])], 1)
        return take(imgs, self.which.pick(feats))

    def pictures(self, images: torch.Tensor, k: int) -> list:
        return []
