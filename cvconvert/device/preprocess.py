"""From a data set's own images to the model's input, the same way in training and on the device.

A model takes images of one size (the manifest's ``input_shape`` [C, H, W]); a data set's native images
may differ. Fashion-MNIST is 28x28 and training zero-pads it by 2 pixels to 32x32; CelebA is 178x218
(width x height) and training centre-crops it to 178x178, then resizes it to 64x64. These steps are a
small JSON spec, recorded in the manifest (``data.preprocess``) when a model is converted or trained:

    {"native": [28, 28], "steps": [{"pad": [2, 2, 2, 2]}]}                      # [H, W]; pad top, bottom, left, right
    {"native": [218, 178], "steps": [{"center_crop": [178, 178]}, {"resize": [64, 64]}]}
    {"native": null, "steps": [{"resize": [64, 64]}]}   # any size is resized in training: no native size

Training (cvconvert.data) builds its images with `apply_steps` and the spec of `spec_for`; `infer` and
the Pipeline call `to_model_input`, which applies the recorded steps to an image of the native size,
so the two cannot drift apart. An image of any other size is refused unless ``resize=True`` (bilinear,
with a warning): rescaling moves an image off the distribution the model was trained on.

numpy and Pillow only (no torch), so the device stays small. Pillow's bilinear resize is the one
torchvision's ``Resize`` applies to PIL images in training.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from ..errors import CvError

log = logging.getLogger("cvconvert.device.preprocess")
STEP_NAMES = ("pad", "center_crop", "resize")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def spec_for(name: str | None, input_shape) -> dict | None:
    """The preprocessing that training applies to data set `name` for a model taking `input_shape`
    [C, H, W]; None when training on `name` would not produce that shape (no steps are known)."""
    from ..datasets import DATASETS, dataset_info

    c, h, w = (int(v) for v in input_shape)
    if not name:
        return None
    if name.startswith("folder:"):  # ImageFolder: every image is resized, whatever its size
        return {"native": None, "steps": [{"resize": [h, w]}]}
    if name not in DATASETS or list(dataset_info(name).input_shape) != [c, h, w]:
        return None
    if name == "fashion-mnist":  # 28x28, zero border of 2 -> 32x32
        return {"native": [28, 28], "steps": [{"pad": [2, 2, 2, 2]}]}
    if name == "celeba":  # 178x218 aligned faces: centre square, then the model's size
        return {"native": [218, 178], "steps": [{"center_crop": [178, 178]}, {"resize": [h, w]}]}
    if name == "cub200":  # photos of every size
        return {"native": None, "steps": [{"resize": [h, w]}]}
    return {"native": [h, w], "steps": []}  # CIFAR: already the model's size


def check_spec(spec) -> dict | None:
    """`spec` if it is a well-formed preprocessing spec (or None), else a one-line CvError."""
    if spec is None:
        return None

    def pair(v, n=2):
        return isinstance(v, list) and len(v) == n and all(isinstance(d, int) and d >= 0 for d in v)

    bad = CvError(f"the manifest's data.preprocess is malformed: {str(spec)[:120]}")
    if not isinstance(spec, dict) or not isinstance(spec.get("steps"), list):
        raise bad
    if spec.get("native") is not None and not pair(spec["native"]):
        raise bad
    for step in spec["steps"]:
        if not isinstance(step, dict) or len(step) != 1:
            raise bad
        (op, arg), = step.items()
        if op not in STEP_NAMES:
            raise CvError(f"the manifest's data.preprocess has unknown step {op[:40]!r} (this cvconvert knows "
                          f"{', '.join(STEP_NAMES)})")
        if not pair(arg, 4 if op == "pad" else 2) or (op != "pad" and 0 in arg):
            raise bad
    return spec


def recorded_spec(manifest: dict) -> dict | None:
    """The spec a model dir records (``data.preprocess``); for model dirs written before it was
    recorded, the one of the data set the manifest names."""
    data = manifest.get("data") or {}
    if "preprocess" in data:
        return check_spec(data["preprocess"])
    name = ((manifest.get("history") or {}).get("data") or {}).get("name") or data.get("name")
    return spec_for(name, manifest["input_shape"])


def _resize(images: np.ndarray, size) -> np.ndarray:
    """Bilinear resize of [..., H, W] to `size` [h, w], plane by plane with Pillow (uint8 stays uint8)."""
    from PIL import Image

    h, w = size
    mode = "L" if images.dtype == np.uint8 else "F"
    planes = images.reshape((-1,) + images.shape[-2:])
    if mode == "F":
        planes = planes.astype(np.float32)
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(p), mode).resize((w, h), Image.Resampling.BILINEAR))
           for p in planes]
    return np.stack(out).reshape(images.shape[:-2] + (h, w))


def apply_steps(images: np.ndarray, spec: dict) -> np.ndarray:
    """The spec's steps on images [..., H, W] (uint8 0-255 or float 0-1; any leading axes, e.g. [N, C])."""
    out = images
    for step in check_spec(spec)["steps"]:
        (op, arg), = step.items()
        if op == "pad":  # zeros: black, as in training
            top, bottom, left, right = arg
            out = np.pad(out, [(0, 0)] * (out.ndim - 2) + [(top, bottom), (left, right)])
        elif op == "center_crop":  # torchvision's CenterCrop offsets (rounded half to even)
            ch, cw = arg
            h, w = out.shape[-2:]
            if ch > h or cw > w:
                raise CvError(f"cannot centre-crop {w}x{h} to {cw}x{ch}")
            top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
            out = out[..., top:top + ch, left:left + cw]
        else:
            out = _resize(out, arg)
    return np.ascontiguousarray(out)


