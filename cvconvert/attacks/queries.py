"""How victims use the device, for the multi-query audit: the usage modes, and the two devices that
serve them, each through the product's ONNX runtime (``cvconvert.device.pipeline.Pipeline``) with a recording
``processing`` callable that keeps every x the cloud receives.

"before" is the old, unsafe device, simulated with the low-level ``Pipeline.encode``: fools are the other
images of a batch, or drawn with replacement from a fool folder, a repeat goes out again with a fresh key
and fool, and nothing guards against near-duplicates. "after" is the device as shipped: ``Pipeline.predict``
with a device-private ``FoolPool`` (each fool used once, refused when used up) and the near-duplicate
guard. ``after_device`` is the one place that builds it.

The images and fools here are the audit's own test images; the secret keys come from os.urandom inside
the runtime and are never written.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CvError
from ..device.fools import FoolPool, choose_fools
from ..device.keylaws import draw_keys

# Sizes per audit budget: requests of single images, the batch, the two fool folders, the repeats and
# the near-duplicates (images, each sent as itself and as its variant).
SIZES = {
    "quick": {"requests": 24, "batch": 8, "small_pool": 8, "large_pool": 256, "repeat_images": 8, "repeat_calls": 4,
              "near_images": 8},
    "full": {"requests": 64, "batch": 32, "small_pool": 8, "large_pool": 1024, "repeat_images": 32,
             "repeat_calls": 4, "near_images": 32},
}


# --- near-duplicates: what a second upload of "the same" picture looks like ----------------------------

def noise(level: int, seed: int):
    def f(image: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(seed)  # the perturbation is not a secret: a seeded generator is fine
        return np.clip(image + rng.choice([-1.0, 1.0], image.shape) * level / 255, 0, 1).astype(np.float32)
    return f


def shift(image: np.ndarray) -> np.ndarray:
    """One pixel to the right, the left edge repeated."""
    return np.concatenate([image[..., :1], image[..., :-1]], axis=-1)


def jpeg(quality: int):
    def f(image: np.ndarray) -> np.ndarray:
        from PIL import Image

        pixels = np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)
        pic = Image.fromarray(pixels[0] if len(pixels) == 1 else pixels.transpose(1, 2, 0))
        buf = io.BytesIO()
        pic.save(buf, format="JPEG", quality=quality)
        back = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255
        return (back[None] if back.ndim == 2 else back.transpose(2, 0, 1)).astype(np.float32)
    return f


def _pil(op):
    """An operation on a PIL picture, applied to a [C, H, W] image in [0, 1] (8-bit, as a camera saves it)."""
    def f(image: np.ndarray) -> np.ndarray:
        from PIL import Image

        pixels = np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)
        pics = [Image.fromarray(ch) for ch in pixels]
        return np.stack([np.asarray(op(p), np.float32) / 255 for p in pics]).astype(np.float32)
    return f


def crop1(image: np.ndarray) -> np.ndarray:
    """One pixel cropped off every side, resized back (bilinear)."""
    h, w = image.shape[-2:]
    from PIL import Image
    return _pil(lambda p: p.crop((1, 1, w - 1, h - 1)).resize((w, h), Image.BILINEAR))(image)


def rotate(degrees: float):
    from PIL import Image
    return _pil(lambda p: p.rotate(degrees, Image.BILINEAR))


NEAR = {"shift1": ("one-pixel shift", shift), "crop1": ("1-px crop", crop1), "rot3": ("3-degree rotation", rotate(3)),
        "jpeg70": ("JPEG quality 70", jpeg(70))}


def lookalikes(images: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """For each image, the index of its nearest picture in `pool` (mean squared pixel distance), itself excluded
    where the pool holds it: the look-alike a second, different photo of the same thing would be."""
    a = images.reshape(len(images), -1).astype(np.float32)
    b = pool.reshape(len(pool), -1).astype(np.float32)
    d = (a ** 2).sum(1)[:, None] - 2 * a @ b.T + (b ** 2).sum(1)[None]
    d[d < 1e-9] = np.inf
    return d.argmin(1)


def brightness(factor: float):
    return lambda image: np.clip(image * factor, 0, 1).astype(np.float32)


# --- the modes ---------------------------------------------------------------------------------------------

@dataclass
class Mode:
    """One way of using the device: a list of requests [(image ids, pixels)], and where each device
    gets its fools: ``before`` (None: the other images of the request; else (source, with_replacement))
    and ``after`` (the fool pool's images)."""
    id: str
    label: str
    requests: list
    before: tuple | None
    after: str


def modes(sizes: dict, victims: np.ndarray, seed: int) -> list[Mode]:
    """Every mode, over the victims' images. Fool sources are named: "private" (test images no one else
    holds), "small"/"large" (the first fools of it), "public" (the attacker's own images)."""
    s = sizes
    n_req = min(s["requests"], len(victims))
    single = [([i], victims[i:i + 1]) for i in range(n_req)]
    rep = [([i], victims[i:i + 1]) for i in range(min(s["repeat_images"], len(victims)))
           for _ in range(s["repeat_calls"])]
    near = [("noise1", "near-duplicate: pixel noise 1/255", noise(1, seed)),
            ("noise4", "near-duplicate: pixel noise 4/255", noise(4, seed)),
            ("shift1", "near-duplicate: one-pixel shift", shift),
            ("jpeg90", "near-duplicate: JPEG quality 90", jpeg(90)),
            ("crop1", "near-duplicate: 1-px crop", crop1),
            ("rot3", "near-duplicate: 3-degree rotation", rotate(3)),
            ("jpeg70", "near-duplicate: JPEG quality 70", jpeg(70)),
            ("bright5", "near-duplicate: brightness +5%", brightness(1.05))]
    k = min(s["near_images"], len(victims))
    out = [Mode("batch", f"one request with a batch of {min(s['batch'], len(victims))} images",
                [(list(range(min(s["batch"], len(victims)))), victims[:s["batch"]])], None, "private"),
           Mode("small_pool", f"{n_req} single-image requests, a folder of {s['small_pool']} fools", single,
                ("small", True), "small"),
           Mode("large_pool", f"{n_req} single-image requests, a folder of {s['large_pool']} fools", single,
                ("large", True), "large"),
           Mode("repeat", f"the same image in {s['repeat_calls']} requests", rep, ("private", False), "private"),
           Mode("public_fool", f"{n_req} single-image requests, fools from public data", single, ("public", True),
                "public")]
    for mid, label, f in near:
        reqs = [r for i in range(k) for r in (([i], victims[i:i + 1]), ([i], f(victims[i])[None]))]
        out.append(Mode(mid, label, reqs, ("private", False), "private"))
    look = lookalikes(victims[:k], victims)
    out.append(Mode("lookalike", "look-alikes: an image, then the victims' nearest other image",
                    [r for i in range(k) for r in (([i], victims[i:i + 1]), ([int(look[i])], victims[look[i]][None]))],
                    ("private", False), "private"))
    out.append(Mode("control", f"control: {n_req} distinct images, each with a never-reused fool", single,
                    ("private", False), "private"))
    return out


# --- the devices -------------------------------------------------------------------------------------------

@dataclass
class Seen:
    """What the cloud received (x per transmission) and, for scoring only, which image each carried and
    the device's answer; ``keys`` only where the simulation knows them (the "before" device)."""
    x: list = field(default_factory=list)
    ids: list = field(default_factory=list)
    answers: list = field(default_factory=list)
    keys: list = field(default_factory=list)
    pixels: list = field(default_factory=list)  # what each transmission carried (scoring only)
    held_back: int = 0      # images answered from the device's cache instead of being sent
    refused: int = 0        # requests the device refused
    messages: list = field(default_factory=list)


class Recorder:
    """The cloud: a processing callable that keeps every x and runs the real processing graph."""

    def __init__(self, local):
        self.local, self.received = local, []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.received.append(np.array(x, dtype=np.float32, copy=True))
        return self.local.process(x)


def run_before(pipe, mode: Mode, fools: dict, rule: str) -> Seen:
    """The old device: fools from the request itself, or from a folder with or without replacement."""
    seen = Seen()
    source, replace = mode.before if mode.before is not None else (None, True)
    pool = fools.get(source)
    used = 0
    for ids, images in mode.requests:
        if pool is None or replace:
            f, _ = choose_fools(images, pool, rule)   # the old rule: other batch images, or a draw with replacement
        else:
            if used + len(images) > len(pool):
                raise CvError(f"the multi-query audit needs more test images ({used + len(images)} fresh fools)")
            f, used = pool[used:used + len(images)], used + len(images)
        key = draw_keys(pipe.law, len(images), pipe.parts)  # the model's key law, from os.urandom
        x = pipe.encode(images, f[:, None], key)
        seen.x += list(x)
        seen.ids += ids
        seen.pixels += list(images)
        seen.keys += list(key)
        seen.answers += list(pipe.decode(pipe.process(x), key))
    return seen


def after_device(model_dir, pool_images: np.ndarray, workdir: Path, processing, probe):
    """The shipped device: a fresh device-private fool pool of `pool_images` in `workdir` (features by
    `probe`, a plain Pipeline of the same graphs), the guard on."""
    from ..device.pipeline import Pipeline

    feats = probe.features(pool_images)
    pool = FoolPool.create(workdir / "pool", pool_images, feats, features_sha256=probe.features_sha256,
                           input_shape=probe.input_shape, feature_shape=feats.shape[1:])
    from ..device.guard import SentGuard

    # a device of its own per mode (the guard is one memory per device: modes must not share it)
    pipe = Pipeline.from_model_dir(model_dir, processing=processing, pool=pool, guard=SentGuard(workdir / "guard.npz"))
    pipe.on_warning = lambda msg: None  # "running low" is expected here
    return pipe


def run_after(model_dir, local, mode: Mode, fools: dict) -> Seen:
    seen = Seen()
    rec = Recorder(local)
    with tempfile.TemporaryDirectory(prefix="cvconvert-mq-") as tmp:
        pipe = after_device(model_dir, fools[mode.after], Path(tmp), rec, local)
        for ids, images in mode.requests:
            before = len(rec.received)
            try:
                logits = pipe.predict(images)
            except CvError as exc:
                seen.refused += 1
                seen.messages.append(str(exc).splitlines()[0])
                continue
            held = set(pipe.last.get("repeats", []))
            sent = [i for i in range(len(images)) if i not in held]
            seen.held_back += len(held)
            x = np.concatenate(rec.received[before:]) if len(rec.received) > before else np.zeros((0,))
            seen.x += list(x)
            seen.ids += [ids[i] for i in sent]
            seen.pixels += [images[i] for i in sent]
            seen.answers += [logits[i] for i in sent]
    return seen
