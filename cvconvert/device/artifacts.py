"""The files a model dir and a device keep, read and written without torch (the device installs no torch).

    DIR/cvconvert.json     the manifest (`read_manifest`, `new_manifest`)
    DIR/model.pt           the weights (torch: `cvconvert.modeldir` loads and writes them)
    DIR/onnx/*.onnx        the graphs, with DIR/onnx/export.json, the export record (signatures, sha256)

Every write goes to a temporary file in the same folder and is renamed into place (`atomic_write`), so an
interrupted command never leaves a half-written file; `locked` serialises read-modify-write across processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

from .. import FORMAT_VERSION, __version__
from ..errors import CvError
from .keylaws import law_of

MANIFEST = "cvconvert.json"
WEIGHTS = "model.pt"
FORMAT = "cvconvert-model"
ONNX_DIR = "onnx"
REPORT = "export.json"  # written by `cvconvert export` next to the graphs: signatures, sha256, validation


def atomic_write(path: Path | str, write, mode: int | None = None) -> None:
    """Call write(tmp_path) then rename tmp_path onto path (same folder, so the rename is atomic).
    mode: the file's permission bits (default: 0o666 less the umask); 0o600 for device-private files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, (0o666 & ~_umask()) if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def locked(folder: Path, name: str = ".lock"):
    """An exclusive lock on folder/name for the duration (held across processes; released on exit or crash)."""
    fd = os.open(Path(folder) / name, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_json(obj, path, mode: int | None = None) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write, mode)


def new_manifest(**fields) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "cvconvert_version": __version__, **fields}


READABLE_VERSIONS = (1, FORMAT_VERSION)  # format 1: P = 2 graphs took theta; its model.pt still loads


def read_manifest(path: Path | str) -> dict:
    path = Path(path)
    file = path / MANIFEST if path.is_dir() or not path.suffix else path
    if not path.exists():
        raise CvError(f"model directory {path} does not exist")
    if not file.is_file():
        raise CvError(f"{path} is not a model directory (no {MANIFEST}; create one with `cvconvert convert`)")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CvError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CvError(f"{file} is not a cvconvert manifest")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CvError(f"{file} has manifest format version {version!r}; this cvconvert reads versions "
                      f"{', '.join(map(str, READABLE_VERSIONS))}")
    return manifest


def upgraded(manifest: dict) -> dict:
    """The manifest at this cvconvert's format version: format 2 names the key law ("key_law") where
    format 1 had "fool_sign" ("quadrant": the exchange law). Export and train write it back."""
    out = dict(manifest, format_version=FORMAT_VERSION)
    if out.get("variant", "complex") == "complex":
        out["key_law"] = law_of(manifest).name
    out.pop("fool_sign", None)
    return out


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
