"""The query guard (issue 19): the device runs the cloud's principal-angle attack before it sends.

A tiny exported LeNet, Fashion-MNIST test images (skipped where the data set is absent), a recording cloud.
The control (the old device: fools used once, exact-repeat guard, a memory per pool) must show the leak;
the shipped device must not. Kept small: a few images, one core.
"""

import gzip
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cvconvert.attacks.principal import principal, which_is_real
from cvconvert.attacks.queries import shift
from cvconvert.build import convert_to_dir
from cvconvert.cli.main import app
from cvconvert.device.fools import FoolPool
from cvconvert.device.guard import SentGuard
from cvconvert.device.sketches import sketch
from cvconvert.device.pipeline import Pipeline
from cvconvert.device.screen import cosines, orth
from cvconvert.errors import CvError
from cvconvert.export import export_model_dir

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
pytestmark = pytest.mark.skipif(not FMNIST.is_file(), reason="Fashion-MNIST test images not installed")


def _images():
    with gzip.open(FMNIST, "rb") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    return np.pad(raw, ((0, 0), (2, 2), (2, 2)))[:, None].astype(np.float32) / 255


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("qguard")
    model = root / "lenet"
    convert_to_dir("lenet", model, data="fashion-mnist")
    export_model_dir(model)
    return model, root, _images()


class Cloud:
    def __init__(self, pipe):
        self.x, self.a, self.b = [], [], []
        real = pipe.combine

        def combine(a, b, theta):
            self.x.append(real(a, b, theta)), self.a.append(a), self.b.append(b if b.ndim == a.ndim + 1 else b[:, None])
            return self.x[-1]
        pipe.combine = combine


def _pool(model, path, pics):
    probe = Pipeline.from_model_dir(model, guard=None)
    f = probe.features(pics)
    return FoolPool.create(path, pics, f, features_sha256=probe.features_sha256, input_shape=probe.input_shape,
                           feature_shape=f.shape[1:])


def _send(model, pool, guard, requests):
    pipe = Pipeline.from_model_dir(model, pool=pool, guard=guard)
    pipe.on_warning = lambda m: None
    cloud = Cloud(pipe)
    answers, cloud.how = [], []
    for r in requests:
        try:
            answers.append(pipe.predict(r[None]))
        except CvError as exc:  # a refusal: nothing sent
            assert "would be told from its fools" in str(exc)
            answers.append(None)
        cloud.how += pipe.last.get("how", []) + [f"similar {w}" for w in pipe.last.get("why_similar", [])]
    return cloud, pipe, answers


def _real_share(cloud, rows=slice(None)) -> float:
    """which-is-real of each transmission's best pair (over `rows`): how often u names the image."""
    x, a, b = (np.concatenate(v) for v in (cloud.x, cloud.a, cloud.b))
    _, _, u = principal(x)
    real = which_is_real(u, a.reshape(len(a), -1), b.reshape(len(b), b.shape[1], -1))
    print("which-is-real", real.astype(int).tolist())
    return float(real[rows].mean())


def _pair_share(cloud) -> float:
    """Over the related pairs (transmissions 2i, 2i + 1): how often the pair's first principal vector lies
    nearer the second image than its fool."""
    x, a, b = (np.concatenate(v) for v in (cloud.x, cloud.a, cloud.b))
    hits = []
    for i in range(0, len(x) - 1, 2):
        _, _, u = principal(x[i:i + 2])
        hits.append(which_is_real(u[1:], a[i + 1:i + 2].reshape(1, -1), b[i + 1:i + 2].reshape(1, b.shape[1], -1))[0])
    return float(np.mean(hits))


def test_a_count_sketch_keeps_principal_cosines():
    rng = np.random.default_rng(0)
    d = 16384  # ResNet-20 alpha's feature: over sketches.EXACT_DIM, so sketched
    base = rng.normal(size=(4, d))
    for c in (0.3, 0.8, 0.95):
        near = c * base[:2] + np.sqrt(1 - c * c) * rng.normal(size=(2, d))
        exact = cosines(orth(base[:2])[None], orth(near))[0]
        sk = cosines(orth(sketch(base[:2]))[None], orth(sketch(near)))[0]
        assert np.abs(exact - sk).max() < 0.06, (c, exact, sk)


