"""`cvconvert export` in three steps, each callable on its own:

    export_parts(model, manifest, opset)       -> {graph: onnx.ModelProto}     torch.onnx (dynamo)
    validate_graphs(model, manifest, blobs)    -> the validation report         CvError on any mismatch
    write_export(model_dir, blobs, report)     -> DIR/onnx/*.onnx, export.json (+ a Triton repository)

`validate_dir` runs the middle step again on an existing DIR/onnx/ folder (`cvconvert validate`).
The graphs and their names are those of cvconvert/contracts.py: encoder, processing, decoder, and
features (complex models) or original (baselines).

Exporter: torch.onnx's dynamo path (torch.export + onnxscript). Measured on the processing part of the
Fashion-MNIST LeNet / ResNet-20 (folded): 49/106 nodes and exact output shapes, where the TorchScript
exporter gave 212/352 nodes (Shape/Gather chains for every reshape) and symbolic non-batch output dims.

Validation fails before any file is written: onnx.checker full check, each graph's signature (names,
dims, symbolic batch "N", float32, opset, no complex dtypes), ONNX Runtime vs PyTorch for every graph at
batch sizes 1, 3 and 8, the whole ORT chain vs the PyTorch model for random keys, the rotation property
of processing.onnx for random theta, and x formed in numpy from features.onnx (`contracts.combine_np`)
vs encoder.onnx.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.fx as fx
from torch import nn

from . import __version__
from .complex.layers import CBatchNorm, CConv2d, CLinear, max_pool_gaps
from .device.contracts import (CHAIN, OPTIONAL, check_signature, combine_np, example_inputs, expected_shapes,
                        model_signatures, parts_of, rotate_np, run_chain, signatures, sources)
from .errors import CvError, one_line
from .graphopt import custom_translations as graph_translations
from .device.keys import combine_parts_np, haar_orthogonal, secure_angles, transform_np
from .modeldir import WEIGHTS, atomic_json, atomic_write, load_model, read_manifest, swap_dir
from .device.sessions import add_session_config
from .device.artifacts import ONNX_DIR, REPORT, sha256
from .device.sessions import make_session
from .device.graphs import session_signature

EXAMPLE_BATCH = 2  # >= 2 so no batch dim can be specialised to 1 (a batch-1 example freezes it)
CHECK_BATCHES = (1, 3, 8)
CHAIN_BATCH = 8
# Max-modulus pooling jumps where a window's top two |f|^2 tie, so float rounding alone can make two
# runtimes pick different elements (the output then jumps by ~0.3 of its peak). A sample that differs
# only there (its smallest top-two gap under TIE_GAP of its layer's peak |f|^2) is not a conversion
# error: up to a quarter of a batch may, and a fresh draw replaces it (or, where the inputs are given,
# it is left out). Measured on VGG-16 at 32x32: a sample with a gap of 5.8e-8 flipped in 12 of 20
# validations; each sample's smallest gap lies between 4e-9 and 1e-6.
TIE_GAP = 1e-5
TIE_DRAWS = 3
MIN_OPSET = 17
_FLOAT = onnx.TensorProto.FLOAT
_COMPLEX = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}

# How ONNX Runtime's output is compared with PyTorch's, per variant and graph ("exact" unless listed).
# The noisy baseline draws fresh noise inside its encoder, and so inside original.onnx, which PyTorch
# cannot reproduce: its encoder is checked on the noise scale (exact per sample), original.onnx on shape.
COMPARISON = {"noisy": {"encoder": "noise scale", "original": "shape"}}


# ---------------------------------------------------------------- folding

def fold_complex_batchnorm(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """Copy of `gm` with each eval-mode CBatchNorm folded into the bias-free CConv2d/CLinear before it.

    The norm-only batch-norm is a real per-channel factor s in eval mode, and W -> s W keeps the layer
    linear with real weights, hence rotation-equivariant. The model itself is not touched.
    """
    gm = copy.deepcopy(gm).eval()
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), CBatchNorm):
            continue
        prev = node.args[0] if node.args else None
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1):
            continue
        layer = gm.get_submodule(prev.target)
        if not isinstance(layer, (CConv2d, CLinear)):
            continue
        bn = gm.get_submodule(node.target)
        if layer.weight.shape[0] != bn.num_features:
            continue
        scale = bn.scale().detach()
        with torch.no_grad():
            layer.weight.mul_(scale.reshape((-1,) + (1,) * (layer.weight.dim() - 1)))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm, folded


def fold_real_batchnorm(module: nn.Module) -> tuple[nn.Module, int]:
    """Copy with Conv2d+BatchNorm2d fused (torch.fx's own eval-mode fusion); unchanged copy if it cannot."""
    from torch.fx.experimental.optimization import fuse

    before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
    try:
        fused = fuse(copy.deepcopy(module).eval(), inplace=True)
    except Exception:  # e.g. untraceable control flow: export it unfused, it is still correct
        return copy.deepcopy(module).eval(), 0
    after = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    return fused, before - after


# ---------------------------------------------------------------- export

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


# ---------------------------------------------------------------- the PyTorch side

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


def _sources(manifest: dict, sigs: dict, n: int, rng) -> dict[str, np.ndarray]:
    return example_inputs(sources(sigs, list(sigs)), manifest["input_shape"], n, rng, parts_of(manifest))


# ---------------------------------------------------------------- step 1: export

def export_parts(model, manifest: dict, opset: int = 18, step=None) -> tuple[dict[str, onnx.ModelProto], int]:
    """Each graph of the model's contract as an ONNX proto carrying its ONNX Runtime session options,
    and the number of batch-norms folded into the processing part (on a copy; the model is untouched)."""
    model.eval()
    fold = fold_complex_batchnorm if model.is_complex else fold_real_batchnorm
    processing, folded = fold(model.processing)
    mods = torch_parts(model, processing)
    sigs = model_signatures(model)
    examples = reference(mods, sigs, _sources(manifest, sigs, EXAMPLE_BATCH, np.random.default_rng(0)))
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


# ---------------------------------------------------------------- step 2: validate

def _dims(value_info) -> list:
    return [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
            for d in value_info.type.tensor_type.shape.dim]


def check_graph(label: str, proto: onnx.ModelProto, names: tuple, shapes: dict, opset: int) -> dict:
    """Structure checks of one graph; returns its signature for the report."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise CvError(f"{label}: onnx.checker failed: {one_line(exc)}") from None
    got_opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if got_opset < max(MIN_OPSET, opset):
        raise CvError(f"{label}: opset {got_opset} < {max(MIN_OPSET, opset)}")
    g = proto.graph
    bad = [v.name for v in list(g.input) + list(g.output) + list(g.value_info)
           if v.type.tensor_type.elem_type in _COMPLEX]
    bad += [t.name for t in g.initializer if t.data_type in _COMPLEX]
    if bad:
        raise CvError(f"{label}: complex dtype in the graph ({bad[0]}); ONNX Runtime has no complex kernels")
    nonfloat = [v.name for v in list(g.input) + list(g.output) if v.type.tensor_type.elem_type != _FLOAT]
    if nonfloat:
        raise CvError(f"{label}: {nonfloat[0]} is not float32")
    sig_in = [(v.name, _dims(v)) for v in g.input]
    sig_out = [(v.name, _dims(v)) for v in g.output]
    check_signature(label, sig_in, sig_out, names, shapes)
    for name, dims in sig_in + sig_out:
        if dims[0] != "N":
            raise CvError(f"{label}: batch axis of {name} is named {dims[0]!r}, expected 'N'")
    return {"inputs": [{"name": n, "shape": d} for n, d in sig_in],
            "outputs": [{"name": n, "shape": d} for n, d in sig_out]}


class TieFlip(CvError):
    """Every sample that differs sits at a max-modulus pooling tie (`samples`: the mask of them)."""

    def __init__(self, msg: str, samples: np.ndarray):
        super().__init__(msg)
        self.samples = samples


def _compare(label: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float,
             gaps: np.ndarray | None = None) -> float:
    """Max abs diff; CvError on a mismatch, TieFlip when only tie samples (per `gaps`, see TIE_GAP) differ."""
    if got.shape != want.shape:
        raise CvError(f"{label}: ONNX Runtime output shape {list(got.shape)} != PyTorch {list(want.shape)}")
    if not np.isfinite(got).all():
        raise CvError(f"{label}: ONNX Runtime output has NaN/inf")
    if not got.size:
        return 0.0
    diff = float(np.max(np.abs(got - want)))
    # float32 rounding grows with magnitude (random-init deep ResNets reach 1e3): atol counts per unit
    # of the output's peak magnitude once that exceeds 1; rtol is elementwise, as in np.allclose.
    peak = max(1.0, float(np.max(np.abs(want))))
    bad = ~np.isclose(got, want, atol=atol * peak, rtol=rtol).reshape(len(got), -1).all(1)
    if not bad.any():
        return diff
    msg = (f"{label}: ONNX Runtime differs from PyTorch, max abs diff {diff:.3g} at peak |value| {peak:.3g} "
           f"(atol {atol:g} x peak, rtol {rtol:g})")
    ties = bad & (gaps < TIE_GAP) if gaps is not None else np.zeros_like(bad)
    if ties.sum() == bad.sum() <= max(1, len(bad) // 4):
        raise TieFlip(f"{msg}, only in {int(bad.sum())} sample(s) at a max-modulus pooling tie", bad)
    raise CvError(f"{msg}; nothing written")


def compare_outside_ties(label: str, got: np.ndarray, want: np.ndarray, gaps, atol: float,
                         rtol: float) -> tuple[float, int]:
    """(max abs diff, samples left out): as _compare, but the samples that differ only at a max-modulus
    tie are left out of the check (for inputs that cannot be drawn again)."""
    try:
        return _compare(label, got, want, atol, rtol, gaps), 0
    except TieFlip as tie:
        keep = ~tie.samples
        if not keep.any():
            raise CvError(f"{tie}: no sample left to check; nothing written") from None
        return _compare(f"{label} (tie samples left out)", got[keep], want[keep], atol, rtol), int(tie.samples.sum())


def _redraw_at_ties(check, redraws: list):
    """check(draw) for draw = 0, 1, ... until no TieFlip; each retried draw is appended to `redraws`."""
    for draw in range(TIE_DRAWS):
        try:
            return check(draw)
        except TieFlip as tie:
            if draw == TIE_DRAWS - 1:
                raise CvError(f"{tie}, in {TIE_DRAWS} draws in a row; nothing written") from None
            redraws.append(str(tie))


def _noisy_check(label, got: np.ndarray, clean: np.ndarray, gamma: float, atol: float, rtol: float) -> float:
    """The noisy baseline draws fresh noise in the graph: check its scale, which is exact per sample
    (mean|out - a| = gamma * mean|a| by construction of NoiseInjection)."""
    dims = tuple(range(1, got.ndim))
    want = gamma * np.abs(clean).mean(axis=dims)
    have = np.abs(got - clean).mean(axis=dims)
    return _compare(label + " (noise scale)", have, want, atol, max(rtol, 1e-3))


def _clean_features(encoder, image: np.ndarray) -> np.ndarray:
    """A noisy baseline's feature before its noise: what the noise scale is measured against."""
    with torch.no_grad():
        a = encoder.body(encoder.normalize(torch.from_numpy(image)))
        return (encoder.generator(a) if encoder.generator is not None else a).numpy()


def _ort(sess, feeds: dict, label: str) -> np.ndarray:
    try:
        return sess.run(None, feeds)[0]
    except Exception as exc:
        raise CvError(f"{label}: ONNX Runtime failed: {one_line(exc)}") from None


def _load_checked(part: str, blob: bytes, sig, shapes: dict, opset: int):
    """(report entry, CPU session) of one serialised graph after its structure and signature checks."""
    label = f"{part}.onnx"
    try:
        proto = onnx.load_from_string(blob)
    except Exception as exc:
        raise CvError(f"{label} is not an ONNX graph: {one_line(exc)}") from None
    entry = check_graph(label, proto, sig, shapes, opset)
    sess = make_session(blob, "cpu")
    check_signature(label, *session_signature(sess), sig, shapes)
    return {"file": label, **entry, "nodes": len(proto.graph.node), "bytes": len(blob), "max_abs_diff": {}}, sess


def _check_parts(model, manifest, mods, sigs, sessions, n: int, tol: tuple, rng) -> dict[str, float | None]:
    """ONNX Runtime vs PyTorch for each graph on its own at batch n; the max abs diff per graph."""
    rules = COMPARISON.get(manifest["variant"], {})
    diffs = {}
    with max_pool_gaps(mods.get("processing")) as pools:
        ref = reference(mods, sigs, _sources(manifest, sigs, n, rng))
    for part, (feeds, want) in ref.items():
        label = f"{part}.onnx at batch {n}"
        got = _ort(sessions[part], feeds, label)
        how = rules.get(part, "exact")
        if how == "noise scale":
            gamma = float(manifest.get("gamma", 0.0))
            diffs[part] = _noisy_check(label, got, _clean_features(model.encoder, feeds["image"]), gamma, *tol)
        elif how == "shape":  # fresh noise inside: only shape and finiteness are comparable
            if got.shape != want.shape or not np.isfinite(got).all():
                raise CvError(f"{label}: bad output shape {list(got.shape)} or NaN/inf")
            diffs[part] = None
        else:
            diffs[part] = _compare(label, got, want, *tol, gaps=pools.gaps if part == "processing" else None)
    return diffs


def _check_chain(manifest, mods, sigs, sessions, tol: tuple, draw: int = 0) -> tuple[dict, dict]:
    """The whole ORT chain vs the PyTorch model for fresh random keys; (report entry, the ORT values and
    the PyTorch side's max-modulus gaps)."""
    n = CHAIN_BATCH
    rng = np.random.default_rng(n if draw == 0 else (n, draw))
    src = example_inputs(sources(sigs), manifest["input_shape"], n, rng, parts_of(manifest))
    got = run_chain(lambda p, f: _ort(sessions[p], f, f"{p}.onnx in the chain"), sigs, CHAIN, src)
    # A graph that draws fresh noise hands PyTorch its own output, so both sides see the same noise.
    noisy = {p for p, how in COMPARISON.get(manifest["variant"], {}).items() if how != "exact"}

    def run(part, feeds):
        if part in noisy:
            return got[sigs[part].outputs[0]]
        with torch.no_grad():
            return mods[part](*(torch.from_numpy(v) for v in feeds.values())).numpy()

    with max_pool_gaps(mods["processing"]) as pools:
        want = run_chain(run, sigs, CHAIN, src)
    out = sigs[CHAIN[-1]].outputs[0]
    diff = _compare(f"encoder -> processing -> decoder chain (batch {n})", got[out], want[out], *tol, gaps=pools.gaps)
    return {"batch": n, "max_abs_diff": diff,
            "argmax_agree": float((got[out].argmax(1) == want[out].argmax(1)).mean())}, {**got, "gaps": pools.gaps}


def _check_rotation(sessions, values: dict, tol: tuple) -> dict:
    """processing(rotate(x, t)) == rotate(processing(x), t) for random t, on the exported graph."""
    x, h = values["x"], values["h"]
    t = secure_angles(len(x))
    rot_then = _ort(sessions["processing"], {"x": rotate_np(x, t)}, "processing.onnx on rotated x")
    diff, left_out = compare_outside_ties("processing.onnx rotation property", rot_then, rotate_np(h, t),
                                          values["gaps"], *tol)
    return {"batch": len(x), "max_abs_diff": diff, "tie_samples_left_out": left_out}


def signed_keys(n: int, parts: int) -> np.ndarray:
    """n Haar keys, alternately rotations (det +1) and reflections (det -1)."""
    q = haar_orthogonal(n, parts)
    flip = np.sign(np.linalg.det(q)) != np.where(np.arange(n) % 2 == 0, 1, -1)
    q[flip, :, 0] *= -1  # negating a column flips the determinant and keeps Q orthogonal
    return q


def _check_key_equivariance(sessions, values: dict, tol: tuple) -> dict:
    """processing(Q x) == Q processing(x) for random orthogonal Q, rotations and reflections alike."""
    x, h = values["x"], values["h"]
    q = signed_keys(len(x), x.shape[1])
    key_then = _ort(sessions["processing"], {"x": transform_np(x, q)}, "processing.onnx on transformed x")
    diff, left_out = compare_outside_ties("processing.onnx equivariance (orthogonal keys)", key_then,
                                          transform_np(h, q), values["gaps"], *tol)
    return {"batch": len(x), "parts": int(x.shape[1]), "reflections": int((np.linalg.det(q) < 0).sum()),
            "max_abs_diff": diff, "tie_samples_left_out": left_out}


def _check_combine_parts(sessions, values: dict, tol: tuple) -> dict:
    """x from features.onnx's a and each fool's b with `combine_parts_np` == encoder.onnx's x."""
    image, fool = values["image"], values["fool"]
    n, k = fool.shape[:2]
    key = signed_keys(n, k + 1)
    want = _ort(sessions["encoder"], {"image": image, "fool": fool, "key": key}, "encoder.onnx")
    a = _ort(sessions["features"], {"image": image}, "features.onnx")
    b = _ort(sessions["features"], {"image": fool.reshape((n * k,) + fool.shape[2:])}, "features.onnx on the fools")
    got = combine_parts_np(a, b.reshape((n, k) + b.shape[1:]), key)
    diff = _compare("features.onnx + combine_parts_np vs encoder.onnx", got, want, *tol)
    return {"batch": n, "fool_sign": "none", "max_abs_diff": diff}


def _check_combine(sessions, values: dict, fool_sign: str, tol: tuple) -> dict:
    """x from features.onnx's a and b with `combine_np` == encoder.onnx's x. The angles cover each
    quarter-circle twice (CSPRNG within each), so both signs of the quadrant rule are checked."""
    image, fool = values["image"], values["fool"]
    n = len(image)
    theta = (secure_angles(n) / 4 + (np.arange(n) % 4) * (math.pi / 2)).astype(np.float32)
    want = _ort(sessions["encoder"], {"image": image, "fool": fool, "theta": theta}, "encoder.onnx")
    a = _ort(sessions["features"], {"image": image}, "features.onnx")
    b = _ort(sessions["features"], {"image": fool}, "features.onnx on the fools")
    got = combine_np(a, b, theta, fool_sign)
    diff = _compare("features.onnx + combine_np vs encoder.onnx", got, want, *tol)
    return {"batch": n, "fool_sign": fool_sign, "max_abs_diff": diff}


def validate_graphs(model, manifest: dict, blobs: dict[str, bytes], *, opset: int = MIN_OPSET,
                    atol: float = 1e-4, rtol: float = 1e-3, step=None) -> dict:
    """Check serialised graphs against the contract and the PyTorch model; CvError on the first mismatch.

    blobs: graph name -> bytes, every graph of the chain (features/original as present). Returns
    {"graphs": {name: signature, nodes, bytes, max_abs_diff per batch}, "chain": ..., and for complex
    models "rotation" and, with features.onnx, "combine"}.
    """
    step = step or (lambda msg: None)
    model.eval()
    sigs = {p: s for p, s in model_signatures(model).items() if p in blobs}
    mods, tol, rng = torch_parts(model), (atol, rtol), np.random.default_rng(1)
    h = reference(mods, sigs, _sources(manifest, sigs, 1, rng))["processing"][1]
    shapes = expected_shapes(manifest, tuple(h.shape[1:]))
    step("checking the graphs")
    graphs, sessions, redraws = {}, {}, []
    for part in sigs:
        graphs[part], sessions[part] = _load_checked(part, blobs[part], sigs[part], shapes, opset)
    for n in CHECK_BATCHES:  # none of them the export batch
        step(f"validating at batch {n}")
        diffs = _redraw_at_ties(lambda _draw: _check_parts(model, manifest, mods, sigs, sessions, n, tol, rng), redraws)
        for part, diff in diffs.items():
            graphs[part]["max_abs_diff"][str(n)] = diff
    step("validating the chain")
    chain, values = _redraw_at_ties(lambda draw: _check_chain(manifest, mods, sigs, sessions, tol, draw), redraws)
    out = {"graphs": graphs, "chain": chain, "tie_redraws": redraws}
    parts = parts_of(manifest)
    if model.is_complex:
        step("checking the rotation property" if parts == 2 else "checking equivariance under orthogonal keys")
        out["rotation"] = _check_rotation(sessions, values, tol) if parts == 2 else \
            _check_key_equivariance(sessions, values, tol)
    if "features" in sessions:
        step("checking features.onnx + combine_np against encoder.onnx")
        out["combine"] = _check_combine(sessions, values, manifest.get("fool_sign", "none"), tol) if parts == 2 \
            else _check_combine_parts(sessions, values, tol)
    return out


# ---------------------------------------------------------------- step 3: write

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
    return report


class _Clock:
    """Seconds per stage for the report, and each new stage's progress message."""

    def __init__(self, progress=None):
        self.progress, self.timings, self.stage = progress, {}, "loading"
        self.start = self.last = time.perf_counter()

    def step(self, msg: str) -> None:
        now = time.perf_counter()
        self.timings[self.stage] = round(now - self.last, 2)
        self.stage, self.last = msg, now
        if self.progress:
            self.progress(msg)

    def finish(self, report: dict) -> dict:
        self.step("done")
        report["seconds"] = round(time.perf_counter() - self.start, 2)
        report["timings"] = self.timings
        return report


def _check_options(opset: int, atol: float, rtol: float) -> None:
    if opset < MIN_OPSET:
        raise CvError(f"--opset {opset}: the contracts need opset >= {MIN_OPSET}")
    if atol < 0 or rtol < 0:
        raise CvError("--atol and --rtol must be non-negative")


def _header(model_dir: Path, manifest: dict, weights_sha: str | None) -> dict:
    return {"model_dir": str(model_dir), "arch": manifest["arch"], "variant": manifest["variant"],
            "weights_sha256": weights_sha}  # which model.pt the graphs come from (artifacts.export_provenance)


def export_model_dir(model_dir, *, opset: int = 18, atol: float = 1e-4, rtol: float = 1e-3,
                     triton_repo=None, triton_name: str | None = None, max_batch_size: int = 64,
                     progress=None) -> dict:
    """Export, validate, then write DIR/onnx/*.onnx (+ export.json, + the Triton repo). Returns the report."""
    _check_options(opset, atol, rtol)
    clock = _Clock(progress)
    model_dir = Path(model_dir)
    weights_sha = sha256(model_dir / WEIGHTS) if (model_dir / WEIGHTS).is_file() else None  # before loading
    model, manifest = load_model(model_dir)
    protos, folded = export_parts(model, manifest, opset, clock.step)
    blobs = {part: proto.SerializeToString() for part, proto in protos.items()}
    report = {**_header(model_dir, manifest, weights_sha), "opset": opset, "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
              "atol": atol, "rtol": rtol, "folded_batchnorms": folded,
              **validate_graphs(model, manifest, blobs, opset=opset, atol=atol, rtol=rtol, step=clock.step),
              "ok": True}
    clock.step("writing")
    return write_export(model_dir, blobs, clock.finish(report), triton_repo=triton_repo,
                        triton_name=triton_name, max_batch_size=max_batch_size)


# ---------------------------------------------------------------- validate an existing export

def _recorded(onnx_dir: Path) -> dict:
    path = onnx_dir / REPORT
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text())
        if not isinstance(report, dict) or not isinstance(report.get("graphs", {}), dict):
            raise ValueError
    except ValueError:
        raise CvError(f"{path} is not a valid export report (re-export to rewrite it)") from None
    return report


