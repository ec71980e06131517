"""The architecture registry, in the style of timm's ``_registry.py``: ``@register_model`` plus a wildcard
listing. The model families live in the zoo (``cvconvert.zoo``, the folder zoo/), which registers into
this module; cvconvert finds the zoo in one place, ``_zoo()``, on the first lookup, so the imports run
one way (the zoo imports cvconvert, nothing in cvconvert imports the zoo at import time).

Each entry declares its split presets as (encoder_end, decoder_start) pairs of torchvision-style dotted
node names; decoder_start None means the decoder is only the final unrotation (the paper's LeNet).
Any torchvision classification model is available too, with an explicit split.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .errors import CvError
from .registry import put

Split = tuple[str, "str | None"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    fn: Callable[..., nn.Module]
    splits: dict[str, Split] = field(default_factory=dict)
    default_split: str | None = None
    activation: tuple[str, float] = ("channel", 1.0)  # (mode, c) of the delta activation
    source: str = "zoo"
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(*, splits: dict[str, Split], default_split: str | None = None,
                   activation: tuple[str, float] = ("channel", 1.0), description: str = "",
                   name: str | None = None):
    def wrap(fn):
        entry_name = name or fn.__name__
        put(_REGISTRY, entry_name, ModelEntry(entry_name, fn, dict(splits), default_split, activation, "zoo",
                                              description or (fn.__doc__ or "").strip().splitlines()[0]),
            "architecture")
        return fn
    return wrap


def _zoo():
    """The zoo, imported (and so registered) on the first lookup: the one place cvconvert finds it."""
    import cvconvert.zoo
    return cvconvert.zoo


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm
    return sorted(tvm.list_models(module=tvm))


def list_models(pattern: str = "*", include_torchvision: bool = False) -> list[str]:
    _zoo()
    names = sorted(_REGISTRY)
    if include_torchvision:
        names += [n for n in _torchvision_names() if n not in _REGISTRY]
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def get_entry(name: str) -> ModelEntry:
    zoo = _zoo()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _torchvision_names():
        build = zoo.torchvision_model
        return ModelEntry(name, lambda num_classes, input_shape: build(name, num_classes, input_shape),
                          {}, None, ("channel", 1.0), "torchvision", "torchvision definition (explicit split)")
    raise CvError(f"unknown architecture {name!r} (see `cvconvert list`; torchvision names such as resnet18 work too)")


def resolve_split(entry: ModelEntry, split: str | None) -> tuple[str, Split]:
    """Return (split label, (encoder_end, decoder_start)) for a preset name or 'ENC_END:DEC_START'."""
    if split is None:
        split = entry.default_split
        if split is None:
            raise CvError(f"{entry.name} has no split preset: pass --split ENCODER_END:DECODER_START")
    if split in entry.splits:
        return split, entry.splits[split]
    if ":" in split:
        enc, dec = split.split(":", 1)
        if not enc:
            raise CvError(f"split {split!r} leaves the encoder empty")
        return split, (enc, dec or None)
    presets = ", ".join(entry.splits) or "none"
    raise CvError(f"unknown split {split!r} for {entry.name} (presets: {presets}; or ENCODER_END:DECODER_START)")


def create_model(name: str, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    return get_entry(name).fn(num_classes=num_classes, input_shape=tuple(input_shape))