@pytest.mark.parametrize("kind", ["shift", "lookalike"])
def test_old_device_tells_related_images_apart_new_one_does_not(setup, tmp_path, kind):
    model, root, imgs = setup
    n = 30  # 12 pairs let the control fall to 0.42 and the new share reach 0.87 (CI, stop 24): too few
    victims = imgs[:n]
    if kind == "shift":
        related = np.stack([shift(v) for v in victims])
    else:  # the nearest other test image: a second photo of a look-alike
        flat = imgs[:3000].reshape(3000, -1)
        d = ((victims.reshape(n, -1)[:, None] - flat[None]) ** 2).sum(2)
        d[d < 1e-9] = np.inf
        related = imgs[d.argmin(1)]
    requests = [r for v, w in zip(victims, related) for r in (v, w)]
    old, _, _ = _send(model, _pool(model, tmp_path / "p-old", imgs[5000:5200]),
                      SentGuard(tmp_path / "old.npz", floor=1.0), requests)
    # the control: each related pair's principal vector names the image (measured 0.90-1.00, 32 runs)
    assert _pair_share(old) >= 0.8
    new, pipe, _ = _send(model, _pool(model, tmp_path / "p-new", imgs[5000:5200]),
                         SentGuard(tmp_path / "new.npz"), requests)
    # the guard acted on the related images: mirrored fools, fools of the stream's kind, or an earlier answer
    assert any(h != "coin" for h in new.how), new.how
    # a coin over the whole history (chance 0.5; 36-55 transmissions, measured 0.39-0.58 over 32 runs,
    # s.d. 0.05): 0.75 is 4-5 s.d. above chance
    assert _real_share(new) <= 0.75


def test_memory_survives_a_second_pool_and_a_new_model_version(setup, tmp_path, monkeypatch):
    model, root, imgs = setup
    monkeypatch.setenv("CVCONVERT_STATE_DIR", str(tmp_path / "state"))
    victims, photos = imgs[:4], imgs[5000:5060]
    first, _, answers = _send(model, _pool(model, tmp_path / "pool-a", photos), True, victims)
    again, pipe, cached = _send(model, _pool(model, tmp_path / "pool-b", photos), True, victims)
    # nothing sent from the first pool goes out again from the second, and its answer is the stored one (a
    # victim the first pool answered from a related image instead may go out now, for the first time:
    # 1 run in ~25 under CPU contention)
    probe = Pipeline.from_model_dir(model, guard=None)
    sent_first = [i for i in range(len(victims)) if _was_sent(first, probe, victims[i])]
    assert sent_first
    for i in sent_first:
        assert not _was_sent(again, probe, victims[i]), f"victim {i} was sent again from a second pool"
        np.testing.assert_allclose(cached[i], answers[i])
    # a new model version (other weights, another features graph): the kept pictures are re-embedded
    other = root / "lenet-v2"
    if not other.exists():
        convert_to_dir("lenet", other, data="fashion-mnist", seed=1)
        export_model_dir(other)
    third, pipe, _ = _send(other, _pool(other, tmp_path / "pool-c", photos), True, victims)
    # every victim sent under the first version is answered from the memory, not sent again (one the first
    # version answered from a related image instead may go out now, for the first time)
    probe = Pipeline.from_model_dir(other, guard=None)
    for i in sent_first:
        assert not _was_sent(third, probe, victims[i]), f"victim {i} was sent again under a new model version"
    # fresh images from pool c (the same photos): no fool whose picture pool a already sent goes out
    fresh, pipe, _ = _send(other, FoolPool.open(tmp_path / "pool-c"), True, imgs[100:104])
    feats = pipe.features(photos).reshape(len(photos), -1)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    first_b = pipe.features(np.concatenate([p for p in _fool_pictures(first, photos, model)]))
    sent_b = np.concatenate(fresh.b).reshape(-1, feats.shape[1])
    sent_b /= np.linalg.norm(sent_b, axis=1, keepdims=True)
    first_b = first_b.reshape(len(first_b), -1) / np.linalg.norm(first_b.reshape(len(first_b), -1), axis=1, keepdims=True)
    assert np.abs(sent_b @ first_b.T).max() < 0.999


