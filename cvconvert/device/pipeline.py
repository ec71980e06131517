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
from .guard import NoGuard, SentGuard
from .keylaws import draw_keys

GUARD_FILE = "guard.npz"  # the near-duplicate guard's index, kept in the fool pool's folder


class Pipeline(GraphRunner):
    """GraphRunner plus the device's rules. pool: a FoolPool (device-private fools, each used once).
    guard: True (the near-duplicate guard: in the pool's folder, else in memory), a SentGuard, or None (off).
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
            return SentGuard(self.pool.path / GUARD_FILE if self.pool is not None else None)
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
        """n fresh secret keys [n, P, P] from os.urandom, drawn by the model's key law."""
        return draw_keys(self.law, n, self.parts)

    # -- the device's rules ----------------------------------------------------------------------------
    def predict(self, images: np.ndarray, fools: np.ndarray | None = None, key: np.ndarray | None = None) -> np.ndarray:
        """Logits for a batch of images (pixels in [0, 1], [N, C, H, W]).

        Complex models follow the device's rule that no feature vector appears in two transmissions: each
        image's fool comes from the pool and is never used again (no pool: a fresh noise fool, which the
        exchange and Haar key laws refuse); the key is fresh per image (os.urandom); an image whose feature lies
        within the guard's threshold of one already sent is not sent again (its cached answer is returned,
        or it is refused when it matches a fool). `self.last` says what happened. Passing `fools`/`key`
        is the low-level path with none of these rules (tests and audits); fools [N, P-1, C, H, W], key [N, P, P].
        """
        images = self._check_images(images)
        self.last = {}
        if not self.complex:
            return self.decode(self.process(self.encode(images)))
        if fools is not None or key is not None:
            if fools is None or key is None:
                raise CvError("pass both fools and key, or neither (then the device's rules pick them)")
            return self.decode(self.process(self.encode(images, fools, key)), key)
        a = self.features(images)
        verdict, fools_b, keys = self.guard.screen_and_reserve(a, lambda mask: self._fool_features(images[mask], a))
        self._refusals(verdict)
        send = np.array([act == "send" for act in verdict.action])
        out = np.zeros((len(images), len(self.class_names)), np.float32)
        if send.any():
            key = self.new_keys(int(send.sum()))  # one secret key per image; stays in this process
            b = fools_b.reshape((-1, self.parts - 1) + fools_b.shape[1:])
            sent = self.decode(self.process(self.combine(a[send], b, key)), key)
            self.guard.store_logits(keys, sent)
            out[send] = sent
        for i, (act, ref, cached) in enumerate(zip(verdict.action, verdict.ref, verdict.logits)):
            if act == "cached":
                out[i] = cached
            elif act == "same":
                out[i] = out[ref]
        self.last.update(sent=int(send.sum()), cached=int(len(images) - send.sum()),
                         repeats=[i for i, act in enumerate(verdict.action) if act != "send"])
        return out

    def _fool_features(self, images: np.ndarray, request_a: np.ndarray) -> np.ndarray:
        """b for each image to send: a never-used pool fool (burning any that lies within the guard's
        threshold of something sent or of this request's images), else fresh noise where allowed.
        P parts: P-1 fools per image, [N * (P-1), ...] in image order (the guard records each one)."""
        images = np.repeat(images, self.parts - 1, 0)
        if self.pool is None:
            if self.law.private_fools:
                raise CvError(f"this model's key law ({self.law.name}) needs a device-private fool pool (a noise "
                              "fool would show which reading is the image): create one with `cvconvert fools create "
                              "POOL --model-dir DIR IMAGES...` and pass --fool-dir POOL")
            self.last["fools"] = "noise"
            return self.features(np.stack([fallback_fool(im) for im in images]))
        from .guard import sketch

        own = sketch(request_a)

        limit = min(self.guard.threshold or 1.0, 1 - 1e-5)

        def reject(sk):  # a fool near something already sent, or near one of this request's own images
            return self.guard.too_close(sk) | ((sk @ own.T).max(1) >= limit)
        taken = self.pool.take(len(images), images, self.fool_rule, reject=reject)
        self.last.update(fools="pool", pool_remaining=taken.remaining)
        if taken.remaining < low_water(self.pool.meta.get("count", 0)):
            self.on_warning(f"fool pool {self.pool.path} is running low: {taken.remaining} unused fool(s) left; refill "
                            f"it with `cvconvert fools refill {self.pool.path} IMAGES...`")
        return taken.features

    @staticmethod
    def _refusals(verdict) -> None:
        for i, act in enumerate(verdict.action):
            if act == "refuse":
                raise CvError(f"image {i} is a near-duplicate (cosine {verdict.cosine[i]:.4f}) of a fooling image this "
                              "device already sent: sending it would expose both; nothing was sent")
            if act == "busy":
                raise CvError(f"image {i} is a near-duplicate of an image sent by a request whose answer was never "
                              "recorded (still running, or interrupted): it is not sent again; nothing was sent")
