"""The split network: encoder (device) -> processing (cloud) -> decoder (device), in four variants.

    complex     x = Q [g(I); g(I'_1); ...] -> Phi (equivariant) -> d((Q^T h)[0]), Q an orthogonal key
                (P = 2, key law rotation: the paper's x = e^{i theta}(g(I) + i g(I')))
    original    the source model cut at the same points (baseline 1)
    noisy       original with a + gamma * eps after the encoder (baseline 2)
    additional  original with the generator-shaped layers, no adversarial loss (baseline 3)

``model.encoder``, ``model.processing`` and ``model.decoder`` have exactly the signatures of the exported
graphs, so export needs no wrappers: for the complex variant encoder(image, fool [N,P-1,...], key [N,P,P])
-> x, processing(x) -> h, decoder(h, key) -> logits, with x and h in the part layout [N, P, C, H, W]
(P = 2: index 0 the real part, 1 the imaginary part); for the baselines encoder(image) -> a, processing(a) -> h,
decoder(h) -> logits.

Architectures come from the registry ``cvconvert.archs``, into which the zoo (zoo/) registers; the zoo
depends only on cvconvert's registry, converter and layers, never on this module, so the imports run one way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import archs
from . import split as splitlib
from .convert import LEAF_MODULES, to_complex
from .errors import CvError
from .device.keylaws import law_of
from .parts import KeyedDecoder, KeyedEncoder, check_parts, random_key
from .gan import Discriminator, Generator, NoiseInjection

VARIANTS = ("complex", "original", "noisy", "additional")


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, image):
        return (image - self.mean) / self.std


class FeatureEncoder(nn.Module):
    """image -> a: normalisation, the source model's first layers, then generator and/or noise."""

    def __init__(self, normalize, body, generator=None, noise=None):
        super().__init__()
        self.normalize, self.body, self.generator, self.noise = normalize, body, generator, noise

    def forward(self, image):
        a = self.body(self.normalize(image))
        if self.generator is not None:
            a = self.generator(a)
        if self.noise is not None:
            a = self.noise(a)
        return a


class Decoder(nn.Module):
    """h -> logits; ``bias`` is the last processing layer's bias, moved here because a bias is not
    rotation-equivariant but adding it after decoding gives back the source layer exactly."""

    def __init__(self, body: nn.Module | None, bias: torch.Tensor | None = None):
        super().__init__()
        self.body = body if body is not None else nn.Identity()
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, h):
        if self.bias is not None:
            h = h + self.bias
        return self.body(h)


@dataclass
class ModelSpec:
    """Everything needed to rebuild the architecture (the weights come from model.pt)."""

    arch: str
    encoder_end: str
    decoder_start: str | None
    variant: str = "complex"
    num_classes: int = 10
    input_shape: tuple[int, int, int] = (3, 32, 32)
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    activation_mode: str = "channel"
    activation_c: float = 1.0
    gamma: float = 0.0
    key_law: str | None = None  # how keys are drawn (cvconvert/device/keylaws.py); None: the default for P
    parts: int = 2  # x = Q [a; b_1; ...; b_{P-1}] with an orthogonal key Q (cvconvert/parts.py)

    @property
    def law(self):
        return law_of({"parts": self.parts, "key_law": self.key_law})


class SplitModel(nn.Module):
    def __init__(self, spec: ModelSpec, encoder, processing, decoder, discriminator=None, feature_shape=None):
        super().__init__()
        self.spec = spec
        self.encoder, self.processing, self.decoder = encoder, processing, decoder
        self.discriminator = discriminator
        self.feature_shape = feature_shape

    @property
    def is_complex(self) -> bool:
        return self.spec.variant == "complex"

    @property
    def parts(self) -> int:
        return self.spec.parts if self.is_complex else 2

    def features(self, image):
        """The real feature a (before rotation) of each image."""
        return (self.encoder.features if self.is_complex else self.encoder)(image)

    def random_key(self, n: int, device=None) -> torch.Tensor:
        """n secret keys [n, P, P] drawn by the model's key law (os.urandom)."""
        return random_key(n, self.parts, self.spec.law, device)

    def forward(self, image, fool=None, key=None):
        """key: [N, P, P] orthogonal (drawn by the key law if None); fool: [N, P-1, C, H, W]."""
        if not self.is_complex:
            return self.decoder(self.processing(self.encoder(image)))
        if fool is None:
            fool = torch.stack([image.roll(i, 0) if image.shape[0] > i else image.flip(-1)
                                for i in range(1, self.parts)], 1)
        if key is None:
            key = self.random_key(image.shape[0], image.device)
        return self.decoder(self.processing(self.encoder(image, fool, key)), key)


def _final_bias(gm) -> torch.Tensor | None:
    """Bias of the processing graph's last op when it is a Linear/Conv2d (moved to the decoder)."""
    out = list(gm.graph.nodes)[-1].args[0]
    if out.op == "call_module" and len(out.users) == 1:
        mod = gm.get_submodule(out.target)
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and mod.bias is not None:
            return mod.bias.detach().clone().reshape((-1,) + (1,) * (2 if isinstance(mod, nn.Conv2d) else 0))
    return None


def build_model(spec: ModelSpec, real: nn.Module | None = None) -> SplitModel:
    """Split (and for the complex variant, convert) a real model as the spec says."""
    if spec.variant not in VARIANTS:
        raise CvError(f"unknown variant {spec.variant!r} (choose from {', '.join(VARIANTS)})")
    check_parts(spec.parts)
    if spec.variant == "complex":
        _ = spec.law  # an unknown law, or one for another P, is a one-line CvError here
    if real is None:
        real = archs.create_model(spec.arch, spec.num_classes, spec.input_shape)
    parts = splitlib.split_model(real, spec.encoder_end, spec.decoder_start, LEAF_MODULES)
    normalize = Normalize(spec.mean, spec.std)
    probe = torch.zeros((2,) + tuple(spec.input_shape))
    with torch.no_grad():
        parts.encoder.eval()
        feat = tuple(parts.encoder(normalize(probe)).shape[1:])
    gan_shaped = spec.variant in ("complex", "additional")
    if gan_shaped and len(feat) != 3:
        raise CvError(f"the encoder ends in a {len(feat)}-D feature; the GAN needs a C,H,W feature map: split earlier")
    generator = Generator(feat[0]) if gan_shaped else None
    noise = NoiseInjection(spec.gamma) if spec.variant == "noisy" else None
    features = FeatureEncoder(normalize, parts.encoder, generator, noise)
    processing, bias = parts.processing, None
    if spec.variant == "complex":
        bias = _final_bias(processing)
        names = {n.name: q for n, q in parts.qualnames.items()}
        act = {"mode": spec.activation_mode, "c": spec.activation_c}
        processing = to_complex(processing, names, **act)
        encoder, decoder = KeyedEncoder(features, spec.parts), KeyedDecoder(Decoder(parts.decoder, bias))
    else:
        encoder, decoder = features, Decoder(parts.decoder)
    disc = Discriminator(feat[0]) if gan_shaped else None
    return SplitModel(spec, encoder, processing, decoder, disc, feat)
