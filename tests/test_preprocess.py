"""cvconvert.device.preprocess: a data set's native images reach the model the same way in training (cvconvert.data)
and on the device (`cvconvert infer`, the Pipeline), driven by the spec the manifest records."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from cvconvert.cli.main import app
from cvconvert.device.keylaws import rotation_key_np
from cvconvert.build import convert_to_dir
from cvconvert.data import _image_transform, get_dataset
from cvconvert.datasets import CELEBA_ATTRS
from cvconvert.errors import CvError
from cvconvert.device.preprocess import apply_steps, recorded_spec, spec_for, to_model_input

FASHION_SPEC = {"native": [28, 28], "steps": [{"pad": [2, 2, 2, 2]}]}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CVCONVERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CVCONVERT_DATA", raising=False)


def _manifest(name: str, shape) -> dict:
    return {"input_shape": list(shape), "data": {"name": name, "preprocess": spec_for(name, shape)}}


def _grey(size, seed) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)


def _fashion_files(folder, n_train=3, n_test=7) -> dict:
    """Fashion-MNIST's four idx .gz files with random 28x28 images; returns the images."""
    rng = np.random.default_rng(0)
    raw = {p: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for p, n in (("train", n_train), ("t10k", n_test))}
    folder.mkdir(parents=True)
    for prefix, images in raw.items():
        n = len(images)
        for name, blob in ((f"{prefix}-images-idx3-ubyte", struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()),
                           (f"{prefix}-labels-idx1-ubyte", struct.pack(">II", 2049, n) + bytes(range(n)))):
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(blob)
    return raw


# ---------------------------------------------------------------------------------------------------
# training (cvconvert.data's real loaders) and the device function agree


def test_fashion_training_items_equal_device_input(tmp_path):
    """The idx files through get_dataset (what training sees) == the same 28x28 images through
    to_model_input, exactly, for a manifest written by convert."""
    raw = _fashion_files(tmp_path / "fm")
    ds = get_dataset("fashion-mnist", False, data_dir=tmp_path / "fm")
    manifest = convert_to_dir("lenet", tmp_path / "m", data="fashion-mnist")
    assert manifest["data"]["preprocess"] == FASHION_SPEC
    for i, img in enumerate(raw["t10k"]):
        device = to_model_input(Image.fromarray(img, "L"), manifest)
        assert device.shape == (1, 32, 32) and np.array_equal(ds[i][0].numpy(), device)
    batch = to_model_input(raw["t10k"][:, None], manifest)  # arrays, batched, as the Pipeline passes them
    assert np.array_equal(batch, np.stack([ds[i][0].numpy() for i in range(7)]))


def test_celeba_native_images_match_training_transform(tmp_path):
    """178x218 CelebA files through get_dataset (torchvision's CenterCrop + Resize) == to_model_input."""
    base = tmp_path / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, 5)]
    rng = np.random.default_rng(1)
    for n in names:
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8), "RGB").save(base / "img_align_celeba" / n)
    attrs = "".join(f"{n} " + " ".join(["1"] * 40) + "\n" for n in names)
    (base / "list_attr_celeba.txt").write_text("4\n" + " ".join(CELEBA_ATTRS) + "\n" + attrs)
    (base / "list_eval_partition.txt").write_text("".join(f"{n} {(0, 0, 2, 2)[i]}\n" for i, n in enumerate(names)))
    (base / "identity_CelebA.txt").write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    (base / "list_bbox_celeba.txt").write_text("4\nimage_id x_1 y_1 width height\n"
                                               + "".join(f"{n} 1 2 3 4\n" for n in names))
    (base / "list_landmarks_align_celeba.txt").write_text("4\nx y\n" + "".join(f"{n} 1 2\n" for n in names))
    ds = get_dataset("celeba", True, data_dir=tmp_path)
    manifest = _manifest("celeba", (3, 64, 64))
    for i, n in enumerate(names[:2]):
        with Image.open(base / "img_align_celeba" / n) as im:
            device = to_model_input(im, manifest)
        assert device.shape == (3, 64, 64) and np.array_equal(ds[i][0].numpy(), device)


