"""The device side with ONNX Runtime only: encoder -> (local or remote) processing -> decoder.

No torch on this path, not even transitively (numpy + onnxruntime + cvconvert.keys/modeldir/errors),
so a device starts fast and needs no PyTorch install. The processing step is pluggable: any callable
``x -> h`` on numpy arrays (e.g. ``cvconvert.remote.RemoteProcessing``) replaces the local session,
and it receives only x, the rotated features; theta stays in this process.

    pipe = Pipeline.from_model_dir("out/lenet", provider="auto")
    logits = pipe.predict(images)                  # theta sampled from os.urandom per image
    pipe = Pipeline.from_model_dir("out/lenet", processing=RemoteProcessing(url, "lenet"))
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from .contracts import check_signature, combine_key_np, expected_shapes, parts_of, signatures
from .errors import CvError, one_line
from .fools import FoolPool, choose_fools, fallback_fool, low_water  # noqa: F401 (choose_fools: simulation API)
from .guard import NoGuard, SentGuard
from .keys import haar_orthogonal, secure_angles
from .modeldir import WEIGHTS, read_manifest
from .ortsession import create_session

ONNX_DIR = "onnx"
REPORT = "export.json"  # written by `cvconvert export` next to the graphs: signatures, sha256, validation
PARTS = ("encoder", "processing", "decoder")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_provenance(model_dir) -> str:
    """Whether DIR/onnx/ was exported from DIR's current model.pt: "current", "stale" (trained or
    replaced since), "unknown" (no record, e.g. an older export) or "not exported"."""
    model_dir = Path(model_dir)
    report = model_dir / ONNX_DIR / REPORT
    if not (model_dir / ONNX_DIR).is_dir():
        return "not exported"
    if not report.is_file():
        return "unknown"
    try:
        recorded = json.loads(report.read_text()).get("weights_sha256")
    except (ValueError, AttributeError):
        return "unknown"
    weights = model_dir / WEIGHTS
    if not recorded or not weights.is_file():
        return "unknown"
    return "current" if sha256(weights) == recorded else "stale"


def make_session(path, provider: str = "auto", threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession on the chosen execution provider; CvError when it cannot load or run there."""
    if provider not in ("auto", "cpu", "cuda"):
        raise CvError(f"unknown provider {provider!r} (auto, cpu or cuda)")
    avail = ort.get_available_providers()
    want_cuda = provider == "cuda" or (provider == "auto" and PROVIDERS["cuda"] in avail)
    if provider == "cuda" and PROVIDERS["cuda"] not in avail:
        raise CvError(f"--provider cuda: this onnxruntime has no CUDA execution provider (has {', '.join(avail)})")
    providers = [PROVIDERS["cuda"], PROVIDERS["cpu"]] if want_cuda else [PROVIDERS["cpu"]]
    sess = create_session(path, providers, threads)
    if provider == "cuda" and sess.get_providers()[0] != PROVIDERS["cuda"]:
        raise CvError("--provider cuda: the CUDA execution provider failed to start (CUDA/cuDNN libraries "
                      "missing?); use --provider auto or cpu")
    return sess


def session_signature(sess) -> tuple[list, list]:
    return ([(i.name, i.shape) for i in sess.get_inputs()], [(o.name, o.shape) for o in sess.get_outputs()])


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


GUARD_FILE = "guard.npz"  # the near-duplicate guard's index, kept in the fool pool's folder


