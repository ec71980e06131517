"""Phase-hiding defenses for training the complex variant: one object per defense, one training path.

Why theta leaks. x = e^{i theta}(a + ib) with a = g(I), b = g(I'). Rotating x by j pi/2 gives the four
readings (a, b), (-b, a), (-a, -b), (b, -a). When the law of a is not sign-symmetric (always so in
practice: Fashion-MNIST's constant background alone maps to a fixed non-zero feature), only the reading
(a, b) looks natural, so a learned attacker finds theta exactly and the real part a, hence I.

Defense ``exchange`` (structural, no extra loss; the default of `cvconvert train`). A key law
(cvconvert/device/keylaws.py): the key is R(theta) diag(1, s) with s = quadrant_sign(theta) (+1 when theta
is in the 1st/3rd quarter-circle, -1 otherwise), so x = e^{i theta}(a + i s b). For s = -1, x = e^{i(theta - pi/2)}(b + i a): the one natural
reading now holds the FOOL in its real part. The angle phi of the natural reading is uniform on the
1st/3rd quarters whatever s is, and a, b are exchangeable (I' is drawn from the same data), so no
attacker, however strong, can tell the two cases apart: it must bet between theta = phi and
theta = phi - pi/2. Any estimator's mean circular error is then >= pi/4 = 0.785 rad, and an attacker
that decodes the natural reading gets the real image only half of the time (the other half it gets I').
What it does NOT hide: the pair {I, I'} (Re x, Im x span {a, b}) and anything rotation-invariant (|x|).
s is a column sign of the secret key, so the decoder and the exported graphs are unchanged; the model dir
records ``"key_law": "exchange"`` in its manifest (``ModelSpec.key_law``; format 1 wrote ``"fool_sign":
"quadrant"``, which reads as the same law).

Defense ``symmetric`` = ``exchange`` + a cheap in-the-loop sign critic C (a down-sampled, 3-layer CNN
without batch-norm) trained to tell a from -a, the encoder being rewarded for confusing it (logits
pushed to 0) and for zero odd moments (per-channel mean and skewness of a). If the law of a became
sign-symmetric, all four readings would look natural and the best angle error would rise to pi/2
(chance); the weight of this term is what `experiments/defense_sweep.py` sweeps.

Defense ``paper``: the paper's Eqs. 8-9 (``--defense paper``, to reproduce the paper). For each sample,
b = the feature of another sample of the batch and a negative a' = Re[(a + ib) e^{i dtheta}] with dtheta
one of the k-1 angles j pi / k (j = 1..k-1, cycled over the batch so every angle is used in every step).
The critic D (``model.discriminator``) is trained to score a above a'; the encoder is trained to close
the gap. Our WGAN variant: WGAN-GP (Gulrajani et al. 2017) with the penalty on ``GP_SAMPLES``
interpolates to keep the double backward cheap, Adam(0.5, 0.9) for the critic, critic and model steps on
every ``every``-th batch, the game on the first ``batch`` samples of each shuffled batch (default: all;
32 of 128 cost accuracy on LeNet, docs/results.md). The critic sees the features divided by the batch's
RMS of a (not detached), so the encoder cannot win the game by shrinking its features towards zero (the
processing part's delta with c = E|f| is scale-free, so nothing else would stop it). Measured in
docs/results.md: a learned regressor still recovers its angle to 0.03-0.05 rad.

API (what the trainer calls, once per training step, for every defense):

    d = make_defense(name, model, cfg, dist)  # cfg: the class's config, a dict of its fields, or None
    x = model.encoder.combine(a, b, key)      # key drawn by the model's key law (exchange sets it)
    stats = d.update(a, b, x, step)           # in-loop critic step(s); detaches its inputs itself
    loss, stats = d.extra_loss(a, b, x, step) # add `loss` (already weighted) to the task loss
    d.manifest_updates()                      # merge into the manifest when saving ({"key_law": ...})
    d.history()                               # the run's record for the manifest's history (or None)
    d.state_dict() / d.load_state_dict(sd)    # its optimizer (and own critic), for checkpoints
    d.parameters()                            # its own critic's parameters (not the model's)
    d.distributed                             # can it run under torchrun (critic gradients averaged)?

A new defense is one class with a ``name`` and one entry in ``_CLASSES``. exchange/symmetric set
``model.spec.key_law`` to ``"exchange"``. The defenses see b, the one fool's feature [N, ...] (two parts).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CvError

DEFENSES = ("paper", "exchange", "symmetric")
GP_SAMPLES = 16  # interpolates of the WGAN-GP penalty per step (the double backward is the GAN's cost)


@dataclass
class DefenseConfig:
    weight: float = 0.1          # weight of the symmetric defense's loss (critic confusion + odd moments)
    critic_lr: float = 1e-3
    critic_steps: int = 1        # critic updates per call of update()
    critic_width: int = 16
    pool: int = 2                # the critic sees a average-pooled by this factor (cheap)
    moment_weight: float = 1.0   # relative weight of the odd-moment term inside `weight`


@dataclass
class WganConfig:
    """The paper defense's settings (`cvconvert train --gan-weight --k --critic-* --gp-weight --gan-*`)."""

    weight: float = 0.01         # of the WGAN loss in the model's loss (0: none; 0.1 cost 4 points on LeNet)
    k: int = 8                   # 1 real + k-1 rotated negatives
    critic_lr: float = 1e-3
    critic_steps: int = 1        # critic updates per GAN step
    gp_weight: float = 10.0
    every: int = 1               # play the game on every n-th batch only
    batch: int | None = None     # samples of each batch the game sees (None: all)


