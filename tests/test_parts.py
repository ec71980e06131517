"""P-part models: encoder/decoder modules, fool indices, and (end to end) convert -> train -> export -> serve."""

import pytest
import torch
from torch import nn

from cvconvert.complex.functional import transform
from cvconvert.errors import CvError
from cvconvert.device.keylaws import KEY_LAWS
from cvconvert.parts import KeyedDecoder, KeyedEncoder, check_parts, fool_indices, random_key

HAAR = KEY_LAWS["haar"]


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_keyed_encoder_decoder_roundtrip(parts):
    g = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU())
    enc, dec = KeyedEncoder(g, parts), KeyedDecoder(nn.Flatten())
    image, fool = torch.rand(5, 1, 6, 6), torch.rand(5, parts - 1, 1, 6, 6)
    key = random_key(5, parts, HAAR)
    x = enc(image, fool, key)
    assert x.shape == (5, parts, 3, 6, 6)
    f = torch.stack([g(image)] + [g(fool[:, i]) for i in range(parts - 1)], 1)
    torch.testing.assert_close(x, transform(f, key), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dec(x, key), g(image).flatten(1), atol=1e-5, rtol=1e-5)


def test_fool_indices_distinct_and_never_self():
    idx = fool_indices(6, 3)
    assert idx.shape == (6, 3)
    assert all(len(set(row.tolist())) == 3 and i not in row.tolist() for i, row in enumerate(idx))
    law = torch.zeros(6, 6)
    law[:, 0], law[:, 1] = 1.0, 1.0
    idx = fool_indices(6, 1, law)
    assert all(int(j) in (0, 1) and int(j) != i for i, j in enumerate(idx[:, 0]) if i > 1)


@pytest.mark.parametrize("bad", [1, 5, "x", 2.5])
def test_check_parts_refuses(bad):
    with pytest.raises(CvError):
        check_parts(bad)


# --- end to end: convert -> train a few steps -> export -> infer through `cvconvert serve` (P = 3) --------

import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cvconvert.cli.main import app  # noqa: E402
from cvconvert.complex.layers import max_pool_gaps  # noqa: E402
from cvconvert.export import compare_outside_ties  # noqa: E402
from cvconvert.modeldir import load_model  # noqa: E402
from conftest import invoke  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _invoke(*args):
    return invoke(*args, check=True)


