"""The device's policy over the graph runner: where fools come from, which keys are drawn, what the guard
lets through. Every rule a device follows before anything leaves it lives here (or in the modules it calls:
`fools`, `guard`, `keys`), so the CLI and any library caller get the same behaviour.

    pipe = Pipeline.from_model_dir("out/lenet", pool=FoolPool.open("pool"))
    logits = pipe.predict(images)                 # a fresh secret key per image, each fool used once
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CvError
from .artifacts import ONNX_DIR, read_manifest
from .fools import FoolPool, fallback_fool, low_water
from .graphs import GraphRunner
from .guard import GUARD_FILE, NoGuard, SentGuard, default_guard_path  # noqa: F401 (GUARD_FILE: its file name)
from .keys import haar_orthogonal, secure_angles


class Pipeline(GraphRunner):
    """GraphRunner plus the device's rules. pool: a FoolPool (device-private fools, each used once).
    guard: True (the query guard in the device's state folder, `guard.state_dir()`, shared by every pool and
    model version), a SentGuard, or None (off).
    """

    def __init__(self, encoder, processing, decoder, manifest: dict, *, provider: str = "auto",
                 verify: bool = True, features=None, pool: FoolPool | None = None, guard=True):
        super().__init__(encoder, processing, decoder, manifest, provider=provider, verify=verify, features=features)
        self.last = {}  # what the last predict did: sent / cached counts, fool source, pool remaining
        self.pool = self._check_pool(pool)
        self.guard = self._make_guard(guard)

    def _check_pool(self, pool):
        if pool is None:
            return None
        if not self.complex:
            raise CvError(f"a fool pool is for complex models; this one is {self.manifest.get('variant')!r}")
        if pool.meta.get("features_sha256") != self.features_sha256:
            raise CvError(f"the fool pool {pool.path} holds features of another model (or of an earlier export): "
                          "create a new pool for these graphs with `cvconvert fools create`")
        return pool

    def _make_guard(self, guard):
        if guard is None or guard is False or not self.complex:
            return NoGuard()
        if guard is True:
            return SentGuard(default_guard_path())
        return guard

    @classmethod
    def from_model_dir(cls, model_dir, *, provider: str = "auto", processing=None, verify: bool = True,
                       pool: FoolPool | None = None, guard=True):
        model_dir = Path(model_dir)
        manifest = read_manifest(model_dir)
        onnx_dir = model_dir / ONNX_DIR
        if not onnx_dir.is_dir():
            raise CvError(f"{model_dir} has no {ONNX_DIR}/ folder: run `cvconvert export {model_dir}` first")
        feats = onnx_dir / "features.onnx"
        return cls(onnx_dir / "encoder.onnx", processing if processing is not None else onnx_dir / "processing.onnx",
                   onnx_dir / "decoder.onnx", manifest, provider=provider, verify=verify,
                   features=feats if feats.is_file() else None, pool=pool, guard=guard)

    def new_keys(self, n: int) -> np.ndarray:
        """n fresh secret keys from os.urandom: angles, or Haar orthogonal [n, P, P] for P parts."""
        return secure_angles(n) if self.parts == 2 else haar_orthogonal(n, self.parts)

    # -- the device's rules ----------------------------------------------------------------------------
    def predict(self, images: np.ndarray, fools: np.ndarray | None = None, theta: np.ndarray | None = None) -> np.ndarray:
        """Logits for a batch of images (pixels in [0, 1], [N, C, H, W]).

        Complex models follow the device's rule that no feature vector appears in two transmissions: each
        image's fool comes from the pool and is never used again (no pool: a fresh noise fool, which the
        exchange defense refuses); theta is fresh per image (os.urandom); an image whose feature lies
        within the guard's threshold of one already sent is not sent again (its cached answer is returned,
        or it is refused when it matches a fool). `self.last` says what happened. Passing `fools`/`theta`
        is the low-level path with none of these rules (tests and audits).
        """
        images = self._check_images(images)
        self.last = {}
        if not self.complex:
            return self.decode(self.process(self.encode(images)))
        if fools is not None or theta is not None:
            if fools is None or theta is None:
                raise CvError("pass both fools and theta, or neither (then the device's rules pick them)")
            return self.decode(self.process(self.encode(images, fools, theta)), theta)
        a = self.features(images)
        self.last["pool_fools"] = 0
        verdict, fools_b, keys = self.guard.screen_and_reserve(
            a, lambda i, accept, burn: self._fools_for(images[i], accept, burn), images=images,
            model=self.features_sha256[:16], parts=self.parts, embed=self._embed)
        self._refusals(verdict)
        send = np.array([act == "send" for act in verdict.action])
        out = np.zeros((len(images), len(self.class_names)), np.float32)
        if send.any():
            theta = self.new_keys(int(send.sum()))  # one secret key per image; stays in this process
            b = np.stack(fools_b)  # [n, P-1, ...]
            sent = self.decode(self.process(self.combine(a[send], b[:, 0] if self.parts == 2 else b, theta)), theta)
            self.guard.store_logits(keys, sent)
            out[send] = sent
        for i, (act, ref, cached) in enumerate(zip(verdict.action, verdict.ref, verdict.logits)):
            if act in ("cached", "similar") and cached is not None:
                out[i] = cached
            elif act in ("same", "similar"):  # an image of this request
                out[i] = out[ref]
        self.last.update(sent=int(send.sum()), cached=int(len(images) - send.sum()),
                         repeats=[i for i, act in enumerate(verdict.action) if act != "send"],
                         similar=[i for i, act in enumerate(verdict.action) if act == "similar"],
                         answered_from=[verdict.ref[i] if act in ("cached", "similar", "same") else None
                                        for i, act in enumerate(verdict.action)])
        return out

    def _embed(self, pictures: np.ndarray) -> np.ndarray:
        """Features of the guard's kept pictures (sent under another model version) under these graphs."""
        from .guard import unpicture

        return self.features(unpicture(pictures, self.input_shape))

    def _fools_for(self, image: np.ndarray, accept, burn):
        """The P-1 fools of one image to send: never-used pool fools that the guard's screen accepts (burning
        any it must never send), else fresh noise where allowed; None when no pool fool keeps the geometry
        symmetric (the guard then answers from a related earlier image, or refuses)."""
        images = np.repeat(image[None], self.parts - 1, 0)
        if self.pool is None:
            if self.fool_sign == "quadrant" or self.parts > 2:
                what = "the exchange defense" if self.parts == 2 else f"{self.parts} parts"
                raise CvError(f"this model uses {what}, which needs a device-private fool pool (a noise "
                              "fool would show which reading is the image): create one with `cvconvert fools create "
                              "POOL --model-dir DIR IMAGES...` and pass --fool-dir POOL")
            self.last["fools"] = "noise"
            return self.features(np.stack([fallback_fool(im) for im in images]))
        taken = self.pool.take(len(images), images, self.fool_rule, reject=burn, accept=accept)
        self.last.update(fools="pool")
        if taken is None:
            return None
        self.last["pool_fools"] = self.last.get("pool_fools", 0) + len(taken.index)
        self.last["pool_remaining"] = taken.remaining
        if taken.remaining < low_water(self.pool.meta.get("count", 0)):
            self.on_warning(f"fool pool {self.pool.path} is running low: {taken.remaining} unused fool(s) left; refill "
                            f"it with `cvconvert fools refill {self.pool.path} IMAGES...`")
        return taken

    @staticmethod
    def _refusals(verdict) -> None:
        for i, act in enumerate(verdict.action):
            if act == "refuse":
                raise CvError(f"image {i} is a near-duplicate (cosine {verdict.cosine[i]:.4f}) of a fooling image this "
                              "device already sent: sending it would expose both; nothing was sent")
            if act == "tells":
                raise CvError(f"image {i} would be told from its fools: its transmission and an earlier one share a "
                              "direction no unused pool fool can match (a near-duplicate or look-alike of an image "
                              "sent before); nothing was sent")
            if act == "busy":
                raise CvError(f"image {i} is a near-duplicate of an image sent by a request whose answer was never "
                              "recorded (still running, or interrupted): it is not sent again; nothing was sent")