def _was_sent(cloud, probe, image) -> bool:
    """Whether the cloud log holds a transmission whose image feature is this image's (|cos| >= 0.999)."""
    if not cloud.a:
        return False
    a = np.concatenate(cloud.a).reshape(-1, int(np.prod(cloud.a[0].shape[1:])))
    f = probe.features(image[None]).reshape(1, -1)
    return bool((np.abs(a @ f.T)[:, 0] / (np.linalg.norm(a, axis=1) * np.linalg.norm(f)) >= 0.999).any())


def _fool_pictures(cloud, photos, model):
    """The pictures of the fools a cloud log carries (matched back to the photos by feature)."""
    probe = Pipeline.from_model_dir(model, guard=None)
    f = probe.features(photos).reshape(len(photos), -1)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    b = np.concatenate(cloud.b).reshape(-1, f.shape[1])
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    # each fool is one of the photos, or a mirror fool (an affine variant of an earlier fool's picture,
    # cvconvert.device.mirror), which is no photo and lies below the guard's threshold of its source
    photo = np.abs(b @ f.T).max(1) >= 0.999
    assert photo.any() and (np.abs(b[~photo] @ f.T).max(1) < 0.995).all()
    return [photos[[int(np.argmax(np.abs(f @ v)))]] for v in b[photo]]  # by cosine: the photo each fool is


def test_the_guard_says_similar_in_json_and_text(setup, tmp_path, monkeypatch):
    from PIL import Image

    model, root, imgs = setup
    monkeypatch.setenv("CVCONVERT_STATE_DIR", str(tmp_path / "state"))
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(40):
        Image.fromarray((imgs[5000 + i, 0] * 255).astype(np.uint8)).save(src / f"{i}.png")
    run = CliRunner()
    assert run.invoke(app, ["fools", "create", str(tmp_path / "pool"), str(src), "--model-dir", str(model),
                            "--no-check-public"]).exit_code == 0
    pics = tmp_path / "mine"
    pics.mkdir()
    Image.fromarray((imgs[3, 0] * 255).astype(np.uint8)).save(pics / "a.png")
    Image.fromarray((imgs[3, 0] * 255).astype(np.uint8)).rotate(3, Image.BILINEAR).save(pics / "b.png")
    res = run.invoke(app, ["infer", str(pics), "--model-dir", str(model), "--fool-dir", str(tmp_path / "pool"),
                           "--guard-margin", "0", "--json"])
    assert res.exit_code == 0, res.output
    import json
    preds = json.loads(res.stdout)["predictions"]
    assert preds[0]["sent"] and not preds[1]["sent"] and preds[1]["cached"] == "similar"
    text = run.invoke(app, ["infer", str(pics / "b.png"), "--model-dir", str(model), "--fool-dir",
                            str(tmp_path / "pool"), "--guard-margin", "0"])
    assert text.exit_code == 0 and "(cached" in text.stdout


def _labels():
    with gzip.open(FMNIST.parent / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=8)


