"""`cvconvert export`: the model dir's three parts -> validated ONNX graphs (DESIGN.md contracts).

Exporter: torch.onnx's dynamo path (torch.export + onnxscript). Measured on the processing part of the
Fashion-MNIST LeNet / ResNet-20 (folded): 49/106 nodes and exact output shapes, where the TorchScript
exporter gave 212/352 nodes (Shape/Gather chains for every reshape) and symbolic non-batch output dims.

Validation is part of export and any failure raises CvError before a file is written:
onnx.checker full check, the DESIGN.md signature (names, dims, symbolic batch "N", float32, opset,
no complex dtypes), ONNX Runtime vs PyTorch at batch sizes 1, 3 and 8, the whole ORT chain vs the
PyTorch model for random keys, and the rotation property of processing.onnx for random theta.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.fx as fx
from torch import nn

from . import __version__
from .complex.layers import CBatchNorm, CConv2d, CLinear
from .errors import CvError, one_line
from .graphopt import custom_translations as graph_translations  # bench hook (issue 7)
from .keys import secure_angles
from .modeldir import WEIGHTS, atomic_json, atomic_write, load_model, swap_dir
from .ortsession import add_session_config
from .runtime import (ONNX_DIR, REPORT, SIGNATURES, check_signature, expected_shapes, make_session,
                      session_signature, sha256)

EXAMPLE_BATCH = 2  # >= 2 so no batch dim can be specialised to 1 (notes/onnx-pitfalls.md)
CHECK_BATCHES = (1, 3, 8)
MIN_OPSET = 17
_FLOAT = onnx.TensorProto.FLOAT
_COMPLEX = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}


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
                                     # bench hook (issue 7): faster max-modulus pooling graph, see graphopt.py
                                     custom_translation_table=graph_translations())
        except Exception as exc:
            first = one_line(exc)
            raise CvError(f"torch.onnx.export failed: {first}") from None
    proto = prog.model_proto
    proto.producer_name, proto.producer_version = "cvconvert", __version__
    return proto


# ---------------------------------------------------------------- validation

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


def _compare(label: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> float:
    if got.shape != want.shape:
        raise CvError(f"{label}: ONNX Runtime output shape {list(got.shape)} != PyTorch {list(want.shape)}")
    if not np.isfinite(got).all():
        raise CvError(f"{label}: ONNX Runtime output has NaN/inf")
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    # float32 rounding grows with magnitude (random-init deep ResNets reach 1e3): atol counts per unit
    # of the output's peak magnitude once that exceeds 1; rtol is elementwise, as in np.allclose.
    peak = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    if not np.allclose(got, want, atol=atol * peak, rtol=rtol):
        raise CvError(f"{label}: ONNX Runtime differs from PyTorch, max abs diff {diff:.3g} at peak |value| "
                      f"{peak:.3g} (atol {atol:g} x peak, rtol {rtol:g}); nothing written")
    return diff


def rotate_np(x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """e^{i theta} x on the [N, 2, ...] layout (DESIGN.md's rotate), in numpy."""
    t = theta.reshape((-1,) + (1,) * (x.ndim - 2)).astype(np.float64)
    re, im = x[:, 0].astype(np.float64), x[:, 1].astype(np.float64)
    c, s = np.cos(t), np.sin(t)
    return np.stack((re * c - im * s, re * s + im * c), axis=1).astype(np.float32)


def _rand_images(n: int, shape, gen: torch.Generator) -> torch.Tensor:
    return torch.rand((n,) + tuple(shape), generator=gen)


def _noisy_check(label, got: np.ndarray, clean: np.ndarray, gamma: float, atol: float, rtol: float) -> float:
    """The noisy baseline draws fresh noise in the graph: check its scale, which is exact per sample
    (mean|out - a| = gamma * mean|a| by construction of NoiseInjection)."""
    dims = tuple(range(1, got.ndim))
    want = gamma * np.abs(clean).mean(axis=dims)
    have = np.abs(got - clean).mean(axis=dims)
    return _compare(label + " (noise scale)", have, want, atol, max(rtol, 1e-3))


# ---------------------------------------------------------------- the command

def export_model_dir(model_dir, *, opset: int = 18, atol: float = 1e-4, rtol: float = 1e-3,
                     triton_repo=None, triton_name: str | None = None, max_batch_size: int = 64,
                     progress=None) -> dict:
    """Export, validate, then write DIR/onnx/*.onnx (+ export.json, + the Triton repo). Returns the report."""
    if opset < MIN_OPSET:
        raise CvError(f"--opset {opset}: the contracts need opset >= {MIN_OPSET}")
    if atol < 0 or rtol < 0:
        raise CvError("--atol and --rtol must be non-negative")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    current = ["loading", time.perf_counter()]

    def step(msg):  # time per stage for the report, and the progress message
        now = time.perf_counter()
        timings[current[0]] = round(now - current[1], 2)
        current[:] = [msg, now]
        if progress:
            progress(msg)
    model_dir = Path(model_dir)
    weights_sha = sha256(model_dir / WEIGHTS) if (model_dir / WEIGHTS).is_file() else None  # before loading
    model, manifest = load_model(model_dir)
    model.eval()
    cplx = model.is_complex
    names = SIGNATURES[cplx]
    gen = torch.Generator().manual_seed(0)  # inputs only; theta below always comes from os.urandom
    in_shape = tuple(manifest["input_shape"])

    if cplx:
        processing, folded = fold_complex_batchnorm(model.processing)
    else:
        processing, folded = fold_real_batchnorm(model.processing)
    parts = {"encoder": model.encoder, "processing": processing,
             "decoder": model.decoder}

    def torch_inputs(n):
        img, fool = _rand_images(n, in_shape, gen), _rand_images(n, in_shape, gen)
        theta = torch.from_numpy(secure_angles(n))
        return img, fool, theta

    with torch.no_grad():
        img, fool, theta = torch_inputs(EXAMPLE_BATCH)
        x = model.encoder(img, fool, theta) if cplx else model.encoder(img)
        h = model.processing(x)
    examples = {"encoder": (img, fool, theta) if cplx else (img,), "processing": (x,),
                "decoder": (h, theta) if cplx else (h,)}
    if not cplx:
        parts["original"] = _Original(model.encoder, processing, model.decoder)
        examples["original"] = (img,)

    shapes = expected_shapes(manifest, tuple(h.shape[1:]))
    report = {"model_dir": str(model_dir), "arch": manifest["arch"], "variant": manifest["variant"],
              "weights_sha256": weights_sha,  # which model.pt these graphs come from (runtime.export_provenance)
              "opset": opset, "exporter": f"torch.onnx dynamo (torch {torch.__version__})", "atol": atol,
              "rtol": rtol, "folded_batchnorms": folded, "graphs": {}}
    protos, sessions = {}, {}
    for part, mod in parts.items():
        step(f"exporting {part}")
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress; stdout is --json's
            proto = _to_onnx(mod, examples[part], *names[part], opset)
        sig = check_graph(f"{part}.onnx", proto, names[part], shapes, opset)
        add_session_config(proto)  # the runtime reads the measured ORT options back from the graph
        blob = proto.SerializeToString()
        sess = make_session(blob, "cpu")
        ins, outs = session_signature(sess)
        check_signature(f"{part}.onnx", ins, outs, names[part], shapes)
        protos[part], sessions[part] = blob, sess
        report["graphs"][part] = {"file": f"{part}.onnx", **sig, "nodes": len(proto.graph.node),
                                  "bytes": len(blob), "max_abs_diff": {}}

    # ORT vs PyTorch per part at several batch sizes (none of them the export batch).
    noisy = manifest["variant"] == "noisy"
    for n in CHECK_BATCHES:
        step(f"validating at batch {n}")
        with torch.no_grad():
            img, fool, theta = torch_inputs(n)
            if cplx:
                x = model.encoder(img, fool, theta)
                feeds = {"image": img.numpy(), "fool": fool.numpy(), "theta": theta.numpy()}
            else:
                x = model.encoder.body(model.encoder.normalize(img)) if noisy else model.encoder(img)
                if noisy:  # the clean a; the graph adds fresh noise
                    x = model.encoder.generator(x) if model.encoder.generator is not None else x
                feeds = {"image": img.numpy()}
            h = model.processing(x)
            logits = model.decoder(h, theta) if cplx else model.decoder(h)
        checks = [("encoder", feeds, x), ("processing", {"x": x.numpy()}, h),
                  ("decoder", {"h": h.numpy(), **({"theta": theta.numpy()} if cplx else {})}, logits)]
        if not cplx:
            checks.append(("original", {"image": img.numpy()}, logits))
        for part, feed, want in checks:
            label = f"{part}.onnx at batch {n}"
            try:
                got = sessions[part].run(None, feed)[0]
            except Exception as exc:
                raise CvError(f"{label}: ONNX Runtime failed: {one_line(exc)}") from None
            if noisy and part == "encoder":
                diff = _noisy_check(label, got, want.numpy(), float(manifest.get("gamma", 0.0)), atol, rtol)
            elif noisy and part == "original":
                diff = None  # fresh noise inside: only shape and finiteness are comparable
                if got.shape != tuple(want.shape) or not np.isfinite(got).all():
                    raise CvError(f"{label}: bad output shape {list(got.shape)} or NaN/inf")
            else:
                diff = _compare(label, got, want.numpy(), atol, rtol)
            report["graphs"][part]["max_abs_diff"][str(n)] = diff

    # The whole ORT chain vs the PyTorch model for fresh random keys.
    step("validating the chain")
    n = 8
    with torch.no_grad():
        img, fool, theta = torch_inputs(n)
        feeds = {"image": img.numpy(), **({"fool": fool.numpy(), "theta": theta.numpy()} if cplx else {})}
        x_ort = sessions["encoder"].run(None, feeds)[0]
        h_ort = sessions["processing"].run(None, {"x": x_ort})[0]
        dec = {"h": h_ort, **({"theta": theta.numpy()} if cplx else {})}
        chain = sessions["decoder"].run(None, dec)[0]
        if noisy:  # same noise on both sides: continue PyTorch from the graph's noisy features
            want = model.decoder(model.processing(torch.from_numpy(x_ort))).numpy()
        else:
            want = (model(img, fool, theta) if cplx else model(img)).numpy()
    diff = _compare(f"encoder -> processing -> decoder chain (batch {n})", chain, want, atol, rtol)
    report["chain"] = {"batch": n, "max_abs_diff": diff,
                       "argmax_agree": float((chain.argmax(1) == want.argmax(1)).mean())}

    if cplx:
        # Rotation property of the exported processing graph: Phi(e^{it} x) == e^{it} Phi(x).
        step("checking the rotation property")
        t = secure_angles(n)
        rot_then = sessions["processing"].run(None, {"x": rotate_np(x_ort, t)})[0]
        then_rot = rotate_np(h_ort, t)
        rdiff = _compare("processing.onnx rotation property", rot_then, then_rot, atol, rtol)
        report["rotation"] = {"batch": n, "max_abs_diff": rdiff}

    # Everything passed: write the graphs (each atomically), then the report.
    out = model_dir / ONNX_DIR
    for part, blob in protos.items():
        report["graphs"][part]["sha256"] = hashlib.sha256(blob).hexdigest()
        atomic_write(out / f"{part}.onnx", lambda tmp, b=blob: Path(tmp).write_bytes(b))
    report["ok"] = True
    if triton_repo is not None:
        name = triton_name or f"{manifest['arch']}_processing"
        report["triton"] = write_triton_repo(Path(triton_repo), name, protos["processing"],
                                             report["graphs"]["processing"], max_batch_size)
    step("done")
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["timings"] = timings
    atomic_json(report, out / REPORT)
    return report


class _Original(nn.Module):
    """The baseline variant as one graph, image -> logits (original.onnx, for benchmarks)."""

    def __init__(self, encoder, processing, decoder):
        super().__init__()
        self.encoder, self.processing, self.decoder = encoder, processing, decoder

    def forward(self, image):
        return self.decoder(self.processing(self.encoder(image)))


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
        lines.append(f"rotation property of processing.onnx: max abs diff {report['rotation']['max_abs_diff']:.2e}")
    lines.append(f"folded batch-norms: {report['folded_batchnorms']}")
    return lines
