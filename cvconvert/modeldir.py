"""The model directory every command reads and writes (README, "The model directory"):

    DIR/cvconvert.json   manifest (format version, arch, split, shapes, normalisation, variant, ...)
    DIR/model.pt         state_dict, plain tensors (torch.load(weights_only=True))
    DIR/onnx/*.onnx      written by export

Every write goes to a temporary file or folder first and is renamed into place, so an interrupted
command never leaves a half-written model behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .device.artifacts import (FORMAT, MANIFEST, WEIGHTS, atomic_json, atomic_write, locked,  # noqa: F401
                               new_manifest, read_manifest)
from .device.artifacts import _umask
from .errors import CvError, one_line


def atomic_torch_save(obj, path) -> None:
    import torch
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def check_output_dir(path: Path, force: bool) -> None:
    if path.exists() and not path.is_dir():
        raise CvError(f"output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise CvError(f"output directory {path} is not empty (use --force to replace it)")


def swap_dir(tmp: Path, target: Path) -> None:
    """Put the finished folder tmp in target's place; an existing target is moved aside, then removed."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_model_dir(path: Path | str, state_dict: dict, manifest: dict, force: bool = False) -> Path:
    """Write a whole model dir into a temporary sibling, then swap it into place."""
    import torch

    path = Path(path)
    check_output_dir(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        torch.save(state_dict, tmp / WEIGHTS)
        atomic_json(manifest, tmp / MANIFEST)
        swap_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def spec_from_manifest(m: dict):
    from .device.keylaws import law_of
    from .model import ModelSpec
    return ModelSpec(arch=m["arch"], encoder_end=m["encoder_end"], decoder_start=m["decoder_start"],
                     variant=m["variant"], num_classes=m["num_classes"], input_shape=tuple(m["input_shape"]),
                     mean=m["normalization"]["mean"], std=m["normalization"]["std"],
                     activation_mode=m["activation"]["mode"], activation_c=m["activation"]["c"],
                     gamma=m.get("gamma", 0.0), key_law=law_of(m).name if m["variant"] == "complex" else None,
                     parts=int(m.get("parts", 2)))


def torch_load(file: Path | str, failure: str):
    """torch.load of plain tensors only (weights_only); any failure is one CvError line `failure: why`."""
    import torch
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CvError(f"{failure}: {one_line(exc, 200)}") from None


def load_state_dict(file: Path | str) -> dict:
    file = Path(file)
    if not file.is_file():
        raise CvError(f"weights file {file} does not exist")
    sd = torch_load(file, f"cannot load weights {file}")
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # a training checkpoint
    if not isinstance(sd, dict):
        raise CvError(f"weights file {file} does not hold a state_dict")
    return sd


def load_into(module, sd: dict, what: str) -> None:
    """load_state_dict(strict=True) with the mismatch turned into one line."""
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][1:2] or [str(exc)]
        raise CvError(f"{what} does not match the model: {first[0][:300]}") from None


def load_model(path: Path | str, weights: str | None = None):
    """Rebuild the SplitModel from the manifest and load model.pt (or `weights`)."""
    from .model import build_model
    path = Path(path)
    manifest = read_manifest(path)
    model = build_model(spec_from_manifest(manifest))
    file = Path(weights) if weights else path / WEIGHTS
    load_into(model, load_state_dict(file), f"weights {file}")
    return model, manifest
