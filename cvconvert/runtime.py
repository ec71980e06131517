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
import os
import secrets
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from .contracts import SIGNATURES, check_signature, expected_shapes  # noqa: F401 (re-exported)
from .errors import CvError, one_line
from .fools import MATCH_SET, check_rule, draw, match_law
from .keys import secure_angles
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


def fallback_fool(image: np.ndarray) -> np.ndarray:
    """A fooling input for a lone image: smooth random noise with the image's per-channel mean and std.

    Never zero (b = 0 makes x = e^{i theta} a and the phase of a gives theta away) and never derived from
    the image's content (a flipped copy would put the image into both parts). It is weaker than a real
    second image, since noise features look unnatural; callers warn and suggest --fool-dir.
    """
    c, h, w = image.shape
    noise = np.frombuffer(os.urandom(4 * c * h * w), dtype=np.uint32).astype(np.float32) / 2.0 ** 32
    noise = noise.reshape(c, h, w)
    k = max(1, min(h, w) // 8)  # box blur: natural images are smooth, white noise is not
    if k > 1:
        kernel = np.ones(k, np.float32) / k
        noise = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), 2, noise)
        noise = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), 1, noise)
    mean, std = image.mean(axis=(1, 2), keepdims=True), image.std(axis=(1, 2), keepdims=True)
    n_mean, n_std = noise.mean(axis=(1, 2), keepdims=True), noise.std(axis=(1, 2), keepdims=True) + 1e-6
    std = np.maximum(std, 0.1)  # a flat image still gets a non-zero fool
    return np.clip((noise - n_mean) / n_std * std + mean, 0.0, 1.0).astype(np.float32)


def _uniform() -> float:
    return secrets.randbits(53) / 2.0 ** 53


def _match_fools(images: np.ndarray, pool: np.ndarray | None) -> np.ndarray:
    """The ``match`` rule (cvconvert/fools.py): per image, a set of itself and up to 63 candidates (pool
    images drawn with the CSPRNG, else the rest of the batch), the fool drawn from its row of the law."""
    out = []
    rand = secrets.SystemRandom()
    for i, image in enumerate(images):
        if pool is not None and len(pool):
            cands = pool[rand.sample(range(len(pool)), min(len(pool), MATCH_SET - 1))]
        else:
            others = [j for j in range(len(images)) if j != i]
            cands = images[rand.sample(others, min(len(others), MATCH_SET - 1))]
        group = np.concatenate([image[None], cands])
        law = match_law(group.reshape(len(group), -1))
        out.append(group[draw(law[0], _uniform())])  # W_00 = 0: never the image itself
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


def choose_fools(images: np.ndarray, pool: np.ndarray | None = None, rule: str = "random") -> tuple[np.ndarray, str]:
    """One fooling image per image: from `pool`, else another image of the batch, else `fallback_fool`;
    random (CSPRNG) or by the ``match`` law (``rule``, the model's manifest key "fool_rule"). Returns
    (fools, how)."""
    n = images.shape[0]
    check_rule(rule)
    has_pool = pool is not None and len(pool) > 0
    if rule == "match" and (has_pool or n > 1):
        return _match_fools(images, pool if has_pool else None), "fool-dir" if has_pool else "batch"
    if has_pool:
        idx = [secrets.randbelow(len(pool)) for _ in range(n)]
        return np.ascontiguousarray(pool[idx], dtype=np.float32), "fool-dir"
    if n > 1:
        shift = 1 + secrets.randbelow(n - 1)
        return np.ascontiguousarray(np.roll(images, shift, axis=0), dtype=np.float32), "batch"
    return np.stack([fallback_fool(im) for im in images]), "noise"