def _read_graphs(onnx_dir: Path, manifest: dict, recorded: dict) -> tuple[dict[str, bytes], list[str]]:
    """The graphs of the contract found in onnx_dir; a missing optional one that the export report does
    not list (an export made before that graph existed) is skipped, any other missing one fails."""
    blobs, skipped = {}, []
    for part in signatures(manifest):
        path = onnx_dir / f"{part}.onnx"
        if path.is_file():
            blobs[part] = path.read_bytes()
        elif part in OPTIONAL and part not in recorded.get("graphs", {}):
            skipped.append(f"{part}.onnx")
        else:
            raise CvError(f"{path} is missing: run `cvconvert export {onnx_dir.parent}`")
    return blobs, skipped


def _check_records(model_dir: Path, blobs: dict[str, bytes], recorded: dict) -> str:
    """Each graph's and model.pt's sha256 against export.json (when it records them); model.pt's sha256."""
    for part, blob in blobs.items():
        want = (recorded.get("graphs", {}).get(part) or {}).get("sha256")
        if want and want != hashlib.sha256(blob).hexdigest():
            raise CvError(f"{model_dir / ONNX_DIR / (part + '.onnx')} was modified after export (sha256 differs "
                          f"from {REPORT}); re-export it")
    weights = sha256(model_dir / WEIGHTS)
    if recorded.get("weights_sha256") not in (None, weights):
        raise CvError(f"{model_dir / WEIGHTS} changed since the export ({REPORT} records another sha256): "
                      f"re-export with `cvconvert export {model_dir}`")
    return weights


