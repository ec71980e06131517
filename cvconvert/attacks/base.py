"""What every attack of the audit shares: the attacker's public knowledge and three small interfaces.

    AngleAttack           fit(public) -> self;  estimate(x) -> theta_hat [N]
    ReconstructionAttack  fit(public) -> self;  reconstruct(x) -> images [N, C, H, W]
    PropertyAttack        fit(inputs, props, monitor=None) -> self;  predict(inputs) -> logits or labels

``public`` is what the attacker holds: the released weights (through ``tr["a"]``, the public encoder's
features of its own images, and ``combine``, the encoder's way of forming x), its own images, and the
deployment's fool rule. It never holds the victim's theta, image or fool.

P-part models (the row audit, attacks/parts_stages.py) add two fitted-on-public kinds: the best rotation
search (``estimate(x)`` -> R_hat [N, P, P], rowsearch.py) and the which-row classifier (``pick(rows)`` ->
index [N], whichrow.py); their reconstruction and property attacks use the interfaces below.

Each attack has a stable ``id`` (the key of its report row, which code looks rows up by) and a
``label`` (the row's text, free to change). ``history`` maps a label to the per-epoch numbers its
training logged; the audit copies it into report.json. ``limit`` (when set) is how many victims an
expensive attack is run on. ``stage`` names the timing bucket it is counted in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .budget import Budget
from .common import partners
from .metrics import reconstruction


@dataclass
class Public:
    """The attacker's knowledge and tools (device, budget, checkpointing trainer, progress bars)."""
    device: torch.device
    budget: Budget
    trainer: object
    progress: object
    seed: int
    tr: dict = field(default_factory=dict)   # {"images": its own images, "a": their public features}
    combine: object = None                   # (a, b, theta) -> x, as the public encoder forms it
    fool_rule: str = "random"                # how the victim's device picks fools (known, Kerckhoffs)
    partners: object = partners              # (idx, n, gen) -> each index's simulated fool, by that rule
    encoder: object = None                   # the released encoder (white-box attacks run through it)
    n_props: int = 0                         # outputs of a property classifier (classes or attributes)
    cache: dict = field(default_factory=dict)  # work that several attacks share (e.g. a calibration)


class Memo:
    """Per-input memory of a costly estimate, so attacks that build on one (a* from an angle attack)
    do not repeat it. Keyed by the input tensor's identity; keeps the last few."""

    def __init__(self, keep: int = 3):
        self.keep, self.items = keep, []

    def get(self, x, compute):
        for key, value in self.items:
            if key is x:
                return value
        value = compute(x)
        self.items = ([(x, value)] + self.items)[:self.keep]
        return value


class _FitsOnPublic:
    """fit(public) once (later calls return self): the attacker trains on what it holds."""
    id = label = ""
    limit: int | None = None

    def __init__(self):
        self.fitted = False
        self.history = {}

    def fit(self, public: Public):
        if not self.fitted:
            self.public = public
            self._fit(public)
            self.fitted = True
        return self

    def _fit(self, public: Public) -> None:
        pass


class AngleAttack(_FitsOnPublic):
    """Estimates the secret angle of each transmitted x. Subclasses set id/label and implement
    ``_fit`` and ``_estimate``."""
    stage = "angle attacks"

    def __init__(self):
        super().__init__()
        self._memo = Memo()

    def estimate(self, x: torch.Tensor) -> torch.Tensor:
        return self._memo.get(x, self._estimate)

    def _estimate(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ReconstructionAttack(_FitsOnPublic):
    """Reconstructs the input image of each transmission (x for the complex model, the feature a
    for a real baseline). ``score`` turns its output into a report row's numbers."""
    stage = "reconstruction attacks"

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, images: torch.Tensor, truth: torch.Tensor) -> dict:
        return reconstruction(images, truth)

    def pictures(self, images: torch.Tensor, k: int) -> list:
        """(row label, first k images) for the reconstructions figure."""
        return [(self.label.split(":")[0] + ": " + self.label.split(": ", 1)[-1][:40], images[:k])]


class PropertyAttack:
    """Infers a hidden property from some view of the transmission (a*, dec(a*), |x|, ...)."""
    id = label = ""
    stage = "property inference"

    def __init__(self):
        self.fitted = False
        self.history = {}

    def fit(self, inputs: torch.Tensor, props: torch.Tensor, monitor=None) -> "PropertyAttack":
        raise NotImplementedError

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
