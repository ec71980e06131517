"""`cvconvert export` and `cvconvert validate`: the ONNX contracts, ORT == PyTorch, features.onnx and the
numpy combine, folding, validation that fails, Triton repo.

Every zoo entry's default split is exported and checked (about 3 minutes on 2 cores: the dynamo
exporter takes seconds per graph); CVCONVERT_FAST_TESTS=1 skips the sweep while developing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cvconvert import zoo
from cvconvert.cli.main import app
from cvconvert.build import convert_to_dir
from cvconvert.complex.layers import CBatchNorm, max_pool_gaps
from cvconvert.errors import CvError
from cvconvert.export import compare as compare_mod
from cvconvert.export import onnx as onnx_mod
from cvconvert.export import write as write_mod
from cvconvert.export import (TIE_DRAWS, TIE_GAP, TieFlip, compare_outside_ties, export_model_dir,
                              fold_complex_batchnorm)
from cvconvert.device.keylaws import KEY_LAWS
from cvconvert.device.keys import haar_orthogonal, secure_angles
from cvconvert.modeldir import load_model, read_manifest, write_model_dir
from cvconvert.device.pipeline import Pipeline

FAST = bool(os.environ.get("CVCONVERT_FAST_TESTS"))
SHAPE = (3, 32, 32)


def _rotate_complex(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Independent of the code under test: numpy complex arithmetic."""
    z = (x[:, 0] + 1j * x[:, 1]) * np.exp(1j * t.astype(np.float64)).reshape((-1,) + (1,) * (x.ndim - 2))
    return np.stack((z.real, z.imag), axis=1).astype(np.float32)


def _check_contract(onnx_dir: Path, manifest: dict):
    cplx = manifest["variant"] == "complex"
    want = {"encoder": (["image", "fool", "key"] if cplx else ["image"], ["x"]),
            "processing": (["x"], ["h"]), "decoder": (["h", "key"] if cplx else ["h"], ["logits"]),
            **({"features": (["image"], ["a"])} if cplx else {"original": (["image"], ["logits"])})}
    for part, (ins, outs) in want.items():
        m = onnx.load(str(onnx_dir / f"{part}.onnx"))
        assert [i.name for i in m.graph.input] == ins and [o.name for o in m.graph.output] == outs
        assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
        for v in list(m.graph.input) + list(m.graph.output):
            assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            dims = v.type.tensor_type.shape.dim
            assert dims[0].dim_param == "N", f"{part}.{v.name} batch axis not symbolic"
            assert all(d.HasField("dim_value") for d in dims[1:])
        complex_types = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}
        assert not any(t.data_type in complex_types for t in m.graph.initializer)
    enc = onnx.load(str(onnx_dir / "encoder.onnx"))
    dims = [d.dim_value for d in enc.graph.output[0].type.tensor_type.shape.dim[1:]]
    assert dims == ([2] if cplx else []) + manifest["feature_shape"]
    if cplx:
        feat = onnx.load(str(onnx_dir / "features.onnx"))
        assert [d.dim_value for d in feat.graph.output[0].type.tensor_type.shape.dim[1:]] == manifest["feature_shape"]


def _quarters(n: int) -> np.ndarray:
    """Secret-style angles, two in each quarter-circle: both signs of the quadrant rule occur."""
    return (secure_angles(n) / 4 + (np.arange(n) % 4) * (np.pi / 2)).astype(np.float32)


def _combine_matches_encoder(onnx_dir: Path, law: str, n: int = 8):
    """x formed in numpy from features.onnx's a and b equals encoder.onnx's x at the keys of `law`; with
    the fool's column sign flipped it does not (so the check can fail)."""
    import onnxruntime as ort
    from cvconvert.device.contracts import combine_np

    shape = tuple(read_manifest(onnx_dir.parent)["input_shape"])
    sess = {p: ort.InferenceSession(str(onnx_dir / f"{p}.onnx"), providers=["CPUExecutionProvider"])
            for p in ("encoder", "features")}
    img, fool = np.random.default_rng(3).random((2, n) + shape, dtype=np.float32)
    key = KEY_LAWS[law].of_angle(_quarters(n))
    want = sess["encoder"].run(None, {"image": img, "fool": fool[:, None], "key": key})[0]
    a, b = (sess["features"].run(None, {"image": v})[0] for v in (img, fool))
    got = combine_np(a, b[:, None], key)
    peak = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * peak)
    flipped = key * np.array([1, -1], np.float32)  # the other fool sign
    assert np.abs(combine_np(a, b[:, None], flipped) - want).max() > 1e-2 * peak


