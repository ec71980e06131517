"""`cvconvert infer` and cvconvert.device: ORT only, keys stay on the device, bad inputs fail in one line."""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import cvconvert.device.keys
from cvconvert.build import convert_to_dir
from cvconvert.errors import CvError
from cvconvert.modeldir import load_model
from cvconvert.device.keylaws import rotation_key_np
from cvconvert.device.pipeline import Pipeline
from cvconvert.device.fools import choose_fools, fallback_fool

from conftest import invoke as _invoke
from conftest import one_line_error as _one_line_error
from conftest import png as _png

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(lenet_exported):
    """The demo's model: complex LeNet for Fashion-MNIST (1x32x32), exported, plus a folder of PNGs."""
    root = lenet_exported
    out = root / "lenet"
    images = root / "images"
    images.mkdir()
    for i in range(4):
        _png(images / f"img{i}.png", seed=i)
    return out, images


@pytest.fixture
def record_keys(monkeypatch):
    """Every theta sampled (the rotation key law draws R(theta) with keys.secure_angles)."""
    seen = []
    real = cvconvert.device.keys.secure_angles

    def recording(n):
        t = real(n)
        seen.append(t.copy())
        return t

    monkeypatch.setattr(cvconvert.device.keys, "secure_angles", recording)
    monkeypatch.setattr("cvconvert.device.keylaws.secure_angles", recording)
    return seen


def _key_strings(thetas) -> list[str]:
    """How a leaked angle would look: its repr and a few fixed-point renderings."""
    out = []
    for t in np.concatenate(thetas):
        out += [repr(float(t))[:8], f"{t:.4f}", f"{t:.6f}"]
    return out


def test_infer_prints_top_k_and_never_the_key(exported, record_keys):
    model_dir, images = exported
    res = _invoke("infer", "--model-dir", model_dir, images, "--json", "--top-k", "2")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert [Path(p["image"]).name for p in report["predictions"]] == [f"img{i}.png" for i in range(4)]
    names = json.loads((model_dir / "cvconvert.json").read_text())["class_names"]
    for p in report["predictions"]:
        assert len(p["top"]) == 2 and all(t["class"] == names[t["index"]] for t in p["top"])
        assert p["top"][0]["prob"] >= p["top"][1]["prob"] and "theta" not in p
    # a paper-defense model without a pool: fresh noise fools, never the other images of the request
    assert report["fools"] == "noise" and report["providers"]["processing"] == "CPUExecutionProvider"
    assert "CPUExecutionProvider" in res.stderr  # says which provider ran
    assert len(record_keys) == 1 and len(record_keys[0]) == 4 and all(p["sent"] for p in report["predictions"])
    leaked = [s for s in _key_strings(record_keys) if s in res.stdout + res.stderr]
    assert not leaked
    # the same images again: answered from the device's cache, nothing sent, no new key drawn
    text = _invoke("infer", "--model-dir", model_dir, images)
    assert text.exit_code == 0 and len(text.stdout.strip().splitlines()) == 4
    assert all(line.endswith("(cached)") for line in text.stdout.strip().splitlines())
    assert len(record_keys) == 1 and "theta" not in text.stdout + text.stderr
    again = json.loads(_invoke("infer", "--model-dir", model_dir, images, "--json", "--top-k", "2").stdout)
    assert [p["top"] for p in again["predictions"]] == [p["top"] for p in report["predictions"]]
    assert "--reveal-key" not in _invoke("infer", "--help").stdout  # the key is never shown, not even on request


