"""Step 2 of export: check serialised graphs against the contract and the PyTorch model; CvError on the
first mismatch (nothing is written then), never a warning.

onnx.checker full check, each graph's signature (names, dims, symbolic batch "N", float32, opset, no complex
dtypes), ONNX Runtime vs PyTorch for every graph at batch sizes 1, 3 and 8, the whole ORT chain vs the
PyTorch model for random keys, equivariance of processing.onnx under random orthogonal keys (rotations and
reflections: every key law's keys), and x formed in numpy from features.onnx (`contracts.combine_np`) vs
encoder.onnx. `validate_dir` runs it again on an existing DIR/onnx/ folder (`cvconvert validate`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import torch

from ..complex.layers import max_pool_gaps
from ..device.artifacts import ONNX_DIR, REPORT, sha256
from ..device.contracts import (CHAIN, OPTIONAL, check_key_form, check_signature, combine_np, example_inputs,
                                expected_shapes, model_signatures, parts_of, run_chain, signatures, sources)
from ..device.graphs import session_signature
from ..device.keys import haar_orthogonal, transform_np
from ..device.sessions import make_session
from ..errors import CvError, one_line
from ..modeldir import WEIGHTS, load_model, read_manifest
from .compare import clean_features, compare, compare_outside_ties, noisy_check, ort_run, redraw_at_ties
from .onnx import example_sources, reference, torch_parts
from .report import Clock, header

CHECK_BATCHES = (1, 3, 8)
CHAIN_BATCH = 8
MIN_OPSET = 17
_FLOAT = onnx.TensorProto.FLOAT
_COMPLEX = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}

# How ONNX Runtime's output is compared with PyTorch's, per variant and graph ("exact" unless listed).
# The noisy baseline draws fresh noise inside its encoder, and so inside original.onnx, which PyTorch
# cannot reproduce: its encoder is checked on the noise scale (exact per sample), original.onnx on shape.
COMPARISON = {"noisy": {"encoder": "noise scale", "original": "shape"}}


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


def _load_checked(part: str, blob: bytes, sig, shapes: dict, opset: int, model_dir="DIR"):
    """(report entry, CPU session) of one serialised graph after its structure and signature checks."""
    label = f"{part}.onnx"
    try:
        proto = onnx.load_from_string(blob)
    except Exception as exc:
        raise CvError(f"{label} is not an ONNX graph: {one_line(exc)}") from None
    check_key_form(label, [v.name for v in proto.graph.input], model_dir)  # a format-1 theta graph
    entry = check_graph(label, proto, sig, shapes, opset)
    sess = make_session(blob, "cpu")
    check_signature(label, *session_signature(sess), sig, shapes)
    return {"file": label, **entry, "nodes": len(proto.graph.node), "bytes": len(blob), "max_abs_diff": {}}, sess


def _check_parts(model, manifest, mods, sigs, sessions, n: int, tol: tuple, rng) -> dict[str, float | None]:
    """ONNX Runtime vs PyTorch for each graph on its own at batch n; the max abs diff per graph."""
    rules = COMPARISON.get(manifest["variant"], {})
    diffs = {}
    with max_pool_gaps(mods.get("processing")) as pools:
        ref = reference(mods, sigs, example_sources(manifest, sigs, n, rng))
    for part, (feeds, want) in ref.items():
        label = f"{part}.onnx at batch {n}"
        got = ort_run(sessions[part], feeds, label)
        how = rules.get(part, "exact")
        if how == "noise scale":
            gamma = float(manifest.get("gamma", 0.0))
            diffs[part] = noisy_check(label, got, clean_features(model.encoder, feeds["image"]), gamma, *tol)
        elif how == "shape":  # fresh noise inside: only shape and finiteness are comparable
            if got.shape != want.shape or not np.isfinite(got).all():
                raise CvError(f"{label}: bad output shape {list(got.shape)} or NaN/inf")
            diffs[part] = None
        else:
            diffs[part] = compare(label, got, want, *tol, gaps=pools.gaps if part == "processing" else None)
    return diffs


def _check_chain(manifest, mods, sigs, sessions, tol: tuple, draw: int = 0) -> tuple[dict, dict]:
    """The whole ORT chain vs the PyTorch model for fresh random keys; (report entry, the ORT values and
    the PyTorch side's max-modulus gaps)."""
    n = CHAIN_BATCH
    rng = np.random.default_rng(n if draw == 0 else (n, draw))
    src = example_inputs(sources(sigs), manifest["input_shape"], n, rng, parts_of(manifest))
    got = run_chain(lambda p, f: ort_run(sessions[p], f, f"{p}.onnx in the chain"), sigs, CHAIN, src)
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
    diff = compare(f"encoder -> processing -> decoder chain (batch {n})", got[out], want[out], *tol, gaps=pools.gaps)
    return {"batch": n, "max_abs_diff": diff,
            "argmax_agree": float((got[out].argmax(1) == want[out].argmax(1)).mean())}, {**got, "gaps": pools.gaps}


def signed_keys(n: int, parts: int) -> np.ndarray:
    """n Haar keys, alternately rotations (det +1) and reflections (det -1): every key law draws from O(P),
    so checking both halves of it covers them all (for P = 2: every angle, with either fool sign)."""
    q = haar_orthogonal(n, parts)
    flip = np.sign(np.linalg.det(q)) != np.where(np.arange(n) % 2 == 0, 1, -1)
    q[flip, :, 0] *= -1  # negating a column flips the determinant and keeps Q orthogonal
    return q


def _check_equivariance(sessions, values: dict, tol: tuple) -> dict:
    """processing(Q x) == Q processing(x) for random orthogonal Q, rotations and reflections alike."""
    x, h = values["x"], values["h"]
    q = signed_keys(len(x), x.shape[1])
    key_then = ort_run(sessions["processing"], {"x": transform_np(x, q)}, "processing.onnx on transformed x")
    diff, left_out = compare_outside_ties("processing.onnx equivariance (orthogonal keys)", key_then,
                                          transform_np(h, q), values["gaps"], *tol)
    return {"batch": len(x), "parts": int(x.shape[1]), "reflections": int((np.linalg.det(q) < 0).sum()),
            "max_abs_diff": diff, "tie_samples_left_out": left_out}


def _check_combine(sessions, values: dict, tol: tuple) -> dict:
    """x from features.onnx's a and each fool's b with `combine_np` == encoder.onnx's x."""
    image, fool = values["image"], values["fool"]
    n, k = fool.shape[:2]
    key = signed_keys(n, k + 1)
    want = ort_run(sessions["encoder"], {"image": image, "fool": fool, "key": key}, "encoder.onnx")
    a = ort_run(sessions["features"], {"image": image}, "features.onnx")
    b = ort_run(sessions["features"], {"image": fool.reshape((n * k,) + fool.shape[2:])}, "features.onnx on the fools")
    got = combine_np(a, b.reshape((n, k) + b.shape[1:]), key)
    diff = compare("features.onnx + combine_np vs encoder.onnx", got, want, *tol)
    return {"batch": n, "max_abs_diff": diff}


def validate_graphs(model, manifest: dict, blobs: dict[str, bytes], *, opset: int = MIN_OPSET,
                    atol: float = 1e-4, rtol: float = 1e-3, step=None, model_dir="DIR") -> dict:
    """Check serialised graphs against the contract and the PyTorch model; CvError on the first mismatch.

    blobs: graph name -> bytes, every graph of the chain (features/original as present). Returns
    {"graphs": {name: signature, nodes, bytes, max_abs_diff per batch}, "chain": ..., and for complex
    models "rotation" (equivariance under orthogonal keys) and, with features.onnx, "combine"}.
    """
    step = step or (lambda msg: None)
    model.eval()
    sigs = {p: s for p, s in model_signatures(model).items() if p in blobs}
    mods, tol, rng = torch_parts(model), (atol, rtol), np.random.default_rng(1)
    h = reference(mods, sigs, example_sources(manifest, sigs, 1, rng))["processing"][1]
    shapes = expected_shapes(manifest, tuple(h.shape[1:]))
    step("checking the graphs")
    graphs, sessions, redraws = {}, {}, []
    for part in sigs:
        graphs[part], sessions[part] = _load_checked(part, blobs[part], sigs[part], shapes, opset, model_dir)
    for n in CHECK_BATCHES:  # none of them the export batch
        step(f"validating at batch {n}")
        diffs = redraw_at_ties(lambda _draw: _check_parts(model, manifest, mods, sigs, sessions, n, tol, rng), redraws)
        for part, diff in diffs.items():
            graphs[part]["max_abs_diff"][str(n)] = diff
    step("validating the chain")
    chain, values = redraw_at_ties(lambda draw: _check_chain(manifest, mods, sigs, sessions, tol, draw), redraws)
    out = {"graphs": graphs, "chain": chain, "tie_redraws": redraws}
    if model.is_complex:
        step("checking equivariance under orthogonal keys")
        out["rotation"] = _check_equivariance(sessions, values, tol)
    if "features" in sessions:
        step("checking features.onnx + combine_np against encoder.onnx")
        out["combine"] = _check_combine(sessions, values, tol)
    return out


def check_options(opset: int, atol: float, rtol: float) -> None:
    if opset < MIN_OPSET:
        raise CvError(f"--opset {opset}: the contracts need opset >= {MIN_OPSET}")
    if atol < 0 or rtol < 0:
        raise CvError("--atol and --rtol must be non-negative")


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
    check_options(MIN_OPSET, atol, rtol)
    clock = Clock(progress)
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
    report = {**header(model_dir, manifest, weights_sha), "atol": atol, "rtol": rtol, "export_report": bool(recorded),
              **validate_graphs(model, manifest, blobs, opset=int(recorded.get("opset", MIN_OPSET)),
                                atol=atol, rtol=rtol, step=clock.step, model_dir=model_dir)}
    for part, blob in blobs.items():
        report["graphs"][part]["sha256"] = hashlib.sha256(blob).hexdigest()
    report["skipped"], report["ok"] = skipped, True
    return clock.finish(report)
