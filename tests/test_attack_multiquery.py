"""The multi-query attack (span intersection over all pairs of transmissions, public-set membership) on
features of a real LeNet encoder, and the multi-query audit end to end on a tiny exported LeNet."""

import hashlib
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cvconvert.cli.main import app
from cvconvert.attacks import queries, span
from cvconvert.attacks import runner as audit
from cvconvert.attacks.common import combiner
from cvconvert.build import convert_to_dir
from cvconvert.modeldir import load_model

cli = CliRunner()


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A converted LeNet's encoder (features of real conv filters, correlated like trained ones) and smooth
    random images to feed it."""
    d = tmp_path_factory.mktemp("m") / "lenet"
    torch.manual_seed(0)
    convert_to_dir("lenet", d, data="fashion-mnist", key_law="exchange")
    model, _ = load_model(d)
    g = torch.Generator().manual_seed(1)
    images = torch.nn.functional.avg_pool2d(torch.rand(64, 1, 32, 32, generator=g), 3, 1, 1)
    with torch.no_grad():
        feats = model.encoder.features(images)
    return combiner(model), feats  # (a, b, theta) -> x at the exchange law's key for theta


def send(combine, a, b):
    theta = torch.rand(len(a), generator=torch.Generator().manual_seed(2)) * 2 * math.pi
    return combine(a, b, theta), theta


def test_a_reused_fool_exposes_it_and_every_image_it_fooled(encoder):
    combine, f = encoder
    images, fool = f[:6], f[40:41].expand(6, *f.shape[1:])
    x, theta = send(combine, images, fool)
    rec = span.intersect(x)
    best, idx = span.best_match(rec, torch.cat((images, f[40:41])))
    assert (best >= 0.999999).all(), best          # the fool, and through the closed form, each image
    # the angle each image's reading gives is its own theta (modulo pi: the sign of a vector is unknown)
    d = (rec.angle[idx[:6]] - theta) % math.pi
    assert torch.minimum(d, math.pi - d).max() < 1e-4
    # the reused vector recurs in other transmissions, the images do not: the fool is told apart
    recurs = span.recurring(rec)
    assert recurs[idx[6]] and not recurs[idx[:6]].any()


def test_a_repeated_image_is_exposed(encoder):
    combine, f = encoder
    x, _ = send(combine, f[:1].expand(4, *f.shape[1:]), f[10:14])
    best, _ = span.best_match(span.intersect(x), f[:1])
    assert best[0] >= 0.999999


def test_nothing_is_found_in_the_safe_modes(encoder):
    combine, f = encoder
    x, _ = send(combine, f[:20], f[20:40])         # distinct images, each with a never-reused fool
    rec = span.merge(span.intersect(x), span.members(x, f[40:]))  # public data that holds neither
    best, _ = span.best_match(rec, f[:40])
    assert best.max() < 0.999, best.max()


def test_membership_finds_a_public_fool_and_then_the_image(encoder):
    combine, f = encoder
    x, _ = send(combine, f[:5], f[30:35])
    public = torch.cat((f[40:], f[30:35]))            # the attacker holds the fools' pictures
    rec = span.members(x, public)
    assert (rec.partner == -1).all() and set(rec.owner.tolist()) == set(range(5))
    best, _ = span.best_match(rec, f[:5])
    assert (best >= 0.999999).all()
    assert len(span.members(x, f[40:])) == 0         # without the fools' pictures: nothing


def test_near_duplicates_and_their_transforms():
    smooth = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(3)), 9, 1, 4)
    img = smooth[0].numpy()
    for f in (queries.noise(4, 0), queries.shift, queries.jpeg(90), queries.brightness(1.05)):
        out = f(img)
        assert out.shape == img.shape and out.dtype == img.dtype and 0 <= out.min() and out.max() <= 1
        assert 0 < abs(out - img).mean() < 0.05, f
    assert abs(queries.noise(1, 0)(img) - img).max() <= 1 / 255 + 1e-6


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("exp") / "lenet"
    torch.manual_seed(0)
    convert_to_dir("lenet", d, data="fashion-mnist", key_law="exchange")
    res = cli.invoke(app, ["export", str(d)])
    assert res.exit_code == 0, res.output
    return d


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setitem(audit.BUDGETS, "quick", replace(audit.BUDGETS["quick"], unet_width=8, grid=(12, 5),
                                                        whitebox_n=8, whitebox_steps=10))
    monkeypatch.setitem(queries.SIZES, "quick", {"requests": 6, "batch": 4, "small_pool": 1, "large_pool": 24,
                                                  "repeat_images": 3, "repeat_calls": 3, "near_images": 3, "skewed": 6,
                                                  "second_images": 3})


@pytest.fixture
def batch_cycle(monkeypatch):
    """The old device drew each image's fool at random among the others of its batch. Two images that
    draw each other send the same span twice (a two-candidate tie, not an exact exposure), so the share
    exposed depends on the draw; here the batch draw is a cycle (no mutual pairs), where every image of
    the batch must be exposed. Pool draws keep the audit's own rule."""
    real = queries.choose_fools

    def cycle(images, pool=None, rule="random"):
        if pool is None and len(images) > 2:
            return np.roll(images, 1, axis=0), "batch"
        return real(images, pool, rule)

    monkeypatch.setattr(queries, "choose_fools", cycle)


