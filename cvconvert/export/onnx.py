"""Step 1 of export: each graph of the model's contract as an ONNX proto (torch.onnx's dynamo path).

Exporter: torch.onnx's dynamo path (torch.export + onnxscript). Measured on the processing part of the
Fashion-MNIST LeNet / ResNet-20 (folded): 49/106 nodes and exact output shapes, where the TorchScript
exporter gave 212/352 nodes (Shape/Gather chains for every reshape) and symbolic non-batch output dims.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import torch
from torch import nn

from .. import __version__
from ..device.contracts import example_inputs, model_signatures, parts_of, run_chain, sources
from ..device.sessions import add_session_config
from ..errors import CvError, one_line
from ..graphopt import custom_translations as graph_translations
from .fold import fold_complex_batchnorm, fold_real_batchnorm

EXAMPLE_BATCH = 2  # >= 2 so no batch dim can be specialised to 1 (a batch-1 example freezes it)


def _to_onnx(module: nn.Module, args: tuple, inputs: tuple, outputs: tuple, opset: int) -> onnx.ModelProto:
    batch = torch.export.Dim("N", min=1, max=1 << 20)
    shapes = tuple({0: batch} for _ in args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(module, args, None, input_names=list(inputs), output_names=list(outputs),
                                     dynamic_shapes=shapes, opset_version=opset, dynamo=True, verbose=False,
                                     external_data=False,
                                     # faster max-modulus pooling graph, see graphopt.py
                                     custom_translation_table=graph_translations())
        except Exception as exc:
            first = one_line(exc)
            raise CvError(f"torch.onnx.export failed: {first}") from None
    proto = prog.model_proto
    proto.producer_name, proto.producer_version = "cvconvert", __version__
    return proto


class _Original(nn.Module):
    """The baseline variant as one graph, image -> logits (original.onnx, for benchmarks)."""

    def __init__(self, encoder, processing, decoder):
        super().__init__()
        self.encoder, self.processing, self.decoder = encoder, processing, decoder

    def forward(self, image):
        return self.decoder(self.processing(self.encoder(image)))


def torch_parts(model, processing: nn.Module | None = None) -> dict[str, nn.Module]:
    """The PyTorch module behind each graph of the model's contract; `processing` replaces the model's
    processing part (export passes its folded copy)."""
    proc = model.processing if processing is None else processing
    make = {"encoder": lambda: model.encoder, "features": lambda: model.encoder.features,
            "processing": lambda: proc, "decoder": lambda: model.decoder,
            "original": lambda: _Original(model.encoder, proc, model.decoder)}
    return {part: make[part]() for part in model_signatures(model)}


def reference(mods: dict, sigs: dict, src: dict[str, np.ndarray], device=None) -> dict[str, tuple[dict, np.ndarray]]:
    """Per graph in `sigs`: its inputs and PyTorch's output (numpy), computed from the source tensors
    (on `device` if the modules live there)."""
    per_part = {}

    def run(part, feeds):
        with torch.no_grad():
            out = mods[part](*(torch.from_numpy(v).to(device) for v in feeds.values())).cpu().numpy()
        per_part[part] = (feeds, out)
        return out

    run_chain(run, sigs, list(sigs), src)
    return per_part


def example_sources(manifest: dict, sigs: dict, n: int, rng) -> dict[str, np.ndarray]:
    return example_inputs(sources(sigs, list(sigs)), manifest["input_shape"], n, rng, parts_of(manifest))


def export_parts(model, manifest: dict, opset: int = 18, step=None) -> tuple[dict[str, onnx.ModelProto], int]:
    """Each graph of the model's contract as an ONNX proto carrying its ONNX Runtime session options,
    and the number of batch-norms folded into the processing part (on a copy; the model is untouched)."""
    model.eval()
    fold = fold_complex_batchnorm if model.is_complex else fold_real_batchnorm
    processing, folded = fold(model.processing)
    mods = torch_parts(model, processing)
    sigs = model_signatures(model)
    examples = reference(mods, sigs, example_sources(manifest, sigs, EXAMPLE_BATCH, np.random.default_rng(0)))
    protos = {}
    for part, mod in mods.items():
        if step:
            step(f"exporting {part}")
        args = tuple(torch.from_numpy(v) for v in examples[part][0].values())
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress; stdout is --json's
            proto = _to_onnx(mod, args, *sigs[part], opset)
        add_session_config(proto)  # the runtime reads the measured ORT options back from the graph
        protos[part] = proto
    return protos, folded