def test_processing_receives_only_the_rotated_features(exported, record_keys, caplog):
    model_dir, images = exported
    local = Pipeline.from_model_dir(model_dir, provider="cpu")
    calls = []

    def recorder(*args, **kwargs):
        calls.append((args, kwargs))
        return local.process(args[0])

    pipe = Pipeline.from_model_dir(model_dir, provider="cpu", processing=recorder)
    assert [i.name for i in local.sessions["processing"].get_inputs()] == ["x"]
    imgs = np.random.default_rng(1).random((3, 1, 32, 32), dtype=np.float32)
    caplog.set_level(logging.DEBUG)
    logits = [pipe.predict(imgs), pipe.predict(imgs[::-1] * 0.5)]  # the device's own fools and keys
    assert len(calls) == 2 and all(len(a) == 1 and not kw for a, kw in calls)
    x = calls[0][0][0]
    assert x.shape == (3, 2, 6, 28, 28) and x.dtype == np.float32
    theta = record_keys[0]
    # undoing the secret rotation gives the image's own feature in the real part: x = e^{i theta}(a + i b)
    back = np.stack([x[:, 0] * np.cos(theta)[:, None, None, None] + x[:, 1] * np.sin(theta)[:, None, None, None],
                     x[:, 1] * np.cos(theta)[:, None, None, None] - x[:, 0] * np.sin(theta)[:, None, None, None]], 1)
    np.testing.assert_allclose(back[:, 0], local.features(imgs), rtol=1e-4, atol=1e-5)
    assert all(np.abs(b - local.features(imgs)).max() > 1e-2 for b in back[:, 1])  # b is never the image's a
    assert np.abs(x - back).max() > 1e-2  # what is sent is rotated, not the plain (a, b)
    np.testing.assert_allclose(np.hypot(x[:, 0], x[:, 1]), np.hypot(back[:, 0], back[:, 1]), rtol=1e-4, atol=1e-5)
    assert np.abs(calls[1][0][0] - x).max() > 1e-2  # a fresh key per call
    assert not [s for s in _key_strings(record_keys) if s in caplog.text]

    # the right key reproduces the logits; a wrong key changes the predictions
    h = local.process(x)
    np.testing.assert_allclose(local.decode(h, rotation_key_np(theta)), logits[0], rtol=1e-5, atol=1e-6)
    # Re[h e^{-i(t+pi)}] = -Re[h e^{-it}]: the logits mirrored about the decoder's bias, the same for every
    # image (an argmax check here depended on the random weights, hence on which tests ran first)
    flipped = local.decode(h, rotation_key_np(theta + np.float32(math.pi)))
    mirror = flipped + logits[0]
    np.testing.assert_allclose(mirror, np.broadcast_to(mirror[0], mirror.shape), rtol=1e-4, atol=1e-5)
    assert np.abs(flipped - logits[0]).max() > 1e-3
    wrong = local.decode(h, rotation_key_np(cvconvert.device.keys.secure_angles(3)))
    assert np.abs(wrong - logits[0]).max() > 1e-3 * max(1.0, np.abs(logits[0]).max())


def test_runtime_and_infer_import_no_torch(exported):
    model_dir, images = exported
    code = ("import sys; from cvconvert.cli.main import app; "
            f"app(['infer', '--model-dir', {str(model_dir)!r}, {str(images)!r}], standalone_mode=False); "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "print('TORCH', bad[:3], file=sys.stderr); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(res.stdout.strip().splitlines()) == 4


def test_fooling_inputs_are_private():
    imgs = np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32)
    fools, how = choose_fools(imgs)
    assert how == "noise" and fools.shape == imgs.shape
    assert np.abs(fools).max() > 0.05 and not np.allclose(fools, imgs)  # never b = 0, never the image
    assert not np.allclose(fallback_fool(imgs[0]), fallback_fool(imgs[0]))  # fresh randomness
    assert not np.allclose(np.flip(fools, -1), imgs)
    batch = np.random.default_rng(1).random((4, 1, 32, 32), dtype=np.float32)
    fools, how = choose_fools(batch)
    assert how == "batch" and all(not np.array_equal(f, b) for f, b in zip(fools, batch))
    pool = np.random.default_rng(2).random((5, 1, 32, 32), dtype=np.float32)
    fools, how = choose_fools(batch, pool)
    assert how == "fool-dir" and all(any(np.array_equal(f, p) for p in pool) for f in fools)


def _pool(model_dir, tmp_path, n=12, name="pool", seed=10):
    """A fool pool of n random PNGs made with `cvconvert fools create` (the public-data check is off:
    no data set is on the test machine's default paths for these random pictures anyway)."""
    src = tmp_path / f"{name}-src"
    src.mkdir()
    for i in range(n):
        _png(src / f"f{i}.png", seed=seed + i)
    res = _invoke("fools", "create", tmp_path / name, src, "--model-dir", model_dir, "--no-check-public")
    assert res.exit_code == 0, res.stderr
    return tmp_path / name