def test_fools_audit_catches_a_skewed_pool(setup, tmp_path, monkeypatch):
    import json

    from cvconvert.device.state import guard_path

    model, root, imgs = setup
    monkeypatch.setenv("CVCONVERT_STATE_DIR", str(tmp_path / "state"))
    labs = _labels()
    foot = np.flatnonzero(np.isin(labs[:3000], [5, 7, 9]))
    probe = Pipeline.from_model_dir(model, guard=None)
    sent = imgs[foot[:100]]
    guard = SentGuard(guard_path(), floor=1.0)  # record 100 footwear requests (the screen is not tested here)
    guard.screen_and_reserve(probe.features(sent), lambda i, accept, burn: probe.features(imgs[3000 + i:3001 + i]),
                             images=sent, model=probe.features_sha256[:16])
    _pool(model, tmp_path / "all", imgs[5000:5150])                     # every class
    _pool(model, tmp_path / "shoes", imgs[foot[150:300]])                # the requests' own kind
    run = CliRunner()
    skew = run.invoke(app, ["fools", "audit", str(tmp_path / "all"), "--model-dir", str(model), "--json"])
    assert skew.exit_code == 0, skew.output
    out = json.loads(skew.stdout)
    assert out["warning"] and "can be told" in skew.stderr
    print("audit AUC skewed", out["auc"])
    same = json.loads(run.invoke(app, ["fools", "audit", str(tmp_path / "shoes"), "--model-dir", str(model),
                                       "--json"]).stdout)
    print("audit AUC same kind", same["auc"])
    assert not same["warning"] and same["auc"] < out["auc"] - 0.15


def test_fools_create_warns_on_a_shifted_copy_of_a_public_image(setup, tmp_path):
    from PIL import Image

    from cvconvert.device.pool_audit import near_public

    model, root, imgs = setup
    public = imgs[:2000]
    shifted = np.roll(imgs[10:14], (1, 2), (2, 3))
    mirrored = imgs[20:22, :, :, ::-1]
    mine = np.concatenate([shifted, mirrored])
    assert near_public(mine, public).all()
    rng = np.random.default_rng(0)
    own = np.clip(rng.random((3, 1, 32, 32), dtype=np.float32), 0, 1)  # noise: a picture of no one's data set
    assert not near_public(own, public).any()
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray((shifted[0, 0] * 255).astype(np.uint8)).save(src / "0.png")
    Image.fromarray((own[0, 0] * 255).astype(np.uint8)).save(src / "1.png")
    res = CliRunner().invoke(app, ["fools", "create", str(tmp_path / "pool"), str(src), "--model-dir", str(model),
                                   "--json"])
    assert res.exit_code == 0, res.output
    import json
    if json.loads(res.stdout).get("public_near_duplicates") is None:
        pytest.skip("the model's public data set is not readable here")
    assert json.loads(res.stdout)["public_near_duplicates"] == 1 and "near-)copies" in res.stderr


def test_the_adaptive_reading_learns_what_the_plain_one_misses():
    """A control the per-transmission reading cannot see: half the transmissions pair their image with a
    near-duplicate sent before (s0 ~ 0.99, u is the image), half pair their fool with a looser copy of an
    earlier fool (s0 ~ 0.9, u is the fool). "u is the image" is right half the time; a cloud that learns
    from s0 when to believe it names nearly every image. Unrelated transmissions stay at chance."""
    from cvconvert.attacks.principal import adaptive, observables

    rng = np.random.default_rng(3)
    d, n = 64, 60
    base_a, base_b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    a, b = base_a.copy(), base_b.copy()
    img, fool = np.arange(1, n, 4), np.arange(3, n, 4)  # each follows the transmission it copies from
    a[img] = base_a[img - 1] + 0.1 * rng.normal(size=(len(img), d))
    b[fool] = base_b[fool - 1] + 0.45 * rng.normal(size=(len(fool), d))
    x = np.stack([a, b], 1)
    _, s0, u = principal(x)
    real = which_is_real(u, a, b[:, None])
    copies = np.sort(np.r_[img, fool, img - 1, fool - 1])
    assert abs(real[copies].mean() - 0.5) <= 0.1          # the plain reading: a coin
    got = adaptive(observables(x)[copies], real[copies], parts=2)
    assert got["adaptive_real"] >= 0.85 and got["adaptive_auc"] >= 0.9
    a2, b2 = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    x2 = np.stack([a2, b2], 1)
    real2 = which_is_real(principal(x2)[2], a2, b2[:, None])
    assert adaptive(observables(x2), real2, parts=2)["adaptive_real"] <= 0.65