def _chain_matches_torch(model_dir: Path, n: int = 5):
    """The ORT pipeline (library API) vs the PyTorch model for fresh random keys, batch n."""
    model, manifest = load_model(model_dir)
    model.eval()
    pipe = Pipeline.from_model_dir(model_dir, provider="cpu")
    img = torch.rand((n,) + tuple(manifest["input_shape"]))
    fool = torch.rand((n, 1) + tuple(manifest["input_shape"]))
    key = pipe.new_keys(n) if pipe.complex else None  # by the model's key law; the baselines have none
    with torch.no_grad(), max_pool_gaps(model.processing) as pools:
        want = model(img, fool, None if key is None else torch.from_numpy(key)).numpy()
    got = pipe.predict(img.numpy(), fool.numpy(), key)
    # A sample at a max-modulus pooling tie may flip (export.TIE_GAP); at most one of n is left out.
    compare_outside_ties("pipeline vs PyTorch", got, want, pools.gaps, 1e-4, 1e-3)
    return pipe, model, img.numpy(), fool.numpy(), key


@pytest.fixture(scope="module")
def lenet_export(tmp_path_factory):
    """LeNet (paper split) exported once through the CLI with --json; the exported protos are kept so
    the failure tests can feed them back without paying for the exporter again."""
    out = tmp_path_factory.mktemp("lenet") / "lenet"
    convert_to_dir("lenet", out, input_shape=SHAPE)
    cache, real = {}, onnx_mod._to_onnx

    def recording(module, args, inputs, outputs, opset):
        proto = real(module, args, inputs, outputs, opset)
        cache[outputs] = proto.SerializeToString()
        return proto

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_mod, "_to_onnx", recording)
        res = CliRunner().invoke(app, ["export", str(out), "--json"])
    assert res.exit_code == 0, res.stderr
    return out, json.loads(res.stdout), cache


def test_lenet_export_cli_report_contract_and_chain(lenet_export):
    out, report, _ = lenet_export
    assert report["ok"] and report["variant"] == "complex" and report["rotation"]["max_abs_diff"] < 1e-4
    assert set(report["graphs"]) == {"encoder", "features", "processing", "decoder"}
    assert all(set(g["max_abs_diff"]) == {"1", "3", "8"} for g in report["graphs"].values())
    assert report["graphs"]["processing"]["inputs"] == [{"name": "x", "shape": ["N", 2, 6, 28, 28]}]
    assert report["graphs"]["features"]["outputs"] == [{"name": "a", "shape": ["N", 6, 28, 28]}]
    assert report["key_law"] == "rotation" and report["format_version"] == 2
    assert report["rotation"]["parts"] == 2 and report["rotation"]["reflections"] > 0  # every orthogonal key
    assert report["combine"]["max_abs_diff"] < 1e-4
    recorded = json.loads((out / "onnx" / "export.json").read_text())["graphs"]
    for part in report["graphs"]:  # export.json records every graph's sha256, features.onnx included
        assert recorded[part]["sha256"] == hashlib.sha256((out / "onnx" / f"{part}.onnx").read_bytes()).hexdigest()
    _check_contract(out / "onnx", read_manifest(out))
    _chain_matches_torch(out)
    _combine_matches_encoder(out / "onnx", "rotation")


