"""Feature inversion with the paper's U-Net decoder (Sec. 4.3 / 5.1).

attack 1: trained to reconstruct I from the real feature a (the attacker computes a = g(I) on its own
          images with the public encoder), evaluated on a* from the angle estimate;
attack 2: trained on x directly (the attacker simulates x with its own keys and fooling images);
baselines: trained and evaluated on the baseline's a."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..complex.functional import encode
from .common import Standardize, batched, uniform_angles
from .nets import UNet


def train_unet(ctx, name: str, inputs_fn, n: int, in_sample: torch.Tensor, images: torch.Tensor):
    """inputs_fn(idx, gen) -> the attacker's input for training items idx; images: the targets."""
    b = ctx.budget
    net = torch.nn.Sequential(Standardize(in_sample), UNet(in_sample.shape[1], images.shape[1:], b.unet_width,
                                                         b.unet_convs, images.mean(0)))

    def batch_fn(idx, gen):
        return inputs_fn(idx, gen).to(ctx.device), images[idx].to(ctx.device)

    hist = ctx.trainer.fit(name, net, n, batch_fn, F.l1_loss, epochs=b.epochs("unet"), batch_size=64)
    return net, hist


def decode(ctx, net, feats: torch.Tensor) -> torch.Tensor:
    return batched(net, feats, batch_size=256, device=ctx.device)


def flat_x(x: torch.Tensor) -> torch.Tensor:
    """[N, 2, C, H, W] -> [N, 2C, H, W]: real and imaginary maps as channels."""
    return x.flatten(1, 2)


def attack1(ctx):
    a_tr = ctx.tr["a"]
    return train_unet(ctx, "inversion1_from_a", lambda idx, gen: a_tr[idx], len(a_tr), a_tr[:1024],
                      ctx.tr["images"])


def simulate_x(ctx, idx, gen) -> torch.Tensor:
    """The attacker's own x for its images: a random fooling partner and a random key, combined the way
    the public encoder does."""
    a_tr = ctx.tr["a"]
    b = a_tr[ctx.partners(idx, len(a_tr), gen)]
    return (ctx.combine or encode)(a_tr[idx], b, uniform_angles(len(idx), gen))


def attack2(ctx):
    a_tr = ctx.tr["a"]
    gen = torch.Generator().manual_seed(ctx.seed)
    sample = flat_x(simulate_x(ctx, torch.arange(min(1024, len(a_tr))), gen))
    return train_unet(ctx, "inversion2_from_x", lambda idx, g: flat_x(simulate_x(ctx, idx, g)), len(a_tr),
                      sample, ctx.tr["images"])


def baseline(ctx, name: str, a_tr: torch.Tensor):
    return train_unet(ctx, f"{name}_inversion_from_a", lambda idx, gen: a_tr[idx], len(a_tr), a_tr[:1024],
                      ctx.tr["images"])