def validate_dir(model_dir, *, atol: float = 1e-4, rtol: float = 1e-3, progress=None) -> dict:
    """`cvconvert validate`: the export's validation again on an existing DIR/onnx/, against DIR/model.pt,
    plus each graph's and the weights' sha256 against export.json where it records them. Writes nothing;
    CvError on the first mismatch. Returns the report (graphs, chain, rotation, combine, skipped)."""
    _check_options(MIN_OPSET, atol, rtol)
    clock = _Clock(progress)
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    onnx_dir = model_dir / ONNX_DIR
    if not onnx_dir.is_dir():
        raise CvError(f"{model_dir} has no {ONNX_DIR}/ folder: run `cvconvert export {model_dir}` first")
    if not (model_dir / WEIGHTS).is_file():
        raise CvError(f"{model_dir} has no {WEIGHTS}: validate compares the graphs with the PyTorch model")
    recorded = _recorded(onnx_dir)
    blobs, skipped = _read_graphs(onnx_dir, manifest, recorded)
    weights_sha = _check_records(model_dir, blobs, recorded)
    model, manifest = load_model(model_dir)
    report = {**_header(model_dir, manifest, weights_sha), "atol": atol, "rtol": rtol, "export_report": bool(recorded),
              **validate_graphs(model, manifest, blobs, opset=int(recorded.get("opset", MIN_OPSET)),
                                atol=atol, rtol=rtol, step=clock.step)}
    for part, blob in blobs.items():
        report["graphs"][part]["sha256"] = hashlib.sha256(blob).hexdigest()
    report["skipped"], report["ok"] = skipped, True
    return clock.finish(report)