def check_fools(manifest: dict, how: str) -> None:
    """The exchange defense (manifest fool_sign "quadrant") hides which reading of x is the image only
    if the fool looks as natural as the image: a noise fool would point the attacker at the real one."""
    if how == "noise" and manifest.get("fool_sign") == "quadrant":
        raise CvError("one image and no fooling images: this model uses the exchange defense, which needs a real "
                      "fooling image (a noise fool would show which reading is the image); pass --fool-dir")


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Pipeline:
    """The three exported parts (or encoder + decoder + a processing callable) on ONNX Runtime.

    encoder/decoder: paths to the graphs; processing: a path to processing.onnx (run locally) or a
    callable ``np.ndarray x -> np.ndarray h`` (e.g. a remote server). manifest: the model dir's
    cvconvert.json as a dict (class names, input shape, variant). verify: check each graph's sha256
    against the export report next to it (a tampered graph is refused).
    """

    def __init__(self, encoder, processing, decoder, manifest: dict, *, provider: str = "auto",
                 verify: bool = True):
        self.manifest = manifest
        self.complex = manifest.get("variant", "complex") == "complex"
        self.class_names = list(manifest.get("class_names") or range(int(manifest["num_classes"])))
        self.input_shape = tuple(manifest["input_shape"])
        self.multilabel = bool((manifest.get("data") or {}).get("multilabel"))
        paths = {"encoder": Path(encoder), "decoder": Path(decoder)}
        if not callable(processing):
            paths["processing"] = Path(processing)
        for part, p in paths.items():
            if not p.is_file():
                raise CvError(f"{part} graph {p} does not exist (run `cvconvert export` first)")
        if verify:
            self._verify(paths)
        self.sessions = {part: make_session(p, provider) for part, p in paths.items()}
        names, shapes = SIGNATURES[self.complex], expected_shapes(manifest)
        if "processing" in self.sessions:
            h_shape = self.sessions["processing"].get_outputs()[0].shape[1:]
            shapes["h"] = tuple(h_shape) if all(isinstance(d, int) for d in h_shape) else None
        for part, sess in self.sessions.items():
            ins, outs = session_signature(sess)
            check_signature(f"{part} graph {paths[part]}", ins, outs, names[part], shapes)
        self._processing: Callable = processing if callable(processing) else self._local_processing
        self.remote = callable(processing)

    @classmethod
    def from_model_dir(cls, model_dir, *, provider: str = "auto", processing=None, verify: bool = True):
        model_dir = Path(model_dir)
        manifest = read_manifest(model_dir)
        onnx_dir = model_dir / ONNX_DIR
        if not onnx_dir.is_dir():
            raise CvError(f"{model_dir} has no {ONNX_DIR}/ folder: run `cvconvert export {model_dir}` first")
        return cls(onnx_dir / "encoder.onnx", processing if processing is not None else onnx_dir / "processing.onnx",
                   onnx_dir / "decoder.onnx", manifest, provider=provider, verify=verify)

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

    def encode(self, images: np.ndarray, fools: np.ndarray | None = None, theta: np.ndarray | None = None):
        images = self._check_images(images)
        if not self.complex:
            return self._run("encoder", {"image": images})
        fools = self._check_images(fools, "fools")
        theta = np.ascontiguousarray(theta, dtype=np.float32).reshape(-1)
        if not (len(fools) == len(theta) == len(images)):
            raise CvError("images, fools and theta must have the same batch size")
        return self._run("encoder", {"image": images, "fool": fools, "theta": theta})

    def process(self, x: np.ndarray) -> np.ndarray:
        h = np.asarray(self._processing(np.ascontiguousarray(x, dtype=np.float32)), dtype=np.float32)
        if h.shape[0] != x.shape[0]:
            raise CvError(f"processing returned a batch of {h.shape[0]} for {x.shape[0]} inputs")
        return h

    def decode(self, h: np.ndarray, theta: np.ndarray | None = None) -> np.ndarray:
        if not self.complex:
            return self._run("decoder", {"h": np.ascontiguousarray(h, dtype=np.float32)})
        theta = np.ascontiguousarray(theta, dtype=np.float32).reshape(-1)
        return self._run("decoder", {"h": np.ascontiguousarray(h, dtype=np.float32), "theta": theta})

    def predict(self, images: np.ndarray, fools: np.ndarray | None = None, theta: np.ndarray | None = None,
                fool_pool: np.ndarray | None = None) -> np.ndarray:
        """Logits for a batch of images (pixels in [0, 1], [N, C, H, W]); theta fresh per image unless given."""
        images = self._check_images(images)
        if not self.complex:
            return self.decode(self.process(self.encode(images)))
        if fools is None:
            fools, how = choose_fools(images, fool_pool, self.manifest.get("fool_rule", "random"))
            check_fools(self.manifest, how)
        if theta is None:
            theta = secure_angles(len(images))
        return self.decode(self.process(self.encode(images, fools, theta)), theta)

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

