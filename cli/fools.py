"""`cvconvert fools`: create, refill and inspect a device-private fool pool (each fool used once).

Torch-free apart from the optional check of the images against the model's own public data set.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ._app import app, command, emit_json, info

fools_app = typer.Typer(name="fools", no_args_is_help=True, add_completion=False,
                        help="Device-private fool pools: each fooling image is sent once, then never again.")
app.add_typer(fools_app, name="fools")


def _pipeline(model_dir: Path):
    from cvconvert.device.pipeline import Pipeline

    return Pipeline.from_model_dir(model_dir, guard=None)


def _load(paths: list[Path], manifest: dict, resize: bool):
    import numpy as np

    from .infer import collect_images, load_image

    files = collect_images(paths)
    return np.stack([load_image(f, manifest, resize) for f in files]), files


def _public_overlap(images, manifest: dict, check: bool) -> dict | None:
    """How many of `images` are pictures of the model's own data set (which an attacker holds too): exact
    copies, and near-duplicates (shifted, cropped, mirrored, re-encoded; ``pool_audit.near_public``). None
    when the data set is not on this machine or the check is off."""
    if not check:
        return None
    name = (manifest.get("data") or {}).get("name")
    if not name:
        return None
    try:
        import numpy as np

        from cvconvert.data import get_dataset
        from cvconvert.errors import CvError
    except ImportError:
        return None
    from cvconvert.device.fools import image_digests
    from cvconvert.device.pool_audit import near_public

    mine = set(image_digests(images))
    public = []
    for train in (True, False):
        try:
            ds = get_dataset(name, train=train)
        except CvError:
            return None
        pics = getattr(ds, "images", None)
        if pics is None:  # a data set decoded per item: too slow to scan here
            return None
        public.append(pics.numpy().astype("float32") / 255)
    public = np.concatenate(public)
    exact = len(mine & set(image_digests(public)))
    return {"exact": exact, "near": int(near_public(images, public).sum())}


def _report(pool, stats: dict | None, overlap: int | None, as_json: bool) -> None:
    status = pool.status()
    if stats:
        status.update(stats)
    if overlap is not None:
        status["public_images"], status["public_near_duplicates"] = overlap["exact"], overlap["near"]
    if overlap and overlap["exact"]:
        info(f"warning: {overlap['exact']} of these images belong to the model's public data set, which the cloud may "
             "hold: it can find such a fool by testing which public feature lies in span(x). Use device-private images.")
    if overlap and overlap["near"] > overlap["exact"]:
        info(f"warning: {overlap['near']} of these images are (near-)copies of pictures of the model's public data set "
             "(shifted, cropped, mirrored or re-encoded): a cloud that holds the public set can undo such changes "
             "and name the fool. Use pictures of your own (docs/privacy.md).")
    if stats and (stats.get("duplicates") or stats.get("near_duplicates")):
        info(f"skipped {stats['duplicates']} duplicate and {stats['near_duplicates']} near-duplicate image(s): "
             "two fools that are (nearly) one picture would expose each other")
    if as_json:
        emit_json(status)
        return
    print(f"{status['pool']}: {status['remaining']} unused of {status['count']} fools "
          f"({status['used']} used); warns below {status['low_water']}")


_MODEL = typer.Option(..., help="Model dir with onnx/ (its features graph computes each fool's feature once).")
_RESIZE = typer.Option(False, help="Resize images of another size (default: refuse them).")
_CHECK = typer.Option(True, help="Warn about images of the model's own (public) data set, when it is on this machine.")
_JSON = typer.Option(False, "--json", help="Print the pool's status as JSON on stdout.")


@command("create", on=fools_app)
def create(
    pool: Path = typer.Argument(..., help="New folder for the pool (private: mode 0700, files 0600)."),
    images: List[Path] = typer.Argument(..., help="PNG/JPEG files or folders: device-private pictures of the domain."),
    model_dir: Path = _MODEL,
    resize: bool = _RESIZE,
    check_public: bool = _CHECK,
    as_json: bool = _JSON,
):
    """Create a fool pool from IMAGES for the model in --model-dir, with every fool's feature precomputed."""
    from cvconvert.device.fools import FoolPool

    pipe = _pipeline(model_dir)
    if not pipe.complex:
        from cvconvert.errors import CvError
        raise CvError(f"{model_dir} is a {pipe.manifest['variant']!r} model: fool pools are for complex models")
    arr, files = _load(images, pipe.manifest, resize)
    info(f"computing the features of {len(files)} fool image(s)")
    feats = pipe.features(arr)
    new = FoolPool.create(pool, arr, feats, features_sha256=pipe.features_sha256,
                          input_shape=pipe.input_shape, feature_shape=feats.shape[1:])
    _report(new, new.created, _public_overlap(arr, pipe.manifest, check_public), as_json)


@command("refill", on=fools_app)
def refill(
    pool: Path = typer.Argument(..., help="An existing pool."),
    images: List[Path] = typer.Argument(..., help="More device-private PNG/JPEG files or folders."),
    model_dir: Path = _MODEL,
    resize: bool = _RESIZE,
    check_public: bool = _CHECK,
    as_json: bool = _JSON,
):
    """Add fools to POOL (pictures it already holds, or near-duplicates of them, are skipped)."""
    from cvconvert.device.fools import FoolPool

    pipe = _pipeline(model_dir)
    target = FoolPool.open(pool, pipe.features_sha256)
    arr, _ = _load(images, pipe.manifest, resize)
    stats = target.add(arr, pipe.features(arr))
    _report(target, stats, _public_overlap(arr, pipe.manifest, check_public), as_json)


