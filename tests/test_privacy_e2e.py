"""An independent check of the device's rule (no feature vector in two transmissions), end to end.

The device is used exactly as docs/infer.md says: `cvconvert infer` with a fool pool (a batch of images in
one call, then the same image again), and `Pipeline.predict` from the library. The processing part is
wrapped by a recorder that keeps every x the cloud receives; the span-intersection attack
(cvconvert/attacks/span.py) then compares all of them. The control sends the same images the old way
(the other images of the batch as fools) and must be exposed, so the check can fail.
"""

import json

import numpy as np
import pytest
import torch

from cvconvert.cli.infer import load_image
from cvconvert.device.keylaws import rotation_key_np
from cvconvert.attacks import span
from cvconvert.build import convert_to_dir
from cvconvert.export import export_model_dir
from cvconvert.device.fools import FoolPool
from cvconvert.device.pipeline import Pipeline
from conftest import invoke as _invoke
from conftest import png as _png

N_IMAGES, N_FOOLS = 8, 16


@pytest.fixture(scope="module")
def device(lenet_exported):
    """An exported LeNet (Fashion-MNIST shape), 8 images to classify and a pool of 16 private fools."""
    root = lenet_exported
    model = root / "lenet"
    images, fools = root / "images", root / "fools-src"
    images.mkdir(), fools.mkdir()
    for i in range(N_IMAGES):
        _png(images / f"img{i}.png", seed=100 + i)
    for i in range(N_FOOLS):
        _png(fools / f"f{i}.png", seed=200 + i)
    return model, images, fools, root


@pytest.fixture
def recorder(monkeypatch):
    """Every x that reaches the processing part (what an honest-but-curious cloud keeps)."""
    seen = []
    real = Pipeline.process

    def recording(self, x):
        seen.append(np.array(x, copy=True))
        return real(self, x)

    monkeypatch.setattr(Pipeline, "process", recording)
    return seen


def _exposed(sent: list[np.ndarray], truth: np.ndarray) -> np.ndarray:
    """|cos| of each true feature with the best vector the span attack recovers from all transmissions."""
    x = torch.from_numpy(np.concatenate(sent))
    best, _ = span.best_match(span.intersect(x), torch.from_numpy(truth))
    return best.numpy()


def test_infer_and_predict_expose_nothing_across_queries(device, recorder, tmp_path):
    model, images, fools_src, _ = device
    pool = tmp_path / "pool"
    made = _invoke("fools", "create", pool, fools_src, "--model-dir", model, "--no-check-public")
    assert made.exit_code == 0, made.stderr
    # 1. one `cvconvert infer` call with a batch of 8 images
    batch = _invoke("infer", images, "--model-dir", model, "--fool-dir", pool, "--json")
    assert batch.exit_code == 0, batch.stderr
    # 2. the same image again, twice: answered on the device, never re-sent
    for _ in range(2):
        again = _invoke("infer", images / "img0.png", "--model-dir", model, "--fool-dir", pool, "--json")
        assert again.exit_code == 0, again.stderr
        assert [p["sent"] for p in json.loads(again.stdout)["predictions"]] == [False]
    # 3. the library: Pipeline.predict on two of the images once more
    pipe = Pipeline.from_model_dir(model, pool=FoolPool.open(pool))
    pixels = np.stack([load_image(images / f"img{i}.png", pipe.manifest, False) for i in range(N_IMAGES)])
    pipe.predict(pixels[1:3])
    assert pipe.last["sent"] == 0  # already sent by step 1: the guard answers from its cache
    sent = recorder[:]
    assert sum(len(x) for x in sent) == N_IMAGES  # each image crossed the network exactly once
    a = pipe.features(pixels)
    b = np.load(pool / "features.npy")
    assert _exposed(sent, a).max() < span.EXACT
    assert _exposed(sent, b).max() < span.EXACT  # nor any fool (which would tell the image apart)
    # control: the same 8 images sent the old way, each fooled by the next image of its batch, are all exposed
    recorder.clear()
    theta = rotation_key_np(np.random.default_rng(0).uniform(0, 2 * np.pi, N_IMAGES))  # the paper's angles, as keys
    pipe.predict(pixels, np.roll(pixels, 1, axis=0)[:, None], theta)
    assert (_exposed(recorder[:], a) >= span.EXACT).all()


def _appearances(sent: list[np.ndarray], vectors: np.ndarray, exact: float = span.EXACT) -> np.ndarray:
    """For each vector [M, ...]: in how many transmissions x [P, ...] it lies (|cos| with its projection
    onto span of the P parts >= exact). The device's rule: at most one."""
    q = span.bases(torch.from_numpy(np.concatenate(sent)))                           # [T, D, P]
    v = torch.from_numpy(vectors).reshape(len(vectors), -1).to(torch.float64)
    v = v / v.norm(dim=1, keepdim=True)
    inside = torch.einsum("tdp,md->mtp", q, v).norm(dim=2)                          # [M, T]
    return (inside >= exact).sum(1).numpy()


def test_p3_device_sends_each_feature_once(device, recorder, tmp_path):
    """P = 3: each image travels with P-1 = 2 pool fools; no image or fool feature lies in two
    transmissions, repeats stay on the device; the control (one fool given to two images) is seen."""
    _, images, fools_src, root = device
    model = root / "lenet3"
    convert_to_dir("lenet", model, data="fashion-mnist", parts=3)
    export_model_dir(model)
    pool = tmp_path / "pool3"
    made = _invoke("fools", "create", pool, fools_src, "--model-dir", model, "--no-check-public")
    assert made.exit_code == 0, made.stderr
    pipe = Pipeline.from_model_dir(model, pool=FoolPool.open(pool))
    pixels = np.stack([load_image(images / f"img{i}.png", pipe.manifest, False) for i in range(6)])
    pipe.predict(pixels[:4])
    pipe.predict(pixels[4:6])
    pipe.predict(pixels[:2])
    assert pipe.last["sent"] == 0  # repeats: answered from the cache
    sent = recorder[:]
    assert [x.shape[1] for x in sent] == [3, 3] and sum(len(x) for x in sent) == 6
    images_seen = _appearances(sent, pipe.features(pixels))
    fools_seen = _appearances(sent, np.load(pool / "features.npy"))
    assert (images_seen == 1).all(), images_seen          # each image sent exactly once
    assert fools_seen.max() == 1 and fools_seen.sum() == 6 * 2, fools_seen  # 12 fools, each once
    # control: the same fool for two images puts one feature into two transmissions, and the check sees it
    recorder.clear()
    rng = np.random.default_rng(1)
    shared = rng.random((1, 1, 32, 32), dtype=np.float32)
    fools = np.stack([np.concatenate([shared, rng.random((1, 1, 32, 32), dtype=np.float32)]) for _ in range(2)])
    pipe.predict(pixels[:2], fools, pipe.new_keys(2))
    assert _appearances(recorder[:], pipe.features(shared)).tolist() == [2]
