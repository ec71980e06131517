"""Step 3 of export: the validated graphs atomically into DIR/onnx/ with export.json (each graph's
sha256, which the device checks), the manifest at format 2, and a Triton model repository if asked."""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from pathlib import Path

from ..device.artifacts import MANIFEST, ONNX_DIR, REPORT, read_manifest, upgraded
from ..errors import CvError
from ..modeldir import atomic_json, atomic_write, swap_dir


def write_export(model_dir, blobs: dict[str, bytes], report: dict, *, triton_repo=None,
                 triton_name: str | None = None, max_batch_size: int = 64) -> dict:
    """Each graph atomically into DIR/onnx/, the Triton repository for processing.onnx if asked, then
    DIR/onnx/export.json: the report with each graph's sha256 (which infer checks). Returns the report."""
    out = Path(model_dir) / ONNX_DIR
    for part, blob in blobs.items():
        report["graphs"][part]["sha256"] = hashlib.sha256(blob).hexdigest()
        atomic_write(out / f"{part}.onnx", lambda tmp, b=blob: Path(tmp).write_bytes(b))
    if triton_repo is not None:
        name = triton_name or f"{report['arch']}_processing"
        report["triton"] = write_triton_repo(Path(triton_repo), name, blobs["processing"],
                                             report["graphs"]["processing"], max_batch_size)
    atomic_json(report, out / REPORT)
    # the graphs now take the key (format 2): say so, and name the key law the device draws with
    atomic_json(upgraded(read_manifest(model_dir)), Path(model_dir) / MANIFEST)
    return report


def _model_config_pb2():
    """Triton's ModelConfig protobuf from tritonclient, loaded by path (its grpc package needs grpcio)."""
    import importlib.util
    import tritonclient
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def triton_config_text(name: str, sig: dict, max_batch_size: int) -> str:
    from google.protobuf import text_format
    pb = _model_config_pb2()
    cfg = pb.ModelConfig(name=name, platform="onnxruntime_onnx", backend="onnxruntime",
                         max_batch_size=max_batch_size)
    # max_batch_size > 0: Triton adds the batch axis itself, so dims exclude it.
    for tensors, entries in ((cfg.input, sig["inputs"]), (cfg.output, sig["outputs"])):
        for e in entries:
            tensors.add(name=e["name"], data_type=pb.TYPE_FP32, dims=[int(d) for d in e["shape"][1:]])
    prefs = [b for b in (4, 8, 16, 32) if b <= max_batch_size] or [max_batch_size]
    cfg.dynamic_batching.preferred_batch_size.extend(prefs)
    cfg.dynamic_batching.max_queue_delay_microseconds = 100
    cfg.instance_group.add(count=1, kind=pb.ModelInstanceGroup.KIND_AUTO)
    text = text_format.MessageToString(cfg)
    text_format.Parse(text, pb.ModelConfig())  # round-trip: what Triton will parse
    return text


def write_triton_repo(repo: Path, name: str, blob: bytes, sig: dict, max_batch_size: int) -> dict:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise CvError(f"Triton model name {name!r}: use letters, digits, '_', '-', '.'")
    if max_batch_size < 1:
        raise CvError("--max-batch-size must be >= 1 (dynamic batching needs it)")
    text = triton_config_text(name, sig, max_batch_size)
    repo.mkdir(parents=True, exist_ok=True)
    target = repo / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=repo))
    try:
        (tmp / "1").mkdir()
        (tmp / "1" / "model.onnx").write_bytes(blob)
        (tmp / "config.pbtxt").write_text(text)
        tmp.chmod(0o755)
        swap_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"repo": str(repo), "name": name, "config": str(target / "config.pbtxt"),
            "model": str(target / "1" / "model.onnx"), "max_batch_size": max_batch_size}