def test_features_graph_is_the_encoders_feature_part(lenet_export):
    """features.onnx == model.encoder.features in PyTorch, at a batch size export never used."""
    import onnxruntime as ort

    out = lenet_export[0]
    model, manifest = load_model(out)
    model.eval()
    img = torch.rand(5, *manifest["input_shape"])
    sess = ort.InferenceSession(str(out / "onnx" / "features.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model.encoder.features(img).numpy()
    np.testing.assert_allclose(sess.run(None, {"image": img.numpy()})[0], want, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("parts", [2, 3])
def test_combine_np_is_the_encoders_combine(parts):
    """The torch-free combine against KeyedEncoder.combine (PyTorch) for every P, reflections included."""
    from cvconvert.device.contracts import combine_np
    from cvconvert.model import ModelSpec, build_model

    model = build_model(ModelSpec("lenet", "conv1", None, input_shape=SHAPE, parts=parts)).eval()
    a, b = torch.randn(8, *model.feature_shape), torch.randn(8, parts - 1, *model.feature_shape)
    key = haar_orthogonal(8, parts)
    with torch.no_grad():
        want = model.encoder.combine(a, b, torch.from_numpy(key)).numpy()
    np.testing.assert_allclose(combine_np(a.numpy(), b.numpy(), key), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(CvError, match="do not match"):
        combine_np(a.numpy(), b.numpy()[:3], key)
    with pytest.raises(CvError, match="do not match"):
        combine_np(a.numpy(), b.numpy(), haar_orthogonal(8, parts + 1))


def test_contracts_import_no_torch():
    import subprocess
    import sys
    code = ("import sys, cvconvert.device.contracts; "
            "sys.exit([m for m in sys.modules if m == 'torch' or m.startswith('torch.')] != [])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 0, res.stderr


# LeNet is covered above; the rest of the zoo here (CVCONVERT_FAST_TESTS=1 skips it while developing).
# ResNet-32/44/56 are the same builder as ResNet-20 and -110 at other depths (their conversion is checked
# in test_convert.py); exporting them too would add minutes to the suite and no new graph pattern.
SAME_BUILDER = {"lenet", "resnet32", "resnet44", "resnet56"}


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.skipif(
    FAST, reason="CVCONVERT_FAST_TESTS=1")) for a in zoo.list_models() if a not in SAME_BUILDER])
def test_zoo_default_split_exports_and_chain_matches(arch, tmp_path):
    out = tmp_path / arch
    convert_to_dir(arch, out, input_shape=SHAPE)
    report = export_model_dir(out)
    assert report["ok"] and report["variant"] == "complex"
    assert set(report["graphs"]) == {"encoder", "features", "processing", "decoder"}
    assert all(set(g["max_abs_diff"]) == {"1", "3", "8"} for g in report["graphs"].values())
    _check_contract(out / "onnx", read_manifest(out))
    _chain_matches_torch(out)


def _trained_resnet20(tmp_path) -> Path:
    """A 'trained' model dir (ResNet-20 alpha, the exchange key law): a few SGD steps in
    train mode move weights and the norm's running stats."""
    src = tmp_path / "r20"
    convert_to_dir("resnet20", src, input_shape=SHAPE, key_law="exchange")
    model, manifest = load_model(src)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        img = torch.rand(4, *SHAPE)
        loss = torch.nn.functional.cross_entropy(model(img), torch.randint(0, 10, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # make the eval-mode norm scale clearly non-trivial for the fold
        for m in model.processing.modules():
            if isinstance(m, CBatchNorm):
                m.running_ms.mul_(torch.empty_like(m.running_ms).uniform_(0.2, 5.0))
    out = tmp_path / "r20-trained"
    write_model_dir(out, model.state_dict(), {**manifest, "history": {"steps": 3}})
    return out


def test_trained_model_dir_exports_folds_and_keeps_rotation_property(tmp_path):
    out = _trained_resnet20(tmp_path)
    weights_before = hashlib.sha256((out / "model.pt").read_bytes()).hexdigest()
    repo = tmp_path / "triton"
    report = export_model_dir(out, triton_repo=repo)
    # the fold worked on a copy: the weights on disk are untouched, the graph has no norm left
    assert hashlib.sha256((out / "model.pt").read_bytes()).hexdigest() == weights_before
    assert report["folded_batchnorms"] > 0
    # features.onnx exported and validated, and the numpy combine at the exchange law's keys is encoder.onnx
    assert set(report["graphs"]) == {"encoder", "features", "processing", "decoder"}
    assert report["key_law"] == "exchange" and set(report["graphs"]["features"]["max_abs_diff"]) == {"1", "3", "8"}
    _check_contract(out / "onnx", read_manifest(out))
    _combine_matches_encoder(out / "onnx", "exchange")
    pipe, model, img, fool, key = _chain_matches_torch(out, n=6)
    assert any(isinstance(m, CBatchNorm) for m in model.processing.modules())

    # rotation property of processing.onnx for random theta (checked here independently)
    x = pipe.encode(img, fool, key)
    t = secure_angles(len(x))
    lhs = pipe.process(_rotate_complex(x, t))
    rhs = _rotate_complex(pipe.process(x), t)
    peak = max(1.0, float(np.abs(rhs).max()))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-3, atol=1e-4 * peak)
    # ...and it is not trivially true: processing is not rotation-invariant
    assert np.abs(lhs - pipe.process(x)).max() > 1e-2 * peak

    # Triton repository: dims without the batch axis, the same graph as processing.onnx
    name = report["triton"]["name"]
    assert name == "resnet20_processing"
    assert (repo / name / "1" / "model.onnx").read_bytes() == (out / "onnx" / "processing.onnx").read_bytes()
    pb = write_mod._model_config_pb2()
    from google.protobuf import text_format
    cfg = text_format.Parse((repo / name / "config.pbtxt").read_text(), pb.ModelConfig())
    assert cfg.backend == "onnxruntime" and cfg.max_batch_size == 64
    assert cfg.dynamic_batching.preferred_batch_size
    assert list(cfg.input[0].dims) == [2] + read_manifest(out)["feature_shape"]
    assert cfg.input[0].data_type == pb.TYPE_FP32 and cfg.output[0].name == "h"
    assert list(cfg.output[0].dims) == list(pipe.sessions["processing"].get_outputs()[0].shape[1:])


def test_fold_is_exact_on_a_copy():
    from cvconvert.model import ModelSpec, build_model
    model = build_model(ModelSpec("resnet20", "layer1", "layer3.1", input_shape=SHAPE)).eval()
    for m in model.processing.modules():
        if isinstance(m, CBatchNorm):
            m.running_ms.uniform_(0.2, 5.0)
            m.weight.data.uniform_(-2, 2)
    folded, n = fold_complex_batchnorm(model.processing)
    assert n > 0 and not any(isinstance(m, CBatchNorm) for m in folded.modules())
    assert any(isinstance(m, CBatchNorm) for m in model.processing.modules())  # original untouched
    x = torch.randn(3, 2, *model.feature_shape)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.processing(x), rtol=1e-4, atol=1e-4)


def _snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted((d / "onnx").glob("*"))} if (d / "onnx").is_dir() else {}


def _frozen_export(module, args, inputs, outputs, opset):
    """The classic failure: TorchScript export with no dynamic axes freezes the batch at the example's."""
    import io
    buf = io.BytesIO()
    torch.onnx.export(module, args, buf, input_names=list(inputs), output_names=list(outputs),
                      opset_version=opset, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


def test_frozen_batch_axis_fails_export_and_writes_nothing(lenet_export, monkeypatch):
    lenet_dir = lenet_export[0]
    before = _snapshot(lenet_dir)
    monkeypatch.setattr(onnx_mod, "_to_onnx", _frozen_export)
    with pytest.raises(CvError, match="batch axis of image is frozen to 2"):
        export_model_dir(lenet_dir)
    assert _snapshot(lenet_dir) == before


def test_mismatch_fails_the_cli_with_one_line(lenet_export, monkeypatch):
    lenet_dir, _, cache = lenet_export

    def perturbed(module, args, inputs, outputs, opset):
        proto = onnx.load_from_string(cache[outputs])
        if outputs == ("h",):  # scale the largest processing weight: a wrong graph that still runs
            init = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
            arr = onnx.numpy_helper.to_array(init) * 1.5
            init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
        return proto

    before = _snapshot(lenet_dir)
    monkeypatch.setattr(onnx_mod, "_to_onnx", perturbed)
    res = CliRunner().invoke(app, ["export", str(lenet_dir)])
    assert res.exit_code != 0
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error: processing.onnx at batch 1: ONNX Runtime differs from PyTorch")
    assert _snapshot(lenet_dir) == before


def test_export_cli_bad_options(lenet_export, tmp_path):
    res = CliRunner().invoke(app, ["export", str(lenet_export[0]), "--opset", "16"])
    assert res.exit_code == 2 and res.stderr.strip() == "error: --opset 16: the contracts need opset >= 17"
    res = CliRunner().invoke(app, ["export", str(tmp_path / "nope")])
    assert res.exit_code == 2 and res.stderr.strip().splitlines()[-1].startswith("error: model directory")


def test_baseline_variant_exports_original_and_split(tmp_path):
    out = tmp_path / "orig"
    convert_to_dir("lenet", out, variant="original", input_shape=SHAPE)
    report = export_model_dir(out)
    assert set(report["graphs"]) == {"encoder", "processing", "decoder", "original"}
    _check_contract(out / "onnx", read_manifest(out))
    import onnxruntime as ort
    model, _ = load_model(out)
    model.eval()
    img = torch.rand(4, *SHAPE)
    sess = ort.InferenceSession(str(out / "onnx" / "original.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"image": img.numpy()})[0], model(img).numpy(), rtol=1e-3, atol=1e-4)
    _chain_matches_torch(out)


# ---------------------------------------------------------------- cvconvert validate

def _copy_export(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def _scale_largest_weight(path: Path, factor: float = 1.5) -> None:
    """A wrong graph that still loads and runs: the largest initializer scaled."""
    proto = onnx.load(str(path))
    init = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = onnx.numpy_helper.to_array(init) * factor
    init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
    onnx.save(proto, str(path))


def test_validate_passes_on_a_fresh_export(lenet_export):
    out = lenet_export[0]
    before = _snapshot(out)
    res = CliRunner().invoke(app, ["validate", str(out), "--json"])
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] and report["export_report"] and report["skipped"] == []
    assert set(report["graphs"]) == {"encoder", "features", "processing", "decoder"}
    assert all(set(g["max_abs_diff"]) == {"1", "3", "8"} for g in report["graphs"].values())
    assert report["rotation"]["max_abs_diff"] < 1e-4 and report["combine"]["max_abs_diff"] < 1e-4
    assert report["weights_sha256"] == hashlib.sha256((out / "model.pt").read_bytes()).hexdigest()
    assert _snapshot(out) == before  # validate writes nothing
    res = CliRunner().invoke(app, ["validate", str(out)])
    assert res.exit_code == 0 and "4 graphs valid" in res.stderr and "combine_np" in res.stderr


def test_validate_fails_on_a_tampered_graph(lenet_export, tmp_path):
    out = _copy_export(lenet_export[0], tmp_path / "lenet")
    _scale_largest_weight(out / "onnx" / "processing.onnx")
    # export.json records each graph's sha256: the change is caught there first ...
    res = CliRunner().invoke(app, ["validate", str(out)])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and "processing.onnx was modified after export" in lines[0]
    # ... and without the report, by comparing the graph with PyTorch
    (out / "onnx" / "export.json").unlink()
    res = CliRunner().invoke(app, ["validate", str(out)])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: processing.onnx at batch 1: ONNX Runtime differs from PyTorch")


def test_validate_tampered_features_and_missing_graphs(lenet_export, tmp_path):
    out = _copy_export(lenet_export[0], tmp_path / "lenet")
    (out / "onnx" / "export.json").unlink()
    _scale_largest_weight(out / "onnx" / "features.onnx")
    res = CliRunner().invoke(app, ["validate", str(out)])
    assert res.exit_code == 2 and res.stderr.strip().startswith("error: features.onnx at batch 1: ONNX Runtime differs")
    # an export made before features.onnx existed: skipped and said so; a missing chain graph fails
    (out / "onnx" / "features.onnx").unlink()
    res = CliRunner().invoke(app, ["validate", str(out), "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["skipped"] == ["features.onnx"] and "combine" not in json.loads(res.stdout)
    (out / "onnx" / "decoder.onnx").unlink()
    res = CliRunner().invoke(app, ["validate", str(out)])
    assert res.exit_code == 2 and "decoder.onnx is missing" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = CliRunner().invoke(app, ["validate", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.stderr


def test_compare_tells_tie_flips_from_mismatches():
    want = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
    got = want.copy()
    got[2] += 0.3  # one sample jumps, as a flipped max-modulus choice makes it
    gaps = np.full(8, 1e-3, np.float32)
    with pytest.raises(CvError, match="nothing written") as exc:  # no tie there: a real mismatch
        compare_mod.compare("p", got, want, 1e-4, 1e-3, gaps)
    assert not isinstance(exc.value, TieFlip)
    gaps[2] = TIE_GAP / 10
    with pytest.raises(TieFlip) as tie:
        compare_mod.compare("p", got, want, 1e-4, 1e-3, gaps)
    assert tie.value.samples.tolist() == [i == 2 for i in range(8)]
    assert compare_outside_ties("p", got, want, gaps, 1e-4, 1e-3) == (0.0, 1)
    got[[3, 4]] += 0.3  # three of eight differ at ties: more than a quarter is no rounding accident
    gaps[:] = TIE_GAP / 10
    with pytest.raises(CvError) as many:
        compare_mod.compare("p", got, want, 1e-4, 1e-3, gaps)
    assert not isinstance(many.value, TieFlip)


def test_redraw_at_ties_draws_again_then_gives_up():
    seen, redraws = [], []

    def flips_once(draw):
        seen.append(draw)
        if draw == 0:
            raise TieFlip("p differs at a tie", np.array([True]))
        return "ok"

    assert compare_mod.redraw_at_ties(flips_once, redraws) == "ok" and seen == [0, 1] and len(redraws) == 1

    def always(draw):
        raise TieFlip("p differs at a tie", np.array([True]))

    with pytest.raises(CvError, match=f"in {TIE_DRAWS} draws in a row"):
        compare_mod.redraw_at_ties(always, [])


def _as_format1(model_dir: Path) -> None:
    """Turn a fresh export into what model-dir format 1 wrote for P = 2: encoder/decoder graphs that take
    `theta`, export.json recording those very graphs (so only the form can refuse them), manifest v1."""
    for part in ("encoder", "decoder"):
        path = model_dir / "onnx" / f"{part}.onnx"
        proto = onnx.load(str(path))
        for v in proto.graph.input:
            if v.name == "key":
                v.name = "theta"
        for node in proto.graph.node:
            node.input[:] = ["theta" if i == "key" else i for i in node.input]
        onnx.save(proto, str(path))
    report = json.loads((model_dir / "onnx" / "export.json").read_text())
    for part, g in report["graphs"].items():
        g["sha256"] = hashlib.sha256((model_dir / "onnx" / f"{part}.onnx").read_bytes()).hexdigest()
    (model_dir / "onnx" / "export.json").write_text(json.dumps(report))
    man = read_manifest(model_dir)
    man.pop("key_law")
    (model_dir / "cvconvert.json").write_text(json.dumps({**man, "format_version": 1}))


def test_format1_onnx_is_refused_in_one_line_and_export_rebuilds_it(lenet_export, tmp_path):
    out = _copy_export(lenet_export[0], tmp_path / "lenet")
    _as_format1(out)
    png = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(png)
    for args in (["infer", "--model-dir", str(out), str(png)], ["validate", str(out)]):
        res = CliRunner().invoke(app, args)
        lines = res.stderr.strip().splitlines()
        assert res.exit_code != 0 and len(lines) == 1 and "Traceback" not in res.stderr + res.stdout, res.stderr
        assert lines[0].startswith("error: ") and "takes `theta`" in lines[0], lines[0]
        assert f"`cvconvert export {out}`" in lines[0], lines[0]
    with pytest.raises(CvError, match="cvconvert export"):
        Pipeline.from_model_dir(out)
    from cvconvert.bench import OrtPipeline
    with pytest.raises(CvError, match="takes `theta`"):  # bench times the graphs as they are: refused too
        OrtPipeline({p: out / "onnx" / f"{p}.onnx" for p in ("encoder", "processing", "decoder")}, "cpu", 1, True)
    # model.pt of format 1 still loads; `cvconvert export DIR` rebuilds the graphs and upgrades the manifest
    assert load_model(out)[0].spec.law.name == "rotation"
    res = CliRunner().invoke(app, ["export", str(out)])
    assert res.exit_code == 0, res.stderr
    man = read_manifest(out)
    assert man["format_version"] == 2 and man["key_law"] == "rotation"
    res = CliRunner().invoke(app, ["infer", "--model-dir", str(out), str(png), "--json"])
    assert res.exit_code == 0, res.stderr


def test_format1_exchange_manifest_reads_as_the_exchange_law(tmp_path):
    """A format-1 manifest with the exchange defense's "fool_sign": "quadrant" loads with the exchange key law;
    a newer format is refused."""
    convert_to_dir("lenet", tmp_path / "m", input_shape=SHAPE)
    man = read_manifest(tmp_path / "m")
    man.pop("key_law")
    (tmp_path / "m" / "cvconvert.json").write_text(json.dumps({**man, "format_version": 1, "fool_sign": "quadrant"}))
    model, _ = load_model(tmp_path / "m")
    assert model.spec.law.name == "exchange"
    (tmp_path / "m" / "cvconvert.json").write_text(json.dumps({**man, "format_version": 3}))
    with pytest.raises(CvError, match="format version 3"):
        read_manifest(tmp_path / "m")
