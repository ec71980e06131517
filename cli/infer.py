"""`cvconvert infer`: classify images with the exported graphs on ONNX Runtime; the key stays here.

Light on purpose: typer, numpy, onnxruntime and Pillow only, never torch (fast device start-up).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from cvconvert.device.guard import DEFAULT_CAPACITY, DEFAULT_THRESHOLD
from cvconvert.device.screen import DEFAULT_FLOOR

from ._app import command, emit_json, info

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def collect_images(paths: list[Path]) -> list[Path]:
    """Files as given; directories contribute their PNG/JPEG files (sorted, not recursive)."""
    from cvconvert.errors import CvError

    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CvError(f"directory {p} holds no PNG/JPEG images")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise CvError(f"{p} does not exist")
    return out


def load_image(path: Path, manifest, resize: bool):
    """PNG/JPEG -> float32 [C, H, W] in [0, 1] for the model of `manifest` (the manifest dict; a bare
    input shape (C, H, W) also works, without the data set's own preprocessing).

    cvconvert.device.preprocess.to_model_input does the rest: channels are converted (grey <-> RGB, alpha
    dropped) with a warning when the colour count differs; an image of the data set's native size gets
    the preprocessing recorded at training time (Fashion-MNIST 28x28: zero-padded to 32x32); any other
    size is refused unless `resize` (then resized, with a warning), so nothing is silently rescaled into
    a distribution the model never saw.
    """
    from PIL import Image, UnidentifiedImageError

    from cvconvert.errors import CvError
    from cvconvert.device.preprocess import to_model_input

    if not isinstance(manifest, dict):
        manifest = {"input_shape": list(manifest), "data": {"preprocess": None}}
    try:
        with Image.open(path) as im:
            if im.format not in ("PNG", "JPEG"):
                raise CvError(f"{path} is a {im.format} image; infer reads PNG or JPEG")
            im.load()
            return to_model_input(im, manifest, resize=resize, name=str(path),
                                  warn=lambda msg: info(f"warning: {msg}"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CvError(f"{path} is not a readable PNG/JPEG image ({type(exc).__name__})") from None


def _find_manifest(encoder: Path) -> Path:
    from cvconvert.errors import CvError
    from cvconvert.modeldir import MANIFEST

    for d in (encoder.parent.parent, encoder.parent):  # DIR/onnx/encoder.onnx -> DIR/cvconvert.json
        if (d / MANIFEST).is_file():
            return d
    raise CvError(f"no {MANIFEST} next to {encoder} (expected in the parent of onnx/); pass --manifest")


def _graphs(model_dir, encoder, processing, decoder, manifest, server):
    """(encoder, processing, decoder, features-or-None, manifest dict) from --model-dir or the paths."""
    from cvconvert.errors import CvError
    from cvconvert.modeldir import read_manifest
    from cvconvert.device.artifacts import export_provenance

    if model_dir is not None:
        if any(g is not None for g in (encoder, processing, decoder)):
            raise CvError("give --model-dir or --encoder/--processing/--decoder, not both")
        onnx_dir = model_dir / "onnx"
        man = read_manifest(manifest or model_dir)
        if not onnx_dir.is_dir():
            raise CvError(f"{model_dir} has no onnx/ folder: run `cvconvert export {model_dir}` first")
        if export_provenance(model_dir) == "stale":
            info(f"warning: {onnx_dir} was exported from an earlier {model_dir}/model.pt (trained since?); "
                 f"these graphs run, not the current weights: re-run `cvconvert export {model_dir}`")
        encoder, processing, decoder = (onnx_dir / f"{p}.onnx" for p in ("encoder", "processing", "decoder"))
    else:
        if encoder is None or decoder is None or (processing is None and server is None):
            raise CvError("give --model-dir, or --encoder and --decoder with --processing (or --server)")
        man = read_manifest(manifest or _find_manifest(encoder))
    features = encoder.parent / "features.onnx"
    return encoder, processing, decoder, features if features.is_file() else None, man


def _guard(threshold: float, size: int, floor: float = DEFAULT_FLOOR, margin: float | None = None,
           quantile: float | None = None):
    """The query guard: one memory per device, in its state folder (cvconvert.device.state), shared by every
    pool and model version."""
    from cvconvert.device.guard import SentGuard
    from cvconvert.device.state import guard_path

    from cvconvert.device.screen import FOOL_QUANTILE

    return SentGuard(guard_path(), threshold, size, floor, margin, FOOL_QUANTILE if quantile is None else quantile)


def _exported_sha256(encoder: Path, part: str = "processing") -> str | None:
    """The sha256 `cvconvert export` recorded for a graph next to the encoder (None without a record)."""
    import json

    try:
        return json.loads((encoder.parent / "export.json").read_text())["graphs"][part]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_pipeline(model_dir, encoder, processing, decoder, manifest, *, fool_dir, server, model_name,
                   provider="auto", guard_threshold=DEFAULT_THRESHOLD, guard_size=DEFAULT_CAPACITY,
                   timeout=30.0, retries=2, guard_floor=DEFAULT_FLOOR, guard_margin=None,
                   guard_quantile=None):
    """The device's Pipeline as infer and `fools resolve` use it: graphs, pool, guard, journal, and the
    server checked to serve this export's model before anything is sent."""
    from cvconvert.errors import CvError
    from cvconvert.device.fools import FoolPool
    from cvconvert.device.contracts import is_complex
    from cvconvert.device.pipeline import Pipeline

    encoder, processing, decoder, features, man = _graphs(model_dir, encoder, processing, decoder, manifest, server)
    proc = processing
    if server is not None:
        try:
            from cvconvert.device.remote import RemoteProcessing
        except ImportError:
            raise CvError("--server needs cvconvert.device.remote, which this installation lacks") from None
        proc = RemoteProcessing(server, model_name or f"{man['arch']}_processing", timeout, retries=retries)
    complex_ = is_complex(man)  # baselines take no pool and no guard
    pool = FoolPool.open(fool_dir) if fool_dir is not None and complex_ else None  # Pipeline checks its model
    pipe = Pipeline(encoder, proc, decoder, man, provider=provider, features=features, pool=pool,
                    guard=_guard(guard_threshold, guard_size, guard_floor, guard_margin, guard_quantile) if complex_ else None)
    if pipe.complex:
        pipe.on_warning = lambda msg: info(f"warning: {msg}")
    if server is not None:
        x_shape = ([pipe.parts] if pipe.complex else []) + list(man["feature_shape"]) if "feature_shape" in man else None
        proc.check_model(_exported_sha256(encoder), x_shape)
    return pipe, man


@command("infer")
def infer(
    images: List[Path] = typer.Argument(..., help="PNG/JPEG files or directories of them."),
    model_dir: Optional[Path] = typer.Option(None, help="Model dir with onnx/ (shortcut for the three graphs)."),
    encoder: Optional[Path] = typer.Option(None, help="encoder.onnx (with --processing and --decoder)."),
    processing: Optional[Path] = typer.Option(None, help="processing.onnx."),
    decoder: Optional[Path] = typer.Option(None, help="decoder.onnx."),
    manifest: Optional[Path] = typer.Option(None, help="cvconvert.json (default: found next to the graphs)."),
    top_k: int = typer.Option(3, help="Classes to show per image."),
    fool_dir: Optional[Path] = typer.Option(None, help="The device's fool pool (`cvconvert fools create`): each "
                                                       "fool is used once."),
    guard_threshold: float = typer.Option(DEFAULT_THRESHOLD, help="Near-duplicate guard: an image whose feature has "
                                          "this cosine to one already sent is answered from the cache, not sent."),
    guard_size: int = typer.Option(DEFAULT_CAPACITY, help="Sent features the guard remembers (oldest forgotten)."),
    guard_floor: float = typer.Option(DEFAULT_FLOOR, help="Query guard: the first principal cosine with an earlier "
                                      "transmission from which on the vector it names must be the one the device's "
                                      "secret coin chose (docs/privacy.md)."),
    guard_margin: Optional[float] = typer.Option(None, help="Query guard: the lead (in |cos|) the named vector "
                                                 "must have over the next one (default 0.005 where the guard keeps "
                                                 "features exactly, up to 8192 numbers; 0.02 for its count sketches)."),
    guard_quantile: Optional[float] = typer.Option(None, help="Query guard: an image is answered from a similar "
                                                   "earlier one when it lies nearer it than this quantile of the fools "
                                                   "sent lie to theirs (default 0.99; 0: whenever no fool keeps the coin)."),
    provider: str = typer.Option("auto", help="auto | cpu | cuda (ONNX Runtime execution provider)."),
    server: Optional[str] = typer.Option(None, help="Run processing on a KServe v2 / Triton server at this URL."),
    model_name: Optional[str] = typer.Option(None, help="Model name on --server (default ARCH_processing)."),
    timeout: float = typer.Option(30.0, help="Seconds for the server's whole answer to one request (--server)."),
    retries: int = typer.Option(2, help="Further attempts with the same x after a 503 or a reset (--server); "
                                        "backoff 0.5 s, 1 s, 2 s, ..."),
    resize: bool = typer.Option(False, help="Resize images of another size (default: refuse them)."),
    batch_size: int = typer.Option(64, help="Images per ONNX Runtime call."),
    as_json: bool = typer.Option(False, "--json", help="Print predictions as JSON on stdout."),
):
    """Classify IMAGES with the split network: encode + decode here, processing local or on --server.

    A request whose answer never came (timeout, reset, a killed run) is journaled in the device state
    ($CVCONVERT_STATE_DIR): running the same command again resends its identical x (see docs/device.md)."""
    import numpy as np

    from cvconvert.errors import CvError

    if top_k < 1 or batch_size < 1 or retries < 0 or not timeout > 0:
        raise CvError("--top-k and --batch-size must be at least 1, --retries at least 0, --timeout positive")
    pipe, man = build_pipeline(model_dir, encoder, processing, decoder, manifest, fool_dir=fool_dir, server=server,
                               model_name=model_name, provider=provider, guard_threshold=guard_threshold,
                               guard_size=guard_size, timeout=timeout, retries=retries, guard_floor=guard_floor,
                               guard_margin=guard_margin, guard_quantile=guard_quantile)
    files = collect_images(images)
    x = np.stack([load_image(f, man, resize) for f in files])
    logits, sent, how, resent = [], [], None, 0
    for i in range(0, len(x), batch_size):
        try:
            logits.append(pipe.predict(x[i:i + batch_size], names=[str(f) for f in files[i:i + batch_size]]))
        except CvError as exc:
            if i == 0:
                raise
            raise CvError(f"images 1-{i} were answered (and cached: a retry shows them); image {i + 1} on: {exc}") from None
        how = pipe.last.get("fools", how)
        resent += len(pipe.last.get("resent", []))
        sent += ["similar" if j in pipe.last.get("similar", []) else
                 j not in pipe.last.get("repeats", []) or j in pipe.last.get("resent", [])
                 for j in range(len(x[i:i + batch_size]))]
    if resent:
        info(f"{resent} image(s) of an earlier request whose answer never came were sent again with the same x and key")
    probs = pipe.probabilities(np.concatenate(logits))
    _print(files, probs, pipe, man, server, how, sent, top_k, as_json)


def _print(files, probs, pipe, man, server, how, sent, top_k, as_json) -> None:
    import numpy as np

    k = min(top_k, probs.shape[1])
    where = f"remote {server}" if server else pipe.providers["processing"]
    cached = sum(s is not True for s in sent)
    sent_any = pipe.complex and cached < len(sent)
    info(f"ran on {pipe.providers['encoder']} (device side), processing on {where}"
         + (f"; fooling inputs from {how}" if sent_any and how else "")
         + (f"; {cached} image(s) sent before (or a near-duplicate of one) answered from this device's cache, "
            "not sent again" if cached else ""))
    if how == "noise":
        info("warning: no --fool-dir: each fooling input is smooth random noise, which hides less than a real image "
             "would (see README); create a fool pool with `cvconvert fools create`")
    results = []
    for f, p, s in zip(files, probs, sent):
        top = np.argsort(-p, kind="stable")[:k]
        results.append({"image": str(f), "sent": s is True,
                        **({} if s is True else {"cached": "similar" if s == "similar" else "repeat"}),
                        "top": [{"class": str(pipe.class_names[j]), "index": int(j), "prob": float(p[j])} for j in top]})
    if as_json:
        emit_json({"providers": pipe.providers, "processing": server or "local", "predictions": results,
                   **({"fools": how, "fool_rule": man.get("fool_rule", "random")} if pipe.complex else {})})
        return
    for r in results:
        tops = ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"])
        note = {"similar": "  (cached, similar to an earlier image)", "repeat": "  (cached)"}.get(r.get("cached"), "")
        print(f"{r['image']}: {tops}{note}")