class Pipeline:
    """The exported parts (or encoder + decoder + a processing callable) on ONNX Runtime.

    encoder/decoder: paths to the graphs; processing: a path to processing.onnx (run locally) or a
    callable ``np.ndarray x -> np.ndarray h`` (e.g. a remote server). manifest: the model dir's
    cvconvert.json as a dict (class names, input shape, variant). features: features.onnx (image -> a),
    so that only the image's own feature is computed online; without it the encoder computes a.
    pool: a FoolPool (device-private fools, each used once). guard: True (the near-duplicate guard: in
    the pool's folder, else in memory), a SentGuard, or None (off). verify: check each graph's sha256
    against the export report next to it (a tampered graph is refused).
    """

    def __init__(self, encoder, processing, decoder, manifest: dict, *, provider: str = "auto",
                 verify: bool = True, features=None, pool: FoolPool | None = None, guard=True):
        self.manifest = manifest
        self.complex = manifest.get("variant", "complex") == "complex"
        self.class_names = list(manifest.get("class_names") or range(int(manifest["num_classes"])))
        self.input_shape = tuple(manifest["input_shape"])
        self.multilabel = bool((manifest.get("data") or {}).get("multilabel"))
        self.fool_sign = manifest.get("fool_sign", "none")
        self.fool_rule = manifest.get("fool_rule", "random")
        self.parts = parts_of(manifest)  # P > 2: P-1 fools per image and an orthogonal key in place of theta
        self.key_name = "key" if self.parts > 2 else "theta"
        paths = {"encoder": Path(encoder), "decoder": Path(decoder)}
        if not callable(processing):
            paths["processing"] = Path(processing)
        if features is not None and self.complex:
            paths["features"] = Path(features)
        for part, p in paths.items():
            if not p.is_file():
                raise CvError(f"{part} graph {p} does not exist (run `cvconvert export` first)")
        if verify:
            self._verify(paths)
        self.sessions = {part: make_session(p, provider) for part, p in paths.items()}
        self._check_signatures(paths, manifest)
        self._processing: Callable = processing if callable(processing) else self._local_processing
        self.remote = callable(processing)
        self.features_sha256 = sha256(paths["features" if "features" in paths else "encoder"])
        self.on_warning: Callable[[str], None] = lambda msg: warnings.warn(msg, stacklevel=3)
        self.last = {}  # what the last predict did: sent / cached counts, fool source, pool remaining
        self.pool = self._check_pool(pool)
        self.guard = self._make_guard(guard)

    def _check_signatures(self, paths: dict, manifest: dict) -> None:
        names, shapes = signatures(manifest), expected_shapes(manifest)
        if "processing" in self.sessions:
            h_shape = self.sessions["processing"].get_outputs()[0].shape[1:]
            shapes["h"] = tuple(h_shape) if all(isinstance(d, int) for d in h_shape) else None
        for part, sess in self.sessions.items():
            ins, outs = session_signature(sess)
            check_signature(f"{part} graph {paths[part]}", ins, outs, names[part], shapes)

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

    @staticmethod
    def _verify(paths: dict) -> None:
        for part, p in paths.items():
            report = p.parent / REPORT
            if not report.is_file():
                continue
            try:
                recorded = json.loads(report.read_text())["graphs"]
            except (ValueError, KeyError, TypeError):
                raise CvError(f"{report} is not a valid export report") from None
            entry = recorded.get(part) or {}
            if entry.get("file") == p.name and entry.get("sha256") not in (None, sha256(p)):
                raise CvError(f"{p} was modified after export (sha256 differs from {report}); re-export it")

    @property
    def providers(self) -> dict[str, str]:
        """Which execution provider each local graph runs on."""
        out = {part: s.get_providers()[0] for part, s in self.sessions.items()}
        if self.remote:
            out["processing"] = "remote"
        return out

    def _run(self, part: str, feeds: dict) -> np.ndarray:
        try:
            return self.sessions[part].run(None, feeds)[0]
        except Exception as exc:
            raise CvError(f"{part} graph failed: {one_line(exc)}") from None

    def _local_processing(self, x: np.ndarray) -> np.ndarray:
        return self._run("processing", {"x": x})

    # -- the parts -------------------------------------------------------------------------------------
    def features(self, images: np.ndarray) -> np.ndarray:
        """a = g(image) [N, C', H', W'] (features.onnx; else the encoder's real part at theta = 0, b = a)."""
        images = self._check_images(images)
        if "features" in self.sessions:
            return self._run("features", {"image": images})
        if self.parts > 2:  # the identity key leaves a in the first part
            fools = np.repeat(images[:, None], self.parts - 1, 1)
            eye = np.broadcast_to(np.eye(self.parts, dtype=np.float32), (len(images), self.parts, self.parts))
            return self._run("encoder", {"image": images, "fool": fools, "key": np.ascontiguousarray(eye)})[:, 0]
        zero = np.zeros(len(images), np.float32)
        return self._run("encoder", {"image": images, "fool": images, "theta": zero})[:, 0]

    def combine(self, a: np.ndarray, b: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """x from the features a (images) and b (fools; [N, P-1, ...] for P parts), exactly as encoder.onnx
        forms it; theta: the angles, or the keys [N, P, P]."""
        return combine_key_np(a, b, theta, self.parts, self.fool_sign)

    def new_keys(self, n: int) -> np.ndarray:
        """n fresh secret keys from os.urandom: angles, or Haar orthogonal [n, P, P] for P parts."""
        return secure_angles(n) if self.parts == 2 else haar_orthogonal(n, self.parts)

    def _key(self, theta, n: int) -> np.ndarray:
        shape = (-1,) if self.parts == 2 else (-1, self.parts, self.parts)
        key = np.ascontiguousarray(theta, dtype=np.float32).reshape(shape)
        if len(key) != n:
            raise CvError(f"{n} inputs but {len(key)} {self.key_name} value(s): one per sample")
        return key

    def encode(self, images: np.ndarray, fools: np.ndarray | None = None, theta: np.ndarray | None = None):
        """The encoder graph as exported (low level: no fool rules; `predict` applies them)."""
        images = self._check_images(images)
        if not self.complex:
            return self._run("encoder", {"image": images})
        if self.parts > 2:  # fools [N, P-1, C, H, W]: checked as P-1 images each
            f = np.asarray(fools, dtype=np.float32)
            if f.ndim != 5 or f.shape[:2] != (len(images), self.parts - 1):
                raise CvError(f"fools have shape {list(f.shape)}, the model takes [N, {self.parts - 1}, C, H, W]")
            fools = self._check_images(f.reshape((-1,) + f.shape[2:]), "fools").reshape(f.shape)
        else:
            fools = self._check_images(fools, "fools")
        if len(fools) != len(images):
            raise CvError("images and fools must have the same batch size")
        return self._run("encoder", {"image": images, "fool": fools, self.key_name: self._key(theta, len(images))})

    def process(self, x: np.ndarray) -> np.ndarray:
        h = np.asarray(self._processing(np.ascontiguousarray(x, dtype=np.float32)), dtype=np.float32)
        if h.shape[0] != x.shape[0]:
            raise CvError(f"processing returned a batch of {h.shape[0]} for {x.shape[0]} inputs")
        return h

    def decode(self, h: np.ndarray, theta: np.ndarray | None = None) -> np.ndarray:
        if not self.complex:
            return self._run("decoder", {"h": np.ascontiguousarray(h, dtype=np.float32)})
        return self._run("decoder", {"h": np.ascontiguousarray(h, dtype=np.float32),
                                     self.key_name: self._key(theta, len(h))})

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
        verdict, fools_b, keys = self.guard.screen_and_reserve(a, lambda mask: self._fool_features(images[mask], a))
        self._refusals(verdict)
        send = np.array([act == "send" for act in verdict.action])
        out = np.zeros((len(images), len(self.class_names)), np.float32)
        if send.any():
            theta = self.new_keys(int(send.sum()))  # one secret key per image; stays in this process
            b = fools_b if self.parts == 2 else fools_b.reshape((-1, self.parts - 1) + fools_b.shape[1:])
            sent = self.decode(self.process(self.combine(a[send], b, theta)), theta)
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
        if self.parts > 2:
            images = np.repeat(images, self.parts - 1, 0)
        if self.pool is None:
            if self.fool_sign == "quadrant" or self.parts > 2:
                what = "the exchange defense" if self.parts == 2 else f"{self.parts} parts"
                raise CvError(f"this model uses {what}, which needs a device-private fool pool (a noise "
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

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-logits)) if self.multilabel else softmax(logits)

    def _check_images(self, images, what="images") -> np.ndarray:
        if images is None:
            raise CvError(f"{what} missing")
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise CvError(f"{what} have shape {list(images.shape)}, the model takes [N, "
                          f"{', '.join(map(str, self.input_shape))}]")
        return images