# ---------------------------------------------------------------- Triton

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
    import re
    import shutil
    import tempfile
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


def summary_lines(report: dict) -> list[str]:
    lines = []
    for part, g in report["graphs"].items():
        diffs = ", ".join(f"b{k}: {v:.2e}" for k, v in g["max_abs_diff"].items() if v is not None)
        sig = "; ".join(f"{e['name']} {e['shape']}" for e in g["inputs"]) + " -> " + \
            "; ".join(f"{e['name']} {e['shape']}" for e in g["outputs"])
        lines.append(f"{g['file']}: {g['nodes']} nodes, {g['bytes'] / 1e6:.2f} MB, {sig}; max abs diff {diffs or 'n/a'}")
    c = report["chain"]
    lines.append(f"chain vs PyTorch (batch {c['batch']}): max abs diff {c['max_abs_diff']:.2e}, "
                 f"argmax agree {c['argmax_agree']:.0%}")
    if "rotation" in report:
        r = report["rotation"]
        what = f"equivariance under {r['parts']}x{r['parts']} orthogonal keys ({r['reflections']} reflections)" \
            if "parts" in r else "rotation property"
        left = r.get("tie_samples_left_out", 0)
        lines.append(f"{what} of processing.onnx: max abs diff {r['max_abs_diff']:.2e}"
                     + (f" ({left} sample(s) at a max-modulus tie left out)" if left else ""))
    for why in report.get("tie_redraws", []):
        lines.append(f"drawn again: {why}")
    if "combine" in report:
        c = report["combine"]
        lines.append(f"features.onnx + combine_np (fool sign {c['fool_sign']}) vs encoder.onnx: "
                     f"max abs diff {c['max_abs_diff']:.2e}")
    if "folded_batchnorms" in report:
        lines.append(f"folded batch-norms: {report['folded_batchnorms']}")
    for name in report.get("skipped", []):
        lines.append(f"{name}: not in this export (made before it existed); re-export to add it")
    return lines
