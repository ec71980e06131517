"""`cvconvert export` in three steps, each callable on its own (as optimum's exporters separate export
from validation: a mismatch fails, it never warns):

    fold.py      batch-norms folded into the layer before them (on a copy)
    onnx.py      export_parts(model, manifest, opset)     -> {graph: onnx.ModelProto}   torch.onnx (dynamo)
    validate.py  validate_graphs(model, manifest, blobs)  -> the validation report       CvError on any mismatch
    write.py     write_export(model_dir, blobs, report)   -> DIR/onnx/*.onnx, export.json (+ a Triton repository)

`validate_dir` runs the middle step again on an existing DIR/onnx/ folder (`cvconvert validate`).
The graphs and their names are those of cvconvert/device/contracts.py: encoder, processing, decoder, and
features (complex models) or original (baselines).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..device.artifacts import sha256, upgraded
from ..modeldir import WEIGHTS, load_model
from .compare import TIE_DRAWS, TIE_GAP, TieFlip, compare_outside_ties
from .fold import fold_complex_batchnorm, fold_real_batchnorm
from .onnx import export_parts, reference, torch_parts
from .report import Clock, header, summary_lines
from .validate import MIN_OPSET, check_options, signed_keys, validate_dir, validate_graphs
from .write import triton_config_text, write_export, write_triton_repo


def export_model_dir(model_dir, *, opset: int = 18, atol: float = 1e-4, rtol: float = 1e-3,
                     triton_repo=None, triton_name: str | None = None, max_batch_size: int = 64,
                     progress=None) -> dict:
    """Export, validate, then write DIR/onnx/*.onnx (+ export.json, + the Triton repo). Returns the report."""
    check_options(opset, atol, rtol)
    clock = Clock(progress)
    model_dir = Path(model_dir)
    weights_sha = sha256(model_dir / WEIGHTS) if (model_dir / WEIGHTS).is_file() else None  # before loading
    model, manifest = load_model(model_dir)
    protos, folded = export_parts(model, manifest, opset, clock.step)
    blobs = {part: proto.SerializeToString() for part, proto in protos.items()}
    report = {**header(model_dir, upgraded(manifest), weights_sha), "opset": opset,
              "exporter": f"torch.onnx dynamo (torch {torch.__version__})", "atol": atol, "rtol": rtol,
              "folded_batchnorms": folded,
              **validate_graphs(model, manifest, blobs, opset=opset, atol=atol, rtol=rtol, step=clock.step),
              "ok": True}
    clock.step("writing")
    return write_export(model_dir, blobs, clock.finish(report), triton_repo=triton_repo,
                        triton_name=triton_name, max_batch_size=max_batch_size)


__all__ = ["MIN_OPSET", "TIE_DRAWS", "TIE_GAP", "TieFlip", "compare_outside_ties", "export_model_dir", "export_parts",
           "fold_complex_batchnorm", "fold_real_batchnorm", "reference", "signed_keys", "summary_lines",
           "torch_parts", "triton_config_text", "validate_dir", "validate_graphs", "write_export", "write_triton_repo"]