def test_single_image_warns_and_fool_dir_is_used(exported, tmp_path):
    model_dir, images = exported
    one = _invoke("infer", "--model-dir", model_dir, images / "img0.png")
    assert one.exit_code == 0 and "random noise" in one.stderr
    pool = _pool(model_dir, tmp_path)
    with_dir = _invoke("infer", "--model-dir", model_dir, images / "img1.png", "--fool-dir", pool, "--json")
    assert with_dir.exit_code == 0 and json.loads(with_dir.stdout)["fools"] == "pool"
    assert "random noise" not in with_dir.stderr
    status = json.loads(_invoke("fools", "status", pool, "--json").stdout)
    assert (status["count"], status["used"], status["remaining"]) == (12, 1, 11)
    # a plain folder of images is not a pool: say how to make one
    _one_line_error(_invoke("infer", "--model-dir", model_dir, images / "img2.png", "--fool-dir", images),
                    "not a fool pool", "cvconvert fools create")


def test_exchange_model_refuses_a_noise_fool(exported, tmp_path):
    """With the exchange key law a noise fool would give the real reading away, and the other images of a
    batch may not be fools: only a fool pool will do."""
    d = _copy_onnx(exported[0], tmp_path / "ex", keep_report=True)
    man = json.loads((d / "cvconvert.json").read_text())
    (d / "cvconvert.json").write_text(json.dumps({**man, "key_law": "exchange"}))
    images = exported[1]
    _one_line_error(_invoke("infer", "--model-dir", d, images / "img0.png"), "key law (exchange)", "fools create")
    _one_line_error(_invoke("infer", "--model-dir", d, images), "key law (exchange)", "fools create")  # a batch too
    pool = _pool(d, tmp_path)
    res = _invoke("infer", "--model-dir", d, images, "--fool-dir", pool, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["fools"] == "pool"
    # the library refuses it too
    pipe = Pipeline.from_model_dir(d, provider="cpu")
    with pytest.raises(CvError, match=r"key law \(exchange\)"):
        pipe.predict(np.full((1, 1, 32, 32), 0.3, np.float32))
    with pytest.raises(CvError, match=r"key law \(exchange\)"):
        pipe.predict(np.random.default_rng(5).random((2, 1, 32, 32), dtype=np.float32))


def test_explicit_graph_paths_find_the_manifest(exported):
    model_dir, images = exported
    o = model_dir / "onnx"
    res = _invoke("infer", "--encoder", o / "encoder.onnx", "--processing", o / "processing.onnx",
                  "--decoder", o / "decoder.onnx", images, "--provider", "cpu")
    assert res.exit_code == 0 and len(res.stdout.strip().splitlines()) == 4


def test_image_size_and_channels(exported, tmp_path):
    model_dir, _ = exported
    small = _png(tmp_path / "small.png", size=(30, 30))  # 28x28 is Fashion-MNIST's own size: padded (test_preprocess)
    _one_line_error(_invoke("infer", "--model-dir", model_dir, small), "30x30", "--resize")
    res = _invoke("infer", "--model-dir", model_dir, small, "--resize")
    assert res.exit_code == 0 and "resized from 30x30 to 32x32" in res.stderr
    rgb = _png(tmp_path / "rgb.png", mode="RGB")
    res = _invoke("infer", "--model-dir", model_dir, rgb)
    assert res.exit_code == 0 and "has 3 channel(s), the model takes 1: converted to L" in res.stderr


def test_non_image_files(exported, tmp_path):
    model_dir, _ = exported
    fake = tmp_path / "fake.png"
    fake.write_text("not a picture")
    _one_line_error(_invoke("infer", "--model-dir", model_dir, fake), "fake.png", "not a readable PNG/JPEG")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    _one_line_error(_invoke("infer", "--model-dir", model_dir, txt), "notes.txt")
    gif = tmp_path / "a.gif"
    Image.new("L", (32, 32)).save(gif)
    _one_line_error(_invoke("infer", "--model-dir", model_dir, gif), "GIF")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(_invoke("infer", "--model-dir", model_dir, empty), "no PNG/JPEG")
    _one_line_error(_invoke("infer", "--model-dir", model_dir, tmp_path / "missing.png"), "does not exist")


def test_model_dir_without_onnx(tmp_path, exported):
    bare = tmp_path / "bare"
    convert_to_dir("lenet", bare, data="fashion-mnist")
    _one_line_error(_invoke("infer", "--model-dir", bare, exported[1]), "no onnx/", "cvconvert export")


def test_stale_export_is_flagged(exported, tmp_path):
    """infer warns when model.pt changed after export (the graphs, not the new weights, would run)."""
    from cvconvert.device.artifacts import export_provenance

    d = _copy_onnx(exported[0], tmp_path / "copy", keep_report=True)
    assert export_provenance(d) == "current"
    res = _invoke("infer", "--model-dir", d, exported[1])
    assert res.exit_code == 0 and "exported from an earlier" not in res.stderr
    sd = torch.load(d / "model.pt", weights_only=True)
    sd["processing.conv2.weight"] += 1.0  # e.g. trained further after the export
    torch.save(sd, d / "model.pt")
    assert export_provenance(d) == "stale"
    res = _invoke("infer", "--model-dir", d, exported[1])
    assert res.exit_code == 0, res.output
    assert "exported from an earlier" in res.stderr and "cvconvert export" in res.stderr
    (d / "onnx" / "export.json").unlink()
    assert export_provenance(d) == "unknown"  # graphs without their export record
    shutil.rmtree(d / "onnx")
    assert export_provenance(d) == "not exported"


def _copy_onnx(model_dir: Path, dst: Path, keep_report: bool) -> Path:
    shutil.copytree(model_dir, dst)
    if not keep_report:
        (dst / "onnx" / "export.json").unlink()
    return dst


def test_tampered_graphs(exported, tmp_path):
    model_dir, images = exported
    # a valid graph whose weights changed after export: the recorded sha256 catches it
    d = _copy_onnx(model_dir, tmp_path / "a", keep_report=True)
    m = onnx.load(str(d / "onnx" / "processing.onnx"))
    init = max(m.graph.initializer, key=lambda t: np.prod(t.dims))
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 2, init.name))
    onnx.save(m, str(d / "onnx" / "processing.onnx"))
    _one_line_error(_invoke("infer", "--model-dir", d, images), "processing.onnx", "modified after export")
    # a corrupt file with no report next to it: ONNX Runtime refuses to load it
    d = _copy_onnx(model_dir, tmp_path / "b", keep_report=False)
    blob = (d / "onnx" / "decoder.onnx").read_bytes()
    (d / "onnx" / "decoder.onnx").write_bytes(blob[: len(blob) // 2])
    _one_line_error(_invoke("infer", "--model-dir", d, images), "decoder.onnx", "cannot load")


def test_frozen_batch_graph_is_refused(exported, tmp_path):
    model_dir, images = exported
    d = _copy_onnx(model_dir, tmp_path / "frozen", keep_report=False)
    model, _ = load_model(model_dir)
    model.eval()
    buf = io.BytesIO()
    torch.onnx.export(model.processing, (torch.randn(2, 2, 6, 28, 28),), buf, input_names=["x"],
                      output_names=["h"], opset_version=18, dynamo=False)  # no dynamic axes: batch frozen at 2
    (d / "onnx" / "processing.onnx").write_bytes(buf.getvalue())
    _one_line_error(_invoke("infer", "--model-dir", d, images), "processing", "frozen to 2")


def test_server_option_without_remote_module(exported, monkeypatch):
    model_dir, images = exported
    monkeypatch.setitem(sys.modules, "cvconvert.device.remote", None)  # as if the module were absent
    _one_line_error(_invoke("infer", "--model-dir", model_dir, images, "--server", "http://127.0.0.1:9"),
                    "--server needs cvconvert.device.remote")


def test_bad_provider_and_options(exported):
    model_dir, images = exported
    _one_line_error(_invoke("infer", "--model-dir", model_dir, images, "--provider", "tpu"), "unknown provider")
    _one_line_error(_invoke("infer", images), "--model-dir")
