"""`convert` as a library call: zoo model (+ weights) -> SplitModel -> model directory."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import archs
from .datasets import dataset_info
from .errors import CvError
from .model import VARIANTS, ModelSpec, build_model
from .parts import check_parts
from .modeldir import (MANIFEST, WEIGHTS, check_output_dir, load_into, load_state_dict, new_manifest,
                       write_model_dir)
from .device.preprocess import spec_for

# Where each real-model key sits inside a SplitModel state_dict (original/noisy/additional/complex).
_PART_PREFIXES = ("encoder.features.body.", "encoder.body.", "processing.", "decoder.decoder.body.", "decoder.body.")


def real_state_dict(sd: dict, real: nn.Module) -> dict:
    """Accept a plain state_dict of the real model, or one of a SplitModel (e.g. a trained original)."""
    own = real.state_dict()
    if set(sd) & set(own):
        return sd
    out = {}
    for key, val in sd.items():
        for p in _PART_PREFIXES:
            if key.startswith(p) and key[len(p):] in own:
                out[key[len(p):]] = val
                break
    return out


def load_real_weights(real: nn.Module, weights: Path) -> None:
    weights = Path(weights)
    file = weights / WEIGHTS if weights.is_dir() else weights
    sd = real_state_dict(load_state_dict(file), real)
    load_into(real, sd, f"weights {weights}")


def convert_to_dir(arch: str, output: Path, *, split=None, variant="complex", data="fashion-mnist", task="fine",
                   input_shape=None, num_classes=None, weights=None, gamma=0.5, k=8, activation=None, c=None,
                   force=False, key_law: str | None = None, seed: int | None = None, parts: int = 2) -> dict:
    """seed: initialise every random weight from it (variants converted with the same seed start from
    the same real weights); None draws them from torch's global generator as before.
    parts: P in 2..4, the image's feature hidden among P-1 fools by an orthogonal key; key_law: how the
    device draws it (cvconvert/device/keylaws.py; None: rotation, the paper's angle, for P = 2, else haar)."""
    if variant not in VARIANTS:
        raise CvError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
    parts = check_parts(parts)
    if (parts > 2 or key_law) and variant != "complex":  # the baselines send one real feature, no key
        raise CvError(f"--parts {parts} / --key-law need the complex variant (this one is {variant!r})")
    if k < 2:
        raise CvError("--k must be at least 2 (one real feature and at least one rotated negative)")
    output = Path(output)
    check_output_dir(output, force)  # fail before any work
    entry = archs.get_entry(arch)
    label, (enc_end, dec_start) = archs.resolve_split(entry, split)
    info = dataset_info(data, task)
    shape = tuple(input_shape or info.input_shape)
    classes = num_classes or info.num_classes
    mean, std = list(info.mean), list(info.std)
    if len(mean) != shape[0]:  # a data set's stats only fit its own channel count
        mean, std = [0.5] * shape[0], [0.5] * shape[0]
    mode, cval = entry.activation
    mode, cval = activation or mode, c if c is not None else cval
    if mode not in ("fixed", "channel"):
        raise CvError(f"unknown activation {mode!r} (fixed or channel)")
    if seed is not None and not 0 <= seed < 2 ** 63:
        raise CvError(f"--seed {seed}: must be between 0 and 2^63 - 1")
    spec = ModelSpec(arch, enc_end, dec_start, variant, classes, shape, mean, std, mode, float(cval), float(gamma),
                     key_law, parts)
    with torch.random.fork_rng(devices=[]):  # a seed never changes the caller's generator
        if seed is not None:
            torch.manual_seed(seed)
        try:
            real = archs.create_model(arch, classes, shape)
        except (ValueError, RuntimeError) as exc:
            raise CvError(f"cannot build {arch} for input {shape}: {exc}") from None
        if weights is not None:
            load_real_weights(real, weights)
        model = build_model(spec, real)
    manifest = new_manifest(
        arch=arch, split=label, encoder_end=enc_end, decoder_start=dec_start, variant=variant,
        num_classes=classes, input_shape=list(shape), normalization={"mean": mean, "std": std},
        feature_shape=list(model.feature_shape), activation={"mode": mode, "c": float(cval)}, k=k,
        gamma=float(gamma), class_names=info.class_names if classes == info.num_classes else
        [str(i) for i in range(classes)],
        data={"name": data, "task": info.task, "multilabel": info.multilabel, "preprocess": spec_for(data, shape)},
        source_weights=str(weights) if weights else None, history={},
        **({"init_seed": seed} if seed is not None else {}),
        **({"parts": parts, "key_law": spec.law.name} if variant == "complex" else {}))
    write_model_dir(output, model.state_dict(), manifest, force=force)
    return manifest


__all__ = ["convert_to_dir", "real_state_dict", "MANIFEST"]
