"""Feature inversion with the paper's U-Net decoder (Sec. 4.3 / 5.1).

attack 1: trained to reconstruct I from the real feature a (the attacker computes a = g(I) on its own
          images with the public encoder), evaluated on a* from the angle estimate;
attack 2: trained on x directly (the attacker simulates x with its own keys and fooling images);
baselines: trained and evaluated on the baseline's a."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..complex.functional import encode, unrotate_real
from .base import ReconstructionAttack
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


class FeatureInverter(ReconstructionAttack):
    """A U-Net from a feature to the image, trained on the attacker's own (feature, image) pairs:
    the complex model's a (``features`` None: the public encoder's) or a real baseline's a, which is
    what a baseline transmits, so ``reconstruct`` takes that feature."""
    id, label = "inversion", "inversion from a"

    def __init__(self, ckpt: str = "inversion1_from_a", history: str = "inversion 1 U-Net L1 (train)",
                 features: torch.Tensor | None = None, stage: str = "inversion and invariant U-Nets"):
        super().__init__()
        self.ckpt, self.history_label, self.features, self.stage = ckpt, history, features, stage

    def _fit(self, public) -> None:
        a_tr = public.tr["a"] if self.features is None else self.features
        self.net, hist = train_unet(public, self.ckpt, lambda idx, gen: a_tr[idx], len(a_tr), a_tr[:1024],
                                    public.tr["images"])
        self.history = {self.history_label: hist}

    def reconstruct(self, feats: torch.Tensor) -> torch.Tensor:
        return decode(self.public, self.net, feats)


class FromAngle(ReconstructionAttack):
    """Inversion attack 1's reading: a* = Re[x e^{-i theta_hat}] from an angle attack, then the inverter."""
    stage = "inversion and invariant U-Nets"

    def __init__(self, id: str, label: str, angle, inverter: FeatureInverter):
        super().__init__()
        self.id, self.label, self.angle, self.inverter = id, label, angle, inverter

    def _fit(self, public) -> None:
        self.angle.fit(public)
        self.history = self.inverter.fit(public).history

    def a_star(self, x: torch.Tensor) -> torch.Tensor:
        return unrotate_real(x, self.angle.estimate(x))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.inverter.reconstruct(self.a_star(x))


class FromX(ReconstructionAttack):
    """Inversion attack 2: a U-Net trained on the attacker's own simulated x, applied to x."""
    id, label, stage = "inversion2_x", "inversion 2: dec(x)", "inversion and invariant U-Nets"

    def _fit(self, public) -> None:
        a_tr = public.tr["a"]
        gen = torch.Generator().manual_seed(public.seed)
        sample = flat_x(simulate_x(public, torch.arange(min(1024, len(a_tr))), gen))
        self.net, hist = train_unet(public, "inversion2_from_x", lambda idx, g: flat_x(simulate_x(public, idx, g)),
                                    len(a_tr), sample, public.tr["images"])
        self.history = {"inversion 2 U-Net L1 (train)": hist}

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return decode(self.public, self.net, flat_x(x))
