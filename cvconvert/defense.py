"""Phase-hiding defenses for training the complex variant (issue 8).

Why theta leaks. x = e^{i theta}(a + ib) with a = g(I), b = g(I'). Rotating x by j pi/2 gives the four
readings (a, b), (-b, a), (-a, -b), (b, -a). When the law of a is not sign-symmetric (always so in
practice: Fashion-MNIST's constant background alone maps to a fixed non-zero feature), only the reading
(a, b) looks natural, so a learned attacker finds theta exactly and the real part a, hence I.

Defense ``exchange`` (structural, no extra loss). The encoder multiplies the fool's feature by
s = quadrant_sign(theta) (+1 when theta is in the 1st/3rd quarter-circle, -1 otherwise):
x = e^{i theta}(a + i s b). For s = -1, x = e^{i(theta - pi/2)}(b + i a): the one natural reading now
holds the FOOL in its real part. The angle phi of the natural reading is uniform on the 1st/3rd quarters
whatever s is, and a, b are exchangeable (I' is drawn from the same data), so no attacker, however
strong, can tell the two cases apart: it must bet between theta = phi and theta = phi - pi/2.
Any estimator's mean circular error is then >= pi/4 = 0.785 rad, and an attacker that decodes the
natural reading gets the real image only half of the time (the other half it gets I'). What it does
NOT hide: the pair {I, I'} (Re x, Im x span {a, b}) and anything rotation-invariant (|x|). s is a
function of the secret theta, so the decoder and the ONNX contracts are unchanged; the model dir records
``"fool_sign": "quadrant"`` in its manifest (``ModelSpec.fool_sign``).

Defense ``symmetric`` = ``exchange`` + a cheap in-the-loop sign critic C (a down-sampled, 3-layer CNN
without batch-norm) trained to tell a from -a, the encoder being rewarded for confusing it (logits
pushed to 0) and for zero odd moments (per-channel mean and skewness of a). If the law of a became
sign-symmetric, all four readings would look natural and the best angle error would rise to pi/2
(chance); the weight of this term is what `experiments/defense_sweep.py` sweeps.

Defense ``paper``: the paper's Eqs. 8-9 as `cvconvert train` implements them (its WGAN-GP term); the
defense object adds nothing.

API (what `cvconvert train --defense NAME` needs; a few lines in Trainer):

    d = make_defense(name, model, cfg)         # cfg: DefenseConfig, a dict of its fields, or None
    d.uses_paper_gan                          # keep the Trainer's own WGAN-GP term? (True for "paper")
    x = model.encoder.combine(a, b, theta)    # instead of encode(a, b, theta) in Trainer._task
    stats = d.update(a, b, x)                 # in-loop critic step(s); detaches its inputs itself
    loss, stats = d.extra_loss(a, b, x, step) # add `loss` (already weighted) to the task loss
    d.manifest_updates()                      # merge into the manifest when saving ({"fool_sign": ...})
    d.state_dict() / d.load_state_dict(sd)    # critic + its optimizer, for checkpoints
    d.parameters()                            # the critic's parameters (not the model's)

``make_defense`` sets ``model.encoder.fool_sign`` (and ``model.spec.fool_sign``) for exchange/symmetric.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CvError

DEFENSES = ("paper", "exchange", "symmetric")


@dataclass
class DefenseConfig:
    weight: float = 0.1          # weight of the symmetric defense's loss (critic confusion + odd moments)
    critic_lr: float = 1e-3
    critic_steps: int = 1        # critic updates per call of update()
    critic_width: int = 16
    pool: int = 2                # the critic sees a average-pooled by this factor (cheap)
    moment_weight: float = 1.0   # relative weight of the odd-moment term inside `weight`


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
    """The no-op base: the paper's training (its WGAN-GP term stays in the Trainer)."""

    name = "paper"
    uses_paper_gan = True

    def __init__(self, model, cfg: DefenseConfig):
        self.model, self.cfg = model, cfg

    def extra_loss(self, a, b, x, step: int):
        return a.new_zeros(()), {}

    def update(self, a, b, x) -> dict:
        return {}

    def parameters(self):
        return []

    def manifest_updates(self) -> dict:
        return {"defense": {"name": self.name, **asdict(self.cfg)}}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass

    def to(self, device):
        return self


class ExchangeDefense(Defense):
    """The fool's sign follows theta's quarter-circle (see the module docstring); no extra loss."""

    name = "exchange"
    uses_paper_gan = False

    def __init__(self, model, cfg: DefenseConfig):
        super().__init__(model, cfg)
        if not getattr(model, "is_complex", False):
            raise CvError(f"the {self.name} defense needs a complex model (this one is {model.spec.variant!r})")
        model.encoder.fool_sign = "quadrant"
        model.spec.fool_sign = "quadrant"

    def manifest_updates(self) -> dict:
        return {**super().manifest_updates(), "fool_sign": "quadrant"}


class SymmetricDefense(ExchangeDefense):
    """exchange + a sign critic in the loop (a vs -a) and an odd-moment penalty, weighted by cfg.weight."""

    name = "symmetric"

    def __init__(self, model, cfg: DefenseConfig):
        super().__init__(model, cfg)
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

    def update(self, a, b, x) -> dict:
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


_CLASSES = {"paper": Defense, "exchange": ExchangeDefense, "symmetric": SymmetricDefense}


def make_defense(name: str, model, cfg: DefenseConfig | dict | None = None) -> Defense:
    if name not in _CLASSES:
        raise CvError(f"unknown defense {name!r} (choose from {', '.join(DEFENSES)})")
    if cfg is None:
        cfg = DefenseConfig()
    elif isinstance(cfg, dict):
        known = {f.name for f in fields(DefenseConfig)}
        bad = sorted(set(cfg) - known)
        if bad:
            raise CvError(f"unknown defense option(s) {', '.join(bad)} (known: {', '.join(sorted(known))})")
        cfg = DefenseConfig(**cfg)
    return _CLASSES[name](model, cfg)