class SignCritic(nn.Module):
    """Logit that its input is a real feature a rather than -a (no batch-norm: sign-equivariant stats)."""

    def __init__(self, channels: int, width: int = 16, pool: int = 2):
        super().__init__()
        act = lambda: nn.LeakyReLU(0.2)  # noqa: E731
        self.pool = pool
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, 1, 1), act(), nn.Conv2d(width, 2 * width, 3, 2, 1), act(),
            nn.Conv2d(2 * width, 2 * width, 3, 2, 1), act(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * width, 1))

    def forward(self, a):
        if a.dim() == 2:  # a flat feature: a 1x1 map
            a = a[:, :, None, None]
        if self.pool > 1 and min(a.shape[-2:]) >= 2 * self.pool:
            a = F.avg_pool2d(a, self.pool)
        return self.body(a).squeeze(1)


def _scaled(a: torch.Tensor) -> torch.Tensor:
    # The critic sees a / RMS(a) (not detached) so the encoder cannot win by shrinking a to zero.
    return a / (a.pow(2).mean().sqrt() + 1e-8)


def odd_moments(a: torch.Tensor) -> torch.Tensor:
    """Squared per-channel mean and skewness of a (over batch and positions), standardised: 0 when
    the law of each channel is sign-symmetric."""
    dims = [0] + list(range(2, a.dim()))
    mean = a.mean(dims)
    std = a.std(dims) + 1e-6
    skew = ((a - a.mean(dims, keepdim=True)) ** 3).mean(dims) / std ** 3
    return ((mean / std) ** 2 + skew ** 2).mean()


class Defense:
    """The no-op base every defense builds on: no extra term, no critic, nothing in the manifest but its
    name and settings."""

    name = "none"
    config_cls = DefenseConfig

    def __init__(self, model, cfg, dist=None):
        self.model, self.cfg, self.dist = model, cfg, dist

    def extra_loss(self, a, b, x, step: int):
        return a.new_zeros(()), {}

    def update(self, a, b, x, step: int = 0) -> dict:
        return {}

    def parameters(self):
        return []

    @property
    def distributed(self) -> bool:
        """Whether it can run under torchrun: a critic of its own would differ per process."""
        return not self.parameters()

    def manifest_updates(self) -> dict:
        return {"defense": {"name": self.name, **asdict(self.cfg)}}

    def history(self) -> dict | None:
        return None

    def describe(self) -> str:
        """A few words for the training log."""
        return f", defense {self.name}"

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass

    def to(self, device):
        return self


