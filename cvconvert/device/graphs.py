"""The graph runner: the exported parts on ONNX Runtime, encoder -> (local or remote) processing -> decoder.

No torch on this path, not even transitively (numpy + onnxruntime + cvconvert.device + cvconvert.errors),
so a device starts fast and needs no PyTorch install. The processing step is pluggable: any callable
``x -> h`` on numpy arrays (e.g. ``cvconvert.device.remote.RemoteProcessing``) replaces the local session,
and it receives only x, the keyed features; the key stays in this process.

    pipe = Pipeline.from_model_dir("out/lenet", provider="auto")
    logits = pipe.predict(images)                  # a key drawn by the model's key law per image (os.urandom)
    pipe = Pipeline.from_model_dir("out/lenet", processing=RemoteProcessing(url, "lenet"))
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from .contracts import check_key_form, check_signature, combine_np, expected_shapes, parts_of, signatures
from .keylaws import law_of
from ..errors import CvError, one_line
from .artifacts import REPORT, sha256
from .sessions import make_session

PARTS = ("encoder", "processing", "decoder")


def session_signature(sess) -> tuple[list, list]:
    return ([(i.name, i.shape) for i in sess.get_inputs()], [(o.name, o.shape) for o in sess.get_outputs()])


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class GraphRunner:
    """The exported parts (or encoder + decoder + a processing callable) on ONNX Runtime.

    encoder/decoder: paths to the graphs; processing: a path to processing.onnx (run locally) or a
    callable ``np.ndarray x -> np.ndarray h`` (e.g. a remote server). manifest: the model dir's
    cvconvert.json as a dict (class names, input shape, variant). features: features.onnx (image -> a),
    so that only the image's own feature is computed online; without it the encoder computes a.
    verify: check each graph's sha256 against the export report next to it (a tampered graph is refused).
    No device rules here: `cvconvert.device.pipeline.Pipeline` adds the fool pool, the guard and the keys.
    """

    def __init__(self, encoder, processing, decoder, manifest: dict, *, provider: str = "auto",
                 verify: bool = True, features=None):
        self.manifest = manifest
        self.complex = manifest.get("variant", "complex") == "complex"
        self.class_names = list(manifest.get("class_names") or range(int(manifest["num_classes"])))
        self.input_shape = tuple(manifest["input_shape"])
        self.multilabel = bool((manifest.get("data") or {}).get("multilabel"))
        self.fool_rule = manifest.get("fool_rule", "random")
        self.parts = parts_of(manifest)  # P-1 fools per image and an orthogonal key [P, P]
        self.law = law_of(manifest) if self.complex else None  # how the device draws keys
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

    def _check_signatures(self, paths: dict, manifest: dict) -> None:
        names, shapes = signatures(manifest), expected_shapes(manifest)
        if "processing" in self.sessions:
            h_shape = self.sessions["processing"].get_outputs()[0].shape[1:]
            shapes["h"] = tuple(h_shape) if all(isinstance(d, int) for d in h_shape) else None
        for part, sess in self.sessions.items():
            ins, outs = session_signature(sess)
            check_key_form(f"{part} graph {paths[part]}", [n for n, _ in ins], paths[part].parent.parent)
            check_signature(f"{part} graph {paths[part]}", ins, outs, names[part], shapes)

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
        """a = g(image) [N, C', H', W'] (features.onnx; else the encoder's first part under the identity key)."""
        images = self._check_images(images)
        if "features" in self.sessions:
            return self._run("features", {"image": images})
        fools = np.repeat(images[:, None], self.parts - 1, 1)
        eye = np.broadcast_to(np.eye(self.parts, dtype=np.float32), (len(images), self.parts, self.parts))
        return self._run("encoder", {"image": images, "fool": fools, "key": np.ascontiguousarray(eye)})[:, 0]

    def combine(self, a: np.ndarray, b: np.ndarray, key: np.ndarray) -> np.ndarray:
        """x from the features a [N, ...] (images) and b [N, P-1, ...] (fools) and the keys [N, P, P],
        exactly as encoder.onnx forms it."""
        return combine_np(a, b, key)

    def _key(self, key, n: int) -> np.ndarray:
        key = np.asarray(key, dtype=np.float32)
        if key.size != n * self.parts ** 2:
            raise CvError(f"{n} inputs need {n} keys [{self.parts}, {self.parts}], got shape {list(key.shape)}")
        return np.ascontiguousarray(key.reshape(n, self.parts, self.parts))

    def encode(self, images: np.ndarray, fools: np.ndarray | None = None, key: np.ndarray | None = None):
        """The encoder graph as exported (low level: no fool rules; `predict` applies them)."""
        images = self._check_images(images)
        if not self.complex:
            return self._run("encoder", {"image": images})
        if fools is None:
            raise CvError("fools missing")
        f = np.asarray(fools, dtype=np.float32)  # [N, P-1, C, H, W]: checked as P-1 images each
        if f.ndim != 5 or f.shape[:2] != (len(images), self.parts - 1):
            raise CvError(f"fools have shape {list(f.shape)}, the model takes [N, {self.parts - 1}, C, H, W]")
        fools = self._check_images(f.reshape((-1,) + f.shape[2:]), "fools").reshape(f.shape)
        return self._run("encoder", {"image": images, "fool": fools, "key": self._key(key, len(images))})

    def process(self, x: np.ndarray) -> np.ndarray:
        h = np.asarray(self._processing(np.ascontiguousarray(x, dtype=np.float32)), dtype=np.float32)
        if h.shape[0] != x.shape[0]:
            raise CvError(f"processing returned a batch of {h.shape[0]} for {x.shape[0]} inputs")
        return h

    def decode(self, h: np.ndarray, key: np.ndarray | None = None) -> np.ndarray:
        if not self.complex:
            return self._run("decoder", {"h": np.ascontiguousarray(h, dtype=np.float32)})
        return self._run("decoder", {"h": np.ascontiguousarray(h, dtype=np.float32), "key": self._key(key, len(h))})

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