def test_multi_query_audit_end_to_end(exported, small, batch_cycle, tmp_path):
    out = tmp_path / "r"
    res = cli.invoke(app, ["attack", str(exported), "--data", "fashion-mnist", "-o", str(out), "--train-size", "64",
                           "--eval-size", "60", "--epochs", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    R = json.loads((out / "report.json").read_text())
    # the victims' x came from the deployed graph, named by its hash
    v = R["meta"]["victim_encoder"]
    assert v["graph_sha256"] == hashlib.sha256((exported / "onnx" / "encoder.onnx").read_bytes()).hexdigest()
    assert v["weights_vs_graphs"] == "current"
    rows = {r["id"]: r for r in R["tables"]["multi_query"]}
    assert set(rows) == {"batch", "small_pool", "large_pool", "repeat", "public_fool", "noise1", "noise4", "shift1",
                         "jpeg90", "bright5", "crop1", "rot3", "jpeg70", "lookalike", "control", "skewed",
                         "second_pool", "reexport"}
    before = {k: r["before"] for k, r in rows.items()}
    after = {k: r["after"] for k, r in rows.items()}
    # the old device: a batch, a one-fool folder and a repeat expose every image exactly
    for k in ("batch", "small_pool", "repeat", "public_fool", "noise1"):
        assert before[k]["share"] == 1.0, (k, before[k])
    assert before["small_pool"]["tell"] == 1.0       # the reused fool is what recurs: the image is told apart
    # the shipped device: nothing in these modes; the small pool runs out and is refused, repeats stay home
    for k in ("batch", "small_pool", "large_pool", "repeat", "noise1", "control"):
        assert after[k]["exposed"] == 0, (k, after[k])
    assert after["small_pool"]["refused"] == 6 - 1 and "refill" in after["small_pool"]["refusal"]
    assert after["repeat"]["transmissions"] == 3 and after["repeat"]["held_back"] == 6
    assert before["control"]["exposed"] == 0
    # a fool from public data stays exposed by design, and the verdict says why
    assert after["public_fool"]["share"] == 1.0 and "public" in after["public_fool"]["verdict"]
    assert before["batch"]["answer_recovered"] == 1.0
    # the cross-transmission attack's columns are filled (P = 2)
    assert 0.0 <= before["rot3"]["principal_real"] <= 1.0 and before["rot3"]["principal_answer"] is not None
    # and the adaptive reading's (tests/test_query_guard.py checks that it learns)
    assert all(0.0 <= c["rot3"]["principal_adaptive"] <= 1.0 for c in (before, after))
    _later_modes(R, before, after, hashlib.sha256((exported / "onnx" / "features.onnx").read_bytes()).hexdigest())
    md = (out / "report.md").read_text()
    assert "## Privacy across queries" in md and "refused" in md and v["graph_sha256"] in md
    assert "first principal vector" in md and "Adaptive" in md
    assert "model version" in md and "repeats" in md


def _later_modes(R, before, after, features_sha256):
    """The skewed stream, the second pool and the second model version (3 images, then 3 new ones and the 3
    again): the old device sends each image again with a fresh key and fool and gives the new images the first
    pool's fools, so all six are exposed (a reexport across versions only: each version alone exposes none);
    the shipped device answers the 3 from its one memory and sends the new ones with never-sent fools."""
    assert after["skewed"]["transmissions"] == before["skewed"]["transmissions"] >= 3
    assert before["skewed"]["exposed"] == after["skewed"]["exposed"] == 0
    for k in ("skewed", "second_pool", "reexport"):
        for col in (before[k], after[k]):
            assert col["principal_real"] is not None and col["principal_answer"] is not None, (k, col)
    for k in ("second_pool", "reexport"):
        assert before[k]["repeats"] == 3 and before[k]["share"] == 1.0 and before[k]["images"] == 6, (k, before[k])
        assert after[k]["repeats"] == 0 and after[k]["exposed"] == 0, (k, after[k])
        assert after[k]["transmissions"] == 6 and after[k]["held_back"] == 3, (k, after[k])
    assert [v["exposed"] for v in before["reexport"]["by_version"]] == [0, 0]
    assert [v["transmissions"] for v in after["reexport"]["by_version"]] == [3, 3]
    v2 = R["multi_query"]["second_version"]
    assert v2["features_sha256"] != features_sha256 and 0.99 < v2["median_cos_features"] < 1
    assert R["multi_query"]["skewed_classes"] == ["Sandal", "Sneaker", "Ankle boot"]


def test_multi_query_is_skipped_with_the_command_to_run_without_graphs(exported, small, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(exported, bare, ignore=shutil.ignore_patterns("onnx"))
    out = tmp_path / "r"
    res = cli.invoke(app, ["attack", str(bare), "--data", "fashion-mnist", "-o", str(out), "--train-size", "32",
                           "--eval-size", "16", "--epochs", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    R = json.loads((out / "report.json").read_text())
    assert R["tables"]["multi_query"] == [] and f"cvconvert export {bare}" in R["multi_query"]["skipped"]
    assert R["meta"]["victim_encoder"]["source"] == "model.pt"
    assert "multi-query audit skipped" in res.stderr


def test_the_second_model_version_is_a_valid_export_with_other_features(exported, tmp_path):
    """The reexport mode's second version: its own model.pt and graphs, which `cvconvert validate` accepts
    (graphs against model.pt, sha256s against export.json), and features near the audited ones but not equal."""
    from cvconvert.attacks.versions import second_version
    from cvconvert.device.pipeline import Pipeline
    from cvconvert.export import validate_dir

    v2 = second_version(exported, tmp_path / "v2")
    validate_dir(v2)
    a, b = (Pipeline.from_model_dir(d, guard=None) for d in (exported, v2))
    assert a.features_sha256 != b.features_sha256
    images = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(5)).numpy()
    fa, fb = (p.features(images).reshape(4, -1) for p in (a, b))
    cos = (fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
    assert (0.99 < cos).all() and (cos < 1 - 1e-6).all(), cos