def _pending(pool) -> list[dict]:
    """The device state's pending requests that took fools from `pool` (or used none)."""
    from cvconvert.device.state import DeviceState

    state = DeviceState().load()
    return [{"id": rid, **rec} for rid, rec in state["pending"].items() if rec.get("pool") in (None, pool.pool_id)]


@command("status", on=fools_app)
def status(pool: Path = typer.Argument(..., help="A fool pool."), as_json: bool = _JSON):
    """How many fools POOL holds, how many are used, when it will warn, and the requests still pending.
    Every file of the pool is checked (readable, consistent, the sha256 recorded when fools were added);
    a read-only pool is fine."""
    from cvconvert.device.fools import FoolPool

    target = FoolPool.open(pool)
    st = target.status()
    st["pending"] = _pending(target)
    if as_json:
        emit_json(st)
        return
    print(f"{st['pool']}: {st['remaining']} unused of {st['count']} fools ({st['used']} used); warns below "
          f"{st['low_water']}; every file checked")
    for rec in st["pending"]:
        state = "abandoned (its images stay blocked)" if rec.get("abandoned") else "pending"
        print(f"request {rec['id']} ({rec.get('created', '?')}): {rec.get('images', '?')} image(s) {state}")
    if any(not r.get("abandoned") for r in st["pending"]):
        info("pending requests: their answer never came; `cvconvert infer` of the same images, or "
             "`cvconvert fools resolve`, sends the identical x again")


@command("resolve", on=fools_app)
def resolve(
    model_dir: Path = typer.Option(..., help="Model dir with onnx/ (the model of the pending requests)."),
    fool_dir: Optional[Path] = typer.Option(None, help="The fool pool the requests took their fools from."),
    server: Optional[str] = typer.Option(None, help="The KServe v2 / Triton server (default: local processing)."),
    model_name: Optional[str] = typer.Option(None, help="Model name on --server (default ARCH_processing)."),
    timeout: float = typer.Option(30.0, help="Seconds for the server's whole answer to one request."),
    abandon: bool = typer.Option(False, help="Give the pending requests up instead: their x and key are deleted, "
                                             "and their images are never sent again."),
    as_json: bool = _JSON,
):
    """Send every pending request again, as it is (the same x, decoded with its stored key), or give it up."""
    from .infer import build_pipeline

    pipe, _ = build_pipeline(model_dir, None, None, None, None, fool_dir=fool_dir, server=server,
                             model_name=model_name, timeout=timeout)
    done = pipe.resolve(abandon=abandon)
    results = []
    for rec in done:
        if rec["logits"] is None:
            results.append({"id": rec["id"], "abandoned": True, "images": rec["names"]})
            continue
        top = pipe.probabilities(rec["logits"]).argmax(1)
        results.append({"id": rec["id"], "abandoned": False, "predictions": [
            {"image": n, "class": str(pipe.class_names[int(t)])} for n, t in zip(rec["names"], top)]})
    if as_json:
        emit_json({"resolved": results})
        return
    if not results:
        info("no pending requests for this model")
    for r in results:
        if r["abandoned"]:
            info(f"request {r['id']} abandoned: its {len(r['images'])} image(s) stay blocked for good (a fresh key "
                 "or fool would let the cloud intersect two transmissions of them)")
        for p in r.get("predictions", []):
            print(f"{p['image']}: {p['class']}")


@command("audit", on=fools_app)
def audit(
    pool: Path = typer.Argument(..., help="A fool pool."),
    model_dir: Path = _MODEL,
    warn_auc: float = typer.Option(None, help="Warn when the classifier's AUC exceeds this (default: measured, "
                                              "see docs/privacy.md)."),
    as_json: bool = _JSON,
):
    """Can POOL's unused fools be told from the images this device has sent? (cross-validated AUC; 0.5: no)."""
    import numpy as np

    from cvconvert.device.fools import FoolPool, POOL_FILES
    from cvconvert.device.guard import SentGuard
    from cvconvert.device.state import guard_path
    from cvconvert.device.pool_audit import DEFAULT_WARN_AUC, separability

    pipe = _pipeline(model_dir)
    target = FoolPool.open(pool, pipe.features_sha256)
    sent = SentGuard(guard_path()).sent_images(pipe.features_sha256[:16], pipe._embed)
    free = np.load(target.path / POOL_FILES["ledger"]) == 0
    fools = np.load(target.path / POOL_FILES["sketches"]).astype(np.float32)[free]
    res = separability(sent, fools) if len(sent) and sent.shape[1] == fools.shape[1] else \
        {"auc": None, "sent": int(len(sent)), "pool": int(len(fools)), "why": "this device has sent no images yet"}
    limit = DEFAULT_WARN_AUC if warn_auc is None else warn_auc
    res.update(pool=str(target.path), warn_auc=limit, warning=res["auc"] is not None and res["auc"] > limit)
    if res["warning"]:
        info(f"warning: the pool's fools can be told from the images this device sent (AUC {res['auc']:.2f} > "
             f"{limit}): the cloud can learn to name fools. Refill the pool with pictures like the ones you "
             "classify (same kinds, same camera), or keep requests to the kinds the pool holds (docs/privacy.md)")
    if as_json:
        emit_json(res)
    elif res["auc"] is None:
        print(f"{target.path}: not measured ({res['why']})")
    else:
        print(f"{target.path}: AUC {res['auc']:.3f} telling {res['compared']} sent images from as many unused fools "
              f"({'WARN' if res['warning'] else 'ok'}, threshold {limit})")
