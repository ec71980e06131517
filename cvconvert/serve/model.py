"""The served model: one ONNX graph in an ONNX Runtime session, with the v2 metadata of its tensors, and
where to find it (a processing.onnx, a model directory, a Triton model folder or repository)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CvError
from .protocol import TensorSpec

VERSION = "1"  # one version per served model, as in the Triton repository `export --triton-repo` writes
SHRINK_AFTER_BYTES = 1 << 20  # runs with inputs this large give ONNX Runtime's memory arena back afterwards

# ONNX Runtime type strings -> v2 datatype names (BYTES/BF16 are not served: no such inputs here).
ORT_TO_V2 = {
    "tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(bool)": "BOOL",
}


def _spec(node) -> TensorSpec:
    dtype = ORT_TO_V2.get(node.type)
    if dtype is None:
        raise CvError(f"tensor {node.name!r} has type {node.type}, which this server does not serve")
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in (node.shape or [])]
    return TensorSpec(node.name, dtype, shape)


@dataclass
class ServedModel:
    """One ONNX graph in an ONNX Runtime session, with the v2 metadata of its inputs and outputs."""

    name: str
    path: Path
    session: object
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    platform: str = "onnxruntime_onnx"
    versions: list[str] = field(default_factory=lambda: [VERSION])
    sha256: str | None = None  # of the ONNX file: a device compares it with its export record

    def metadata(self) -> dict:
        meta = {"name": self.name, "versions": self.versions, "platform": self.platform,
                "inputs": [t.as_json() for t in self.inputs], "outputs": [t.as_json() for t in self.outputs]}
        if self.sha256:
            meta["parameters"] = {"sha256": self.sha256}
        return meta

    def config(self) -> dict:
        """A Triton-style model config (tritonclient's get_model_config), dims including the batch axis."""
        def dims(t):
            return {"name": t.name, "data_type": f"TYPE_{t.datatype}", "dims": t.shape}
        return {"name": self.name, "platform": self.platform, "backend": "onnxruntime", "max_batch_size": 0,
                "input": [dims(t) for t in self.inputs], "output": [dims(t) for t in self.outputs]}

    def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        big = sum(a.nbytes for a in feeds.values()) >= SHRINK_AFTER_BYTES
        return self.session.run(names, feeds, _shrink_arena() if big else None)


def _shrink_arena():
    """Run options that hand ONNX Runtime's CPU arena back after the run: it grows to the largest batch
    seen and otherwise keeps that memory for good. (A few percent slower, so only for large inputs.)"""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def resolve_model_path(path: Path | str, name: str | None = None) -> tuple[Path, str]:
    """PROCESSING.onnx, a model dir (DIR/onnx/processing.onnx), a Triton model folder (M/1/model.onnx)
    or a Triton repository holding one model -> (onnx file, model name)."""
    path = Path(path)
    if not path.exists():
        raise CvError(f"{path} does not exist")
    if path.is_file():
        if path.suffix != ".onnx":
            raise CvError(f"{path} is not an .onnx file (give PROCESSING.onnx or a model directory)")
        if path.name == "model.onnx" and path.parent.name.isdigit():  # a Triton model folder's NAME/1/model.onnx
            default = path.parent.parent.name
        elif path.parent.name == "onnx" and (path.parent.parent / "cvconvert.json").is_file():
            default = _manifest_name(path.parent.parent)  # DIR/onnx/processing.onnx
        else:
            default = path.stem
        return path, name or default
    if (path / "onnx" / "processing.onnx").is_file():
        return path / "onnx" / "processing.onnx", name or _manifest_name(path)
    if (path / VERSION / "model.onnx").is_file():
        return path / VERSION / "model.onnx", name or path.name
    found = sorted(path.glob(f"*/{VERSION}/model.onnx"))
    if len(found) == 1:
        return found[0], name or found[0].parent.parent.name
    if (path / "cvconvert.json").is_file():
        raise CvError(f"{path} has no onnx/processing.onnx: run `cvconvert export {path}` first")
    raise CvError(f"{path} holds no processing.onnx, no {VERSION}/model.onnx and no single Triton model")


def _manifest_name(model_dir: Path) -> str:
    """ARCH_processing, the name `cvconvert export --triton-repo` gives the same graph by default, so a
    client uses one model name whether it talks to `cvconvert serve` or to Triton/KServe."""
    try:
        arch = json.loads((model_dir / "cvconvert.json").read_text())["arch"]
    except (OSError, ValueError, KeyError, TypeError):
        return "processing"
    return f"{arch}_processing" if isinstance(arch, str) and arch and "/" not in arch else "processing"


def load_served_model(path: Path | str, name: str | None = None, intra_op_threads: int = 0,
                      providers: list[str] | None = None) -> ServedModel:
    """The graph at `path` (see resolve_model_path) in an ONNX Runtime session, named `name`.

    intra_op_threads: ONNX Runtime threads per run; 0 = the CPUs this process may use."""
    from ..device.artifacts import sha256
    from ..device.sessions import create_session

    onnx_path, model_name = resolve_model_path(path, name)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", model_name or ""):
        raise CvError(f"bad model name {model_name!r}: use letters, digits, '_', '-', '.'")
    session = create_session(onnx_path, providers or ["CPUExecutionProvider"], intra_op_threads or None)
    return ServedModel(model_name, onnx_path, session, [_spec(i) for i in session.get_inputs()],
                       [_spec(o) for o in session.get_outputs()], sha256=sha256(onnx_path))
