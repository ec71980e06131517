"""How victims use the device, for the multi-query audit: the usage modes, and the two devices that
serve them, each through the product's ONNX runtime (``cvconvert.device.pipeline.Pipeline``) with a recording
``processing`` callable that keeps every x the cloud receives.

"before" is the old, unsafe device, simulated with the low-level ``Pipeline.encode``: fools are the other
images of a batch, or drawn with replacement from a fool folder, or taken from it in order without reuse
(its memory per pool: a second pool of the same photos hands out the same fools again), a repeat goes out
again with a fresh key and fool, and nothing guards against near-duplicates. "after" is the device as
shipped: ``Pipeline.predict`` with a device-private ``FoolPool`` (each fool used once, refused when used up)
and the near-duplicate guard, one memory (state folder) per mode, shared by the mode's stages (its pools
and model versions). ``after_device`` is the one place that builds it.

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

# Sizes per audit budget: requests of single images, the batch, the two fool folders, the repeats, the
# near-duplicates (images, each sent as itself and as its variant), the skewed stream (single-image requests
# of a few classes) and the images sent again under a second pool or model version.
SIZES = {
    "quick": {"requests": 24, "batch": 8, "small_pool": 8, "large_pool": 256, "repeat_images": 8, "repeat_calls": 4,
              "near_images": 8, "skewed": 24, "second_images": 8},
    "full": {"requests": 64, "batch": 32, "small_pool": 8, "large_pool": 1024, "repeat_images": 32,
             "repeat_calls": 4, "near_images": 32, "skewed": 64, "second_images": 32},
}
# the skewed stream's classes, by name (Fashion-MNIST's footwear, fine or coarse); data without them: class 0
SKEWED = ("Sandal", "Sneaker", "Ankle boot", "footwear")


def skewed_classes(class_names) -> list[int]:
    """The classes of the skewed stream: those of `class_names` named in SKEWED, else the first class."""
    return [i for i, n in enumerate(class_names) if str(n) in SKEWED] or [0]


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
class Stage:
    """Part of a mode that one device configuration serves: its requests [(image ids, pixels)], the photos
    its fool pool is made of (a fools source of ``modes``), and the model version that serves it (0: the
    audited model, 1: its second version, ``versions.second_version``)."""
    requests: list
    pool: str = "private"
    model: int = 0


@dataclass
class Mode:
    """One way of using the device: a list of requests [(image ids, pixels)], and where each device
    gets its fools: ``before`` (None: the other images of the request; else (source, with_replacement))
    and ``after`` (the fool pool's images). A mode of several stages (``stages``) is served by one device,
    one memory (the guard's state folder), stage after stage, each stage with a new fool pool of its
    photos (after), a new draw from them (before), under its model version; ``requests`` is then every
    stage's requests in order."""
    id: str
    label: str
    requests: list
    before: tuple | None
    after: str
    stages: list | None = None

    def plan(self) -> list[Stage]:
        return self.stages if self.stages is not None else [Stage(self.requests, self.after)]

    @property
    def versions(self) -> int:
        """How many model versions the mode needs."""
        return 1 + max(st.model for st in self.plan())


def staged(mid: str, label: str, stages: list[Stage]) -> Mode:
    return Mode(mid, label, [r for st in stages for r in st.requests], ("private", False), "private", stages)


def modes(sizes: dict, victims: np.ndarray, seed: int, labels: np.ndarray | None = None,
          classes=(), class_names=()) -> list[Mode]:
    """Every mode, over the victims' images (`labels`: their true classes, for the skewed stream of
    `classes`). Fool sources are named: "private" (test images no one else holds), "small"/"large" (the
    first fools of it), "public" (the attacker's own images)."""
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
    return out + later_modes(sizes, victims, labels, classes, class_names)


def later_modes(sizes: dict, victims: np.ndarray, labels, classes, class_names) -> list[Mode]:
    """The modes a device meets over time: a skewed stream (single-image requests of the victims of a few
    classes, picked by their true labels, against a pool of every class); the same images again through a
    second pool of the same photos, after as many new images (which the old device gives the first pool's
    fools again); and the same under a second model version (one device, one memory, in both)."""
    out = []
    if labels is not None:
        picked = np.flatnonzero(np.isin(labels, list(classes)))[:sizes.get("skewed", sizes["requests"])]
        names = ", ".join(str(class_names[c]) if c < len(class_names) else str(c) for c in classes)
        out.append(Mode("skewed", f"a skewed stream: {len(picked)} single-image requests of {names} only, fools of "
                        "every class", [([int(i)], victims[i:i + 1]) for i in picked], ("private", False), "private"))
    k = min(sizes.get("second_images", sizes["near_images"]), len(victims) // 2)
    one = lambda i: ([i], victims[i:i + 1])  # noqa: E731
    first, again = [one(i) for i in range(k)], [one(i) for i in range(k, 2 * k)] + [one(i) for i in range(k)]
    out.append(staged("second_pool", f"{k} images, then {k} new ones and the {k} again through a second pool of "
                      "the same photos", [Stage(first), Stage(again)]))
    out.append(staged("reexport", f"{k} images, then {k} new ones and the {k} again under a second model version "
                      "(its pool of the same photos)", [Stage(first), Stage(again, model=1)]))
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
    version: list = field(default_factory=list)  # the model version that computed each transmission
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


def _listed(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def run_before(pipes, mode: Mode, fools: dict, rule: str) -> Seen:
    """The old device: fools from the request itself, or from a folder with or without replacement (then
    taken in the folder's order). `pipes`: the runtime, or one per model version. Its memory was per pool:
    a stage of a staged mode is a new pool of the same photos, so each stage takes them from the first
    again, and an image sent before goes out again with a fresh key and fool."""
    pipes = _listed(pipes)
    seen = Seen()
    source, replace = mode.before if mode.before is not None else (None, True)
    for st in mode.plan():
        pipe, pool = pipes[st.model], fools.get(source if mode.stages is None else st.pool)
        used = 0
        for ids, images in st.requests:
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
            seen.version += [st.model] * len(images)
            seen.answers += list(pipe.decode(pipe.process(x), key))
    return seen


def after_device(model_dir, pool_images: np.ndarray, workdir: Path, processing, probe, pool_name: str = "pool"):
    """The shipped device: a fresh device-private fool pool of `pool_images` in `workdir`/`pool_name`
    (features by `probe`, a plain Pipeline of the same graphs), the guard on, its memory `workdir`/guard.npz
    (one per device: every pool and model version built in the same `workdir` shares it)."""
    from ..device.guard import SentGuard
    from ..device.pipeline import Pipeline

    feats = probe.features(pool_images)
    pool = FoolPool.create(workdir / pool_name, pool_images, feats, features_sha256=probe.features_sha256,
                           input_shape=probe.input_shape, feature_shape=feats.shape[1:])
    pipe = Pipeline.from_model_dir(model_dir, processing=processing, pool=pool, guard=SentGuard(workdir / "guard.npz"))
    pipe.on_warning = lambda msg: None  # "running low" is expected here
    return pipe


def run_after(model_dirs, runtimes, mode: Mode, fools: dict) -> Seen:
    """The shipped device over the mode's stages: `model_dirs` and `runtimes` (plain Pipelines of the same
    graphs), one per model version (or a single one). One temporary state folder per mode: the device's one
    memory, shared by its stages; each stage gets a new fool pool there."""
    model_dirs, runtimes = _listed(model_dirs), _listed(runtimes)
    seen = Seen()
    with tempfile.TemporaryDirectory(prefix="cvconvert-mq-") as tmp:
        for k, st in enumerate(mode.plan()):
            rec = Recorder(runtimes[st.model])
            pipe = after_device(model_dirs[st.model], fools[st.pool], Path(tmp), rec, runtimes[st.model], f"pool{k}")
            _serve(pipe, rec, st, seen)
    return seen


def _serve(pipe, rec: Recorder, st: Stage, seen: Seen) -> None:
    for ids, images in st.requests:
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
        seen.version += [st.model] * len(sent)