@settings(max_examples=15, deadline=None)
@given(st.integers(20, 300), st.integers(20, 300), st.integers(0, 2 ** 31))
def test_crop_and_resize_steps_equal_torchvision_on_random_images(h, w, seed):
    """The steps recorded for CelebA == the torchvision transform data.py builds, on images of any size."""
    im = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    crop = min(h, w)
    spec = {"native": [h, w], "steps": [{"center_crop": [crop, crop]}, {"resize": [64, 64]}]}
    ours = to_model_input(im, {"input_shape": [3, 64, 64], "data": {"preprocess": spec}})
    assert np.array_equal(ours, _image_transform((3, 64, 64), crop=crop)(im).numpy())


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 40), st.integers(1, 40), st.integers(0, 2 ** 31))
def test_pad_step_equals_torch_pad(n, c, h, w, seed):
    """The pad step == torch.nn.functional.pad, which training used before the spec existed."""
    images = np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8)
    spec = {"native": None, "steps": [{"pad": [1, 3, 2, 0]}]}
    expected = torch.nn.functional.pad(torch.from_numpy(images), (2, 0, 1, 3)).numpy()
    assert np.array_equal(apply_steps(images, spec), expected)
    floats = images.astype(np.float32) / 255
    assert np.array_equal(apply_steps(floats, spec), expected.astype(np.float32) / 255)


def test_image_folder_resize_matches_training(tmp_path):
    """ImageFolder has no native size: with resize=True the device resizes exactly as training does."""
    for i, size in enumerate([(17, 40), (64, 33)]):
        path = tmp_path / "imgs" / "train" / f"c{i}" / "0.png"
        path.parent.mkdir(parents=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, size[::-1] + (3,), dtype=np.uint8), "RGB").save(path)
    name = f"folder:{tmp_path / 'imgs'}"
    ds = get_dataset(name, True)
    manifest = _manifest(name, (3, 32, 32))
    assert manifest["data"]["preprocess"] == {"native": None, "steps": [{"resize": [32, 32]}]}
    for i in range(2):
        with Image.open(tmp_path / "imgs" / "train" / f"c{i}" / "0.png") as im:
            with pytest.raises(CvError, match="pass --resize"):
                to_model_input(im, manifest)
            warnings = []
            device = to_model_input(im, manifest, resize=True, warn=warnings.append)
        assert np.array_equal(ds[i][0].numpy(), device) and "resized from" in warnings[0]


# ---------------------------------------------------------------------------------------------------
# the manifest's record


def test_spec_recorded_and_read_back():
    assert spec_for("fashion-mnist", (1, 32, 32)) == FASHION_SPEC
    assert spec_for("fashion-mnist", (1, 28, 28)) is None  # training would refuse that model
    assert spec_for("cifar10", (3, 32, 32)) == {"native": [32, 32], "steps": []}
    assert spec_for("nonsense", (3, 32, 32)) is None
    old = {"input_shape": [1, 32, 32], "data": {"name": "fashion-mnist"}}  # converted before the record existed
    assert recorded_spec(old) == FASHION_SPEC
    trained = {**old, "history": {"data": {"name": "cifar10"}}}  # the data set training used wins
    assert recorded_spec(trained) is None
    assert recorded_spec({**old, "data": {"name": "fashion-mnist", "preprocess": None}}) is None
    for bad, msg in (({"steps": [{"blur": [1, 1]}]}, "unknown step 'blur'"), ({"steps": "pad"}, "malformed"),
                     ({"native": [28], "steps": []}, "malformed"), ({"steps": [{"resize": [0, 3]}]}, "malformed")):
        with pytest.raises(CvError, match=msg):
            recorded_spec({**old, "data": {"preprocess": bad}})


def test_training_records_the_steps_it_used(tmp_path):
    """A model dir without the record (written before it existed) gets it from its first training."""
    from cvconvert.train import TrainConfig, train

    _fashion_files(tmp_path / "fm", n_train=8, n_test=4)
    convert_to_dir("lenet", tmp_path / "m", data="fashion-mnist")
    path = tmp_path / "m" / "cvconvert.json"
    manifest = json.loads(path.read_text())
    del manifest["data"]["preprocess"]
    path.write_text(json.dumps(manifest))
    train(tmp_path / "m", TrainConfig(data="fashion-mnist", data_dir=str(tmp_path / "fm"), epochs=1, max_steps=1,
                                      batch_size=4, device="cpu", val_fraction=0.25), log=False)
    assert json.loads(path.read_text())["data"]["preprocess"] == FASHION_SPEC


