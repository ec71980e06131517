"""A second version of the audited model, for the multi-query audit's ``reexport`` mode: what a device holds
after an update, when the same victims' images are sent again under the new graphs.

The new version is the audited weights with the feature extractor's (``encoder.features.body.*``, the part
that computes the image's feature a = g(I)) perturbed by seeded relative Gaussian noise, the size of a short
fine-tune, in a model dir of its own, exported. Exporting with torch.onnx costs about 15 s for a LeNet on two
cores, which the quick budget cannot spend; the perturbation changes values and not the graph, so the
audited model's exported graphs are reused with the perturbed weights substituted for their initializers,
then validated against the perturbed PyTorch model (``cvconvert.export.validate_graphs``: the same checks
``cvconvert export`` runs) and written by ``cvconvert.export.write_export``. Where a perturbed weight is not an
initializer of the graphs (a layer folded at export), the model dir is exported in full instead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper

from ..device.artifacts import MANIFEST, ONNX_DIR, REPORT, WEIGHTS, sha256, upgraded
from ..modeldir import atomic_torch_save, load_model

SCALE = 0.01   # relative size of the perturbation (one Adam step at lr 1e-3 moves LeNet's conv1 weights ~1%)
PREFIX = "encoder.features.body."
# state_dict name -> initializer name, per graph that computes the feature
GRAPH_NAMES = {"encoder": lambda k: k[len("encoder."):], "features": lambda k: k[len("encoder.features."):]}


def second_version(model_dir, out, scale: float = SCALE, seed: int = 0) -> Path:
    """`model_dir`'s weights with the feature body perturbed (each weight times 1 + scale * N(0, 1), seeded)
    as the model dir `out` (which must not exist), its graphs exported and validated. Returns `out`."""
    from ..export import export_model_dir, validate_graphs
    from ..export.report import header

    model_dir, out = Path(model_dir), Path(out)
    (out / ONNX_DIR).mkdir(parents=True)
    for name in (MANIFEST, WEIGHTS):
        shutil.copy2(model_dir / name, out / name)
    sd = torch.load(out / WEIGHTS, weights_only=True)
    gen = torch.Generator().manual_seed(seed)
    changed = {k: v * (1 + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype))
               for k, v in sd.items() if k.startswith(PREFIX) and v.is_floating_point()}
    atomic_torch_save({**sd, **changed}, out / WEIGHTS)
    recorded = json.loads((model_dir / ONNX_DIR / REPORT).read_text())
    blobs = {p: (model_dir / ONNX_DIR / g["file"]).read_bytes() for p, g in recorded["graphs"].items()}
    blobs = _substituted(blobs, changed)
    if blobs is None:  # a perturbed weight is not a graph initializer: export for real
        export_model_dir(out, opset=recorded.get("opset", 18))
        return out
    model, manifest = load_model(out)
    opset, atol, rtol = recorded.get("opset", 18), recorded.get("atol", 1e-4), recorded.get("rtol", 1e-3)
    report = {**header(out, upgraded(manifest), sha256(out / WEIGHTS)), "opset": opset,
              "exporter": f"{recorded.get('exporter')}, graphs of {model_dir} with the perturbed initializers",
              "atol": atol, "rtol": rtol, "folded_batchnorms": recorded.get("folded_batchnorms", 0),
              **validate_graphs(model, manifest, blobs, opset=opset, atol=atol, rtol=rtol, model_dir=out), "ok": True}
    from ..export import write_export

    write_export(out, blobs, report)
    return out


def _substituted(blobs: dict, changed: dict) -> dict | None:
    """The graphs with every changed weight put in place of its initializer (None: one is not found)."""
    out = dict(blobs)
    for part, rename in GRAPH_NAMES.items():
        if part not in blobs:
            continue
        proto = onnx.load_from_string(blobs[part])
        inits = {i.name: i for i in proto.graph.initializer}
        for key, value in changed.items():
            init = inits.get(rename(key))
            if init is None or tuple(init.dims) != tuple(value.shape):
                return None
            init.CopyFrom(numpy_helper.from_array(value.numpy().astype(numpy_helper.to_array(init).dtype), init.name))
        out[part] = proto.SerializeToString()
    return out