def _as_array(image, channels: int, name: str, warn) -> np.ndarray:
    """A PIL image or an array -> [..., C, H, W] (uint8 from 8-bit images, else as given)."""
    if hasattr(image, "mode") and hasattr(image, "convert"):  # a PIL image
        src = 1 if image.mode in _GREY_MODES else 3
        target = "L" if channels == 1 else "RGB"
        if src != channels:
            warn(f"{name} has {src} channel(s), the model takes {channels}: converted to {target}")
        if image.mode != target:
            image = image.convert(target)
        arr = np.asarray(image)
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim not in (3, 4) or arr.shape[-3] != channels:
        raise CvError(f"{name} has shape {list(arr.shape)}; expected [C, H, W] or [N, C, H, W] with C = {channels}")
    if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        raise CvError(f"{name} has dtype {arr.dtype}; expected uint8 (0-255) or float (0-1)")
    return arr


def to_model_input(image, manifest: dict, *, resize: bool = False, name: str = "image",
                   warn: Callable[[str], None] | None = None) -> np.ndarray:
    """An image -> float32 [C, H, W] in [0, 1] (a batch [N, C, H, W] -> [N, C, H, W]) for the model of
    `manifest` (its ``input_shape`` and recorded ``data.preprocess``).

    image: a PIL image (channels converted to the model's grey/RGB, with a warning), or an array
    [C, H, W] / [N, C, H, W] / [H, W], uint8 0-255 or float 0-1. Its size decides what happens:
    the model's size -> unchanged; the data set's native size -> the recorded training steps
    (Fashion-MNIST 28x28: zero-padded to 32x32); any other size -> CvError, or with `resize` a bilinear
    resize and a warning. `warn` receives warnings (default: the ``cvconvert.preprocess`` logger)."""
    warn = warn or log.warning
    c, h, w = (int(v) for v in manifest["input_shape"])
    if c not in (1, 3):
        raise CvError(f"the model takes {c}-channel images; only grey (1) or RGB (3) images are read")
    arr = _as_array(image, c, name, warn)
    spec = recorded_spec(manifest)
    ih, iw = arr.shape[-2:]
    if (ih, iw) != (h, w):
        native = spec and spec.get("native")
        if native and [ih, iw] == list(native):
            arr = apply_steps(arr, spec)
            if arr.shape[-2:] != (h, w):
                raise CvError(f"the manifest's data.preprocess turns {iw}x{ih} into {arr.shape[-1]}x{arr.shape[-2]}, "
                              f"not the model's {w}x{h}")
        elif resize:
            warn(f"{name} resized from {iw}x{ih} to {w}x{h}")
            arr = _resize(arr, (h, w))
        else:
            also = (f", or {native[1]}x{native[0]} (the data set's own size, preprocessed as in training)"
                    if native and list(native) != [h, w] else "")
            raise CvError(f"{name} is {iw}x{ih}; the model takes {w}x{h}{also}: pass --resize to resize it")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    return arr.astype(np.float32, copy=True)


__all__ = ["spec_for", "check_spec", "recorded_spec", "apply_steps", "to_model_input"]