def test_sizes_channels_and_dtypes():
    fashion = _manifest("fashion-mnist", (1, 32, 32))
    img = _grey((28, 28), 0)
    assert np.array_equal(to_model_input(img, fashion)[0, 2:30, 2:30], img / np.float32(255))
    assert to_model_input(img.astype(np.float32) / 255, fashion).shape == (1, 32, 32)
    with pytest.raises(CvError, match=r"is 27x28; the model takes 32x32, or 28x28 .*--resize"):
        to_model_input(_grey((27, 28), 0), fashion)
    cifar = _manifest("cifar10", (3, 32, 32))
    with pytest.raises(CvError, match=r"is 28x28; the model takes 32x32: pass --resize"):
        to_model_input(Image.fromarray(img), cifar, warn=lambda m: None)
    warnings = []
    rgb = to_model_input(Image.fromarray(img), cifar, resize=True, warn=warnings.append)
    assert rgb.shape == (3, 32, 32) and np.array_equal(rgb[0], rgb[2])
    assert warnings == ["image has 1 channel(s), the model takes 3: converted to RGB",
                        "image resized from 28x28 to 32x32"]
    with pytest.raises(CvError, match="expected .* C = 3"):
        to_model_input(np.zeros((1, 32, 32), np.uint8), cifar)
    with pytest.raises(CvError, match="dtype int64"):
        to_model_input(np.zeros((3, 32, 32), np.int64), cifar)


# ---------------------------------------------------------------------------------------------------
# `cvconvert infer` end to end


@pytest.fixture(scope="module")
def exported(lenet_exported):
    return lenet_exported


def test_infer_takes_a_28x28_fashion_png_like_its_padded_form(exported):
    """No options: infer reads the 28x28 PNG as its padded 32x32 form, so the two give the same logits for
    the same fool and key, and the device's near-duplicate guard sees one image twice."""
    from cvconvert.cli.infer import load_image
    from cvconvert.device.pipeline import Pipeline

    images = exported / "images"
    images.mkdir()
    img = _grey((28, 28), 3)
    Image.fromarray(img, "L").save(images / "a_native28.png")
    Image.fromarray(np.pad(img, 2), "L").save(images / "b_padded32.png")
    manifest = json.loads((exported / "lenet" / "cvconvert.json").read_text())
    x = np.stack([load_image(images / n, manifest, False) for n in ("a_native28.png", "b_padded32.png")])
    assert x.shape == (2, 1, 32, 32) and np.array_equal(x[0], x[1])
    pipe = Pipeline.from_model_dir(exported / "lenet", provider="cpu", guard=None)
    fools = np.random.default_rng(4).random((2, 1, 1, 32, 32), dtype=np.float32)[[0, 0]]
    theta = rotation_key_np(np.full(2, 0.7, np.float32))
    logits = pipe.predict(x, fools, theta)
    assert np.array_equal(logits[0], logits[1]) and np.ptp(logits[0]) > 1e-4  # not a flat answer

    res = CliRunner().invoke(app, ["infer", "--model-dir", str(exported / "lenet"), str(images), "--json",
                                   "--top-k", "10"])
    assert res.exit_code == 0, res.stderr
    assert "resized" not in res.stderr and "28x28" not in res.stderr
    native, padded = json.loads(res.stdout)["predictions"]
    assert native["top"] == padded["top"] and (native["sent"], padded["sent"]) == (True, False)

    bad = images.parent / "odd"
    bad.mkdir()
    Image.fromarray(_grey((27, 28), 5), "L").save(bad / "odd.png")
    res = CliRunner().invoke(app, ["infer", "--model-dir", str(exported / "lenet"), str(bad / "odd.png")])
    assert res.exit_code == 2 and "Traceback" not in res.stderr + res.stdout
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "28x28" in res.stderr
    assert "--resize" in res.stderr