def _pngs(folder: Path, count: int, offset: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(offset)
    for i in range(count):  # smooth random images: distinct, and far apart for the near-duplicate guard
        small = rng.integers(0, 256, (8, 8), dtype=np.uint8)
        Image.fromarray(small).resize((32, 32), Image.BILINEAR).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def served_p3(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    out = root / "lenet3"
    _invoke("convert", "lenet", "--split", "paper", "--data", "fashion-mnist", "-o", out, "--parts", 3)
    _invoke("train", out, "--data", "fashion-mnist", "--epochs", 1, "--train-limit", 256, "--max-steps", 3,
            "--batch-size", 64, "--val-fraction", 0.1)
    _invoke("export", out)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cvconvert.cli", "serve", str(out), "--port", str(port), "--name", "proc"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, "cvconvert serve exited"
                time.sleep(0.1)
        yield out, url, root
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_p3_convert_train_export_serve_infer(served_p3):
    out, url, root = served_p3
    manifest = json.loads((out / "cvconvert.json").read_text())
    assert manifest["parts"] == 3 and manifest["history"]["steps"] == 3
    report = json.loads((out / "onnx" / "export.json").read_text())
    assert report["rotation"]["parts"] == 3 and report["rotation"]["reflections"] > 0  # validated at export

    # The low-level path through the server, with explicit fools and keys, equals the PyTorch model.
    from cvconvert.device.remote import RemoteProcessing
    from cvconvert.device.pipeline import Pipeline

    seen = []
    remote = RemoteProcessing(url, "proc")

    def spy(x):
        seen.append(x.copy())
        return remote(x)

    pipe = Pipeline.from_model_dir(out, processing=spy, guard=None)
    rng = np.random.default_rng(0)
    images, fools = rng.random((4, 1, 32, 32), dtype=np.float32), rng.random((4, 2, 1, 32, 32), dtype=np.float32)
    key = random_key(4, 3, HAAR).numpy()
    logits = pipe.predict(images, fools, key)
    model, _ = load_model(out)
    with torch.no_grad(), max_pool_gaps(model.processing) as pools:
        want = model.eval()(torch.from_numpy(images), torch.from_numpy(fools), torch.from_numpy(key)).numpy()
    compare_outside_ties("pipeline vs PyTorch", logits, want, pools.gaps, 1e-4, 1e-4)  # a tie may flip
    assert seen[0].shape == (4, 3, 6, 28, 28)  # the server saw x = Q [a; b_1; b_2] only

    # The device's rules through `cvconvert infer --server`: P-1 = 2 never-used pool fools per image.
    pool, images_dir = root / "pool", _pngs(root / "images", 3, 1)
    _invoke("fools", "create", pool, "--model-dir", out, _pngs(root / "private", 10, 2))
    res = _invoke("infer", "--model-dir", out, images_dir, "--fool-dir", pool, "--server", url, "--model-name", "proc",
                  "--json")
    preds = json.loads(res.stdout)
    assert preds["fools"] == "pool" and len(preds["predictions"]) == 3
    assert all(p["sent"] for p in preds["predictions"])
    status = json.loads(_invoke("fools", "status", pool, "--json").stdout)
    assert status["remaining"] <= 10 - 3 * 2, status
    # A pool too small for P-1 fools per image is refused in one line, nothing sent.
    more = _pngs(root / "more", 3, 3)
    res = CliRunner().invoke(app, [str(a) for a in ("infer", "--model-dir", out, more, "--fool-dir", pool,
                                                      "--server", url, "--model-name", "proc")])
    assert res.exit_code != 0 and res.stderr.strip().splitlines()[-1].startswith("error:")


@pytest.mark.parametrize("arch,split,parts", [("lenet", "paper", 3), ("resnet20", "alpha", 4)])
def test_exported_processing_is_equivariant_under_orthogonal_keys(tmp_path, arch, split, parts):
    """processing.onnx (ResNet-20: folded batch-norms and skips) commutes with Haar keys, det +1 and -1."""
    import onnxruntime as ort

    from cvconvert.build import convert_to_dir
    from cvconvert.export import export_parts, signed_keys
    from cvconvert.device.keys import transform_np

    convert_to_dir(arch, tmp_path / "m", split=split, data="fashion-mnist", parts=parts)
    model, manifest = load_model(tmp_path / "m")
    protos, _ = export_parts(model, manifest)
    sess = ort.InferenceSession(protos["processing"].SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((6, parts) + tuple(manifest["feature_shape"])).astype(np.float32)
    q = signed_keys(6, parts)
    assert sorted(np.sign(np.linalg.det(q))) == [-1] * 3 + [1] * 3
    h = sess.run(None, {"x": x})[0]
    hq = sess.run(None, {"x": transform_np(x, q)})[0]
    assert h.shape[1] == parts
    with torch.no_grad(), max_pool_gaps(model.processing) as pools:
        want = model.processing.eval()(torch.from_numpy(x)).numpy()
    # atol 1e-4 x peak; a sample at a max-modulus tie may flip under the key's rounding (export.TIE_GAP)
    compare_outside_ties("equivariance", hq, transform_np(h, q), pools.gaps, 1e-4, 0.0)
    # The parts interact (through their norm): scaling part 0 alone changes the other parts' outputs, so
    # the equivariance above is not that of a map acting on each part separately.
    uneven = x.copy()
    uneven[:, 0] *= 3.0
    assert np.abs(sess.run(None, {"x": uneven})[0][:, 1:] - h[:, 1:]).max() > 1e-4
    compare_outside_ties("processing.onnx vs PyTorch", h, want, pools.gaps, 1e-4, 1e-3)