def negatives(a: torch.Tensor, b: torch.Tensor, k: int, offset: int) -> torch.Tensor:
    """a' = Re[(a + ib) e^{i dtheta}] = a cos(dtheta) - b sin(dtheta), dtheta = j pi / k, j cycling 1..k-1."""
    j = (torch.arange(a.shape[0], device=a.device) + offset) % (k - 1) + 1
    dtheta = (j.float() * (math.pi / k)).reshape((-1,) + (1,) * (a.dim() - 1))
    return a * torch.cos(dtheta) - b * torch.sin(dtheta)


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP's (|grad D| - 1)^2 on GP_SAMPLES random interpolates of real and fake."""
    n = min(GP_SAMPLES, real.shape[0])
    eps = torch.rand((n,) + (1,) * (real.dim() - 1), device=real.device)
    mix = (eps * real[:n] + (1 - eps) * fake[:n]).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mix).sum(), mix, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


class PaperDefense(Defense):
    """The paper's WGAN-GP between a and its rotated negatives a' (see the module docstring)."""

    name = "paper"
    config_cls = WganConfig

    def __init__(self, model, cfg: WganConfig, dist=None):
        super().__init__(model, cfg, dist)
        if getattr(model, "discriminator", None) is None or not model.is_complex:
            raise CvError(f"the {self.name} defense needs a complex model (this one is {model.spec.variant!r})")
        if cfg.k < 2 or cfg.critic_steps < 1 or cfg.every < 1 or cfg.critic_lr <= 0:
            raise CvError("GAN k must be >= 2, critic steps and every >= 1, critic lr > 0")
        self.critic = model.discriminator  # part of the model dir's weights (model.pt holds it)
        self.critic_params = list(self.critic.parameters())
        self.opt = torch.optim.Adam(self.critic_params, lr=cfg.critic_lr, betas=(0.5, 0.9))

    @property
    def distributed(self) -> bool:
        return True  # its critic's gradients are averaged with the model's (update below)

    def _active(self, step: int) -> bool:
        return self.cfg.weight > 0 and step % self.cfg.every == 0

    def _pair(self, a, b, step: int):
        """(a, a') of the game's samples, both divided by the batch's RMS of a."""
        scale = a.pow(2).mean().sqrt() + 1e-8
        n = min(self.cfg.batch or a.shape[0], a.shape[0])  # the batch is already shuffled: take the first n
        return a[:n] / scale, negatives(a[:n], b[:n], self.cfg.k, step) / scale

    def update(self, a, b, x, step: int = 0) -> dict:
        """Critic steps: maximise D(a) - D(a') (WGAN-GP) on the detached features of this forward pass."""
        if not self._active(step):
            return {}
        real, fake = self._pair(a.detach(), b.detach(), step)
        stats = {}
        for _ in range(self.cfg.critic_steps):
            d_real, d_fake = self.critic(torch.cat((real, fake))).chunk(2)  # no batch-norm in D: one call
            d_loss = d_fake.mean() - d_real.mean()
            c_loss = d_loss + self.cfg.gp_weight * gradient_penalty(self.critic, real, fake)
            self.opt.zero_grad(set_to_none=True)
            c_loss.backward()
            extra = d_loss.detach().reshape(1)
            if self.dist is not None:
                extra = self.dist.average_grads(self.critic_params, extra)
            self.opt.step()
            stats["critic_loss"] = float(c_loss.detach())
            stats["wdist"] = -float(extra)  # the critic's estimate of W(a, a')
        return stats

    def extra_loss(self, a, b, x, step: int):
        """Encoder side: minimise D(a) - D(a') with the critic frozen, times the weight."""
        if not self._active(step):
            return a.new_zeros(()), {}
        real, fake = self._pair(a, b, step)
        for p in self.critic_params:
            p.requires_grad_(False)
        try:
            d_real, d_fake = self.critic(torch.cat((real, fake))).chunk(2)
        finally:
            for p in self.critic_params:
                p.requires_grad_(True)
        g_loss = d_real.mean() - d_fake.mean()
        return self.cfg.weight * g_loss, {"gan_loss": float(g_loss.detach())}

    def history(self) -> dict:
        c = self.cfg
        return {"weight": c.weight, "k": c.k, "critic_steps": c.critic_steps, "gp_weight": c.gp_weight,
                "gan_every": c.every}

    def describe(self) -> str:
        return f", GAN weight {self.cfg.weight}, k={self.cfg.k}"

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict()}  # the critic's weights are the model's

    def load_state_dict(self, sd: dict) -> None:
        try:
            self.opt.load_state_dict(sd["opt"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CvError(f"defense state does not match the {self.name} defense: {str(exc)[:200]}") from None


class ExchangeDefense(Defense):
    """The key law ``exchange``: the fool's sign follows theta's quarter-circle (module docstring); no extra loss."""

    name = "exchange"

    def __init__(self, model, cfg: DefenseConfig, dist=None):
        super().__init__(model, cfg, dist)
        if not getattr(model, "is_complex", False):
            raise CvError(f"the {self.name} defense needs a complex model (this one is {model.spec.variant!r})")
        model.spec.key_law = "exchange"
        _ = model.spec.law  # a one-line CvError unless the model has two parts

    def manifest_updates(self) -> dict:
        return {**super().manifest_updates(), "key_law": "exchange"}


class SymmetricDefense(ExchangeDefense):
    """exchange + a sign critic in the loop (a vs -a) and an odd-moment penalty, weighted by cfg.weight."""

    name = "symmetric"

    def __init__(self, model, cfg: DefenseConfig, dist=None):
        super().__init__(model, cfg, dist)
        if cfg.weight < 0 or cfg.critic_steps < 1 or cfg.critic_lr <= 0:
            raise CvError("defense weight must be >= 0, critic steps >= 1 and critic lr > 0")
        channels = model.feature_shape[0]
        self.critic = SignCritic(channels, cfg.critic_width, cfg.pool)
        self.opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr, betas=(0.5, 0.9))

    def to(self, device):
        self.critic.to(device)
        return self

    def parameters(self):
        return list(self.critic.parameters())

    def _logits(self, a):
        s = _scaled(a)
        return self.critic(torch.cat((s, -s)))

    def update(self, a, b, x, step: int = 0) -> dict:
        """Critic steps on this batch's detached features (and the fools', which are features too)."""
        feats = torch.cat((a, b)).detach()
        n = feats.shape[0]
        target = torch.cat((torch.ones(n), torch.zeros(n))).to(feats.device)
        for _ in range(self.cfg.critic_steps):
            logits = self._logits(feats)
            loss = F.binary_cross_entropy_with_logits(logits, target)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        acc = float(((logits.detach() > 0).float() == target).float().mean())
        return {"sign_critic_loss": float(loss.detach()), "sign_critic_acc": acc}

    def extra_loss(self, a, b, x, step: int):
        """Encoder side: push the critic's logits on a and -a to 0 (it cannot tell them apart) and the
        odd moments to 0. The critic's parameters get no gradient from this (frozen for the call)."""
        if self.cfg.weight == 0:
            return a.new_zeros(()), {}
        for p in self.critic.parameters():
            p.requires_grad_(False)
        try:
            logits = self._logits(a)
        finally:
            for p in self.critic.parameters():
                p.requires_grad_(True)
        confusion = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 0.5))
        moments = odd_moments(a)
        loss = self.cfg.weight * (confusion + self.cfg.moment_weight * moments)
        return loss, {"sign_confusion": float(confusion.detach()), "odd_moments": float(moments.detach())}

    def state_dict(self) -> dict:
        return {"critic": self.critic.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        try:
            self.critic.load_state_dict(sd["critic"])
            self.opt.load_state_dict(sd["opt"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CvError(f"defense state does not match the {self.name} defense: {str(exc)[:200]}") from None


_CLASSES = {cls.name: cls for cls in (PaperDefense, ExchangeDefense, SymmetricDefense)}


def make_defense(name: str, model, cfg=None, dist=None) -> Defense:
    """The defense NAME for `model`, with its config (the class's config, a dict of its fields, or None
    for the defaults); `dist` (a cvconvert.dist.Dist) averages a shared critic's gradients under torchrun."""
    if name not in _CLASSES:
        raise CvError(f"unknown defense {name!r} (choose from {', '.join(DEFENSES)})")
    cls = _CLASSES[name]
    if cfg is None:
        cfg = cls.config_cls()
    elif isinstance(cfg, dict):
        known = {f.name for f in fields(cls.config_cls)}
        bad = sorted(set(cfg) - known)
        if bad:
            raise CvError(f"unknown defense option(s) {', '.join(bad)} (known: {', '.join(sorted(known))})")
        cfg = cls.config_cls(**cfg)
    return cls(model, cfg, dist)
