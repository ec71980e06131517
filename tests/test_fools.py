"""The fool rules (cvconvert/fools.py): the match pairing law, and how train, infer and attack use it."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cvconvert.cli.main import app
from cvconvert.attacks.common import make_partners
from cvconvert.build import convert_to_dir
from cvconvert.errors import CvError
from cvconvert.export import export_model_dir
from cvconvert.device.fools import check_rule, draw, l1_distances, pairing_law
from cvconvert.modeldir import read_manifest
from cvconvert.device.fools import choose_fools
from test_data import write_fashion

runner = CliRunner()


def two_clusters(n=10, size=64, seed=0):
    """n dark and n bright flattened images: far pairs are the dark/bright ones."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.random((n, size)) * 0.2, 0.8 + rng.random((n, size)) * 0.2]).astype(np.float32)


def test_pairing_law_is_symmetric_doubly_stochastic_and_favours_far_pairs():
    x = two_clusters()
    d = l1_distances(x)
    assert d.shape == (20, 20) and np.allclose(d, d.T) and np.allclose(np.diag(d), 0)
    np.testing.assert_allclose(d[0, 1], np.abs(x[0] - x[1]).mean(), rtol=1e-6)
    w = pairing_law(d)
    np.testing.assert_allclose(w, w.T, atol=1e-12)  # P(I, I') = P(I', I): the pair stays exchangeable
    assert np.all(np.diag(w) == 0)  # never the image itself
    np.testing.assert_allclose(w.sum(1), 1, atol=0.01)
    assert 2 * w[:10, 10:].sum() / w.sum() > 0.95  # almost all mass on dark/bright pairs (random: 10/19)
    flat = pairing_law(d, lam=0.0)  # lam 0: the paper's uniform choice among the others
    np.testing.assert_allclose(flat[~np.eye(20, dtype=bool)], 1 / 19, rtol=1e-3)
    with pytest.raises(ValueError):
        pairing_law(np.zeros((1, 1)))


def test_draw_and_rule_names():
    p = np.array([0.0, 0.25, 0.75])
    assert [draw(p, u) for u in (0.0, 0.2, 0.25, 0.9, 0.999999)] == [1, 1, 2, 2, 2]
    assert check_rule("match") == "match"
    with pytest.raises(CvError, match="unknown fool rule 'far'"):
        check_rule("far")


def test_choose_fools_match_rule():
    x = two_clusters().reshape(20, 1, 8, 8)
    dark, pool = x[:3], x  # 3 dark images; the pool holds both clusters
    for _ in range(5):
        fools, how = choose_fools(dark, pool, "match")
        assert how == "fool-dir" and fools.shape == dark.shape
        assert all(any(np.array_equal(f, p) for p in pool) for f in fools)
        assert all(f.mean() > 0.5 for f in fools)  # the law puts ~all its mass on the bright ones
    batch = x[[0, 1, 12, 13]]
    fools, how = choose_fools(batch, None, "match")
    assert how == "batch"
    for i, f in enumerate(fools):  # another image of the batch, never the image itself
        assert not np.array_equal(f, batch[i]) and any(np.array_equal(f, b) for b in batch)
    assert choose_fools(x[:1], None, "match")[1] == "noise"
    with pytest.raises(CvError, match="unknown fool rule"):
        choose_fools(batch, None, "nearest")


def test_attacker_partners_follow_the_rule():
    images = torch.from_numpy(two_clusters(n=40).reshape(80, 1, 8, 8))
    gen = torch.Generator().manual_seed(0)
    part = make_partners("match", images, gen)
    idx = torch.arange(80)
    p = torch.cat([part(idx, 80, gen) for _ in range(5)])
    src = idx.repeat(5)
    assert (p != src).all()
    assert ((src < 40) != (p < 40)).float().mean() > 0.9  # across the clusters, as the victim's device does
    rand = make_partners("random", images, gen)
    assert ((src < 40) != (rand(src, 80, gen) < 40)).float().mean() < 0.7


def test_train_records_the_rule_and_infer_uses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CVCONVERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CVCONVERT_DATA", raising=False)
    write_fashion(tmp_path / "fm", n_train=40, n_test=16)
    d = tmp_path / "m"
    convert_to_dir("lenet", d, seed=0)
    args = ["train", d, "--data-dir", tmp_path / "fm", "--batch-size", 8, "--device", "cpu", "--val-fraction", 0.2,
            "--max-steps", 2, "--fool-rule", "match", "--defense", "exchange"]
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    assert read_manifest(d)["fool_rule"] == "match"
    export_model_dir(d)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    from PIL import Image
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((32, 32)) * 255).astype(np.uint8)).save(imgs / f"{i}.png")
    fools = tmp_path / "fools"
    fools.mkdir()
    for i in range(8):
        Image.fromarray((np.random.default_rng(50 + i).random((32, 32)) * 255).astype(np.uint8)).save(fools / f"{i}.png")
    res = runner.invoke(app, ["fools", "create", str(tmp_path / "pool"), str(fools), "--model-dir", str(d)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["infer", "--model-dir", str(d), str(imgs), "--json", "--fool-dir", str(tmp_path / "pool")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["fool_rule"] == "match" and out["fools"] == "pool"
    # a later run with --fool-rule random takes it back; an original model has no fools to pick
    res = runner.invoke(app, [str(a) for a in args[:-4] + ["--fool-rule", "random", "--resume", "--epochs", 2]])
    assert res.exit_code == 0, res.output
    assert "fool_rule" not in read_manifest(d)
    o = tmp_path / "o"
    convert_to_dir("lenet", o, variant="original")
    res = runner.invoke(app, [str(a) for a in ["train", o, "--data-dir", tmp_path / "fm", "--device", "cpu",
                                                "--max-steps", 1, "--fool-rule", "match"]])
    assert res.exit_code != 0 and "needs a complex model" in res.output
    res = runner.invoke(app, [str(a) for a in args[:-4] + ["--fool-rule", "far"]])
    assert res.exit_code != 0 and "unknown fool rule 'far'" in res.output and "Traceback" not in res.output


def test_attack_victim_uses_the_rule(monkeypatch):
    """The audit's victim picks its fools with the model's rule, through the same choose_fools as infer."""
    from cvconvert.attacks import runner as attack_runner
    from cvconvert.model import ModelSpec, build_model

    seen = []
    real = attack_runner.choose_fools
    monkeypatch.setattr(attack_runner, "choose_fools", lambda *a: seen.append(a[2]) or real(*a))
    torch.manual_seed(0)
    model = build_model(ModelSpec("lenet", "conv1", None, "complex", 10, (1, 16, 16), [0.5], [0.5])).eval()
    images = torch.rand(6, 1, 16, 16)
    x, key, logits = attack_runner._victim(model, images, torch.device("cpu"), "match")
    assert seen == ["match"] and x.shape[:2] == (6, 2) and key.shape == (6, 2, 2) and logits.shape == (6, 10)
    attack_runner._victim(model, images, torch.device("cpu"), "random")
    assert seen == ["match"]  # the paper's derangement does not go through the match law


# --- the fool pool and the one-transmission rule -----------------------------------------------------

def _pool(tmp_path, n=20, seed=0, shape=(1, 8, 8), feat=(3, 4, 4), name="pool"):
    from cvconvert.device.fools import FoolPool

    rng = np.random.default_rng(seed)
    imgs = rng.random((n, *shape), dtype=np.float32)
    feats = rng.normal(size=(n, *feat)).astype(np.float32)
    return FoolPool.create(tmp_path / name, imgs, feats, features_sha256="f" * 64, input_shape=shape,
                           feature_shape=feat), imgs, feats


def test_pool_hands_out_each_fool_once_then_refuses(tmp_path):
    from cvconvert.device.fools import FoolPool

    pool, imgs, feats = _pool(tmp_path)
    assert pool.status()["remaining"] == 20 and (tmp_path / "pool").stat().st_mode & 0o777 == 0o700
    assert all((tmp_path / "pool" / f).stat().st_mode & 0o777 == 0o600 for f in ("ledger.npy", "features.npy"))
    got = []
    for rule in ("random", "match", "random"):
        t = pool.take(5, imgs[:5] * 0.5, rule)
        for i, j in enumerate(t.index):  # each fool comes with its own precomputed feature and image
            np.testing.assert_array_equal(t.features[i], feats[j])
            np.testing.assert_array_equal(t.images[i], imgs[j])
        got += list(t.index)
    assert len(set(got)) == 15 and pool.remaining == 5
    with pytest.raises(CvError, match=r"has 5 unused fool\(s\), this request needs 6 more: refill it with `cvconvert fools refill"):
        pool.take(6)
    assert pool.remaining == 5  # a refused request takes nothing
    again = FoolPool.open(tmp_path / "pool")  # the ledger is on disk, not in this object
    assert sorted(set(range(20)) - set(got)) == sorted(again.take(5).index.tolist())
    with pytest.raises(CvError, match="needs 1 more"):
        again.take(1)
    stats = again.add(np.concatenate([imgs[:3], imgs[:1] + 0.3]), np.concatenate([feats[:3], feats[:1]]))
    assert stats == {"added": 0, "duplicates": 3, "near_duplicates": 1}  # a picture it has, or its feature
    with pytest.raises(CvError, match="holds features of another model"):
        FoolPool.open(tmp_path / "pool", "0" * 64)
    with pytest.raises(CvError, match="not a fool pool"):
        FoolPool.open(tmp_path)


def test_pool_burns_fools_the_caller_rejects(tmp_path):
    pool, imgs, feats = _pool(tmp_path, n=10)
    from cvconvert.device.sketches import sketch

    banned = sketch(feats[:6])
    t = pool.take(4, reject=lambda sk, pics: (sk @ banned.T).max(1) > 0.999)
    assert sorted(t.index.tolist()) == [6, 7, 8, 9] and t.remaining == 0
    assert pool.status()["used"] == 10  # the six rejected ones are burned, never handed out later


_DRAW = """
import json, sys
from cvconvert.device.fools import FoolPool
pool = FoolPool.open(sys.argv[1])
got = []
for _ in range(int(sys.argv[2])):
    got += pool.take(3).index.tolist()
print(json.dumps(got))
"""


def test_two_processes_never_share_a_fool(tmp_path):
    import subprocess
    import sys

    _pool(tmp_path, n=120)
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", _DRAW, str(tmp_path / "pool"), "20"], cwd=root,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(outs[0]) == len(outs[1]) == 60
    assert not set(outs[0]) & set(outs[1]) and len(set(outs[0] + outs[1])) == 120


def test_guard_answers_repeats_from_the_cache_and_refuses_a_fool_sent_back(tmp_path):
    from cvconvert.device.guard import SentGuard

    rng = np.random.default_rng(3)
    a = rng.normal(size=(4, 3, 4, 4)).astype(np.float32)
    b = rng.normal(size=(4, 3, 4, 4)).astype(np.float32)
    g = SentGuard(tmp_path / "g.npz", threshold=0.995, capacity=100)
    verdict, fools, keys = g.screen_and_reserve(a[:2], lambda i, accept, burn: b[i:i + 1])
    assert verdict.action == ["send", "send"] and len(keys) == 2
    g.store_logits(keys, np.eye(2, 10, dtype=np.float32))
    g2 = SentGuard(tmp_path / "g.npz", threshold=0.995)  # another process: the index is on disk
    near = a[1] + 0.01 * rng.normal(size=a[1].shape).astype(np.float32)
    verdict, _, _ = g2.screen_and_reserve(np.stack([a[0], near, a[2], a[2] * 1.0001, b[0]]), lambda i, accept, burn: b[2:3])
    assert verdict.action == ["cached", "cached", "send", "same", "refuse"]
    np.testing.assert_array_equal(verdict.logits[1], np.eye(2, 10)[1])
    assert verdict.ref[3] == 2
    assert oct((tmp_path / "g.npz").stat().st_mode & 0o777) == "0o600"
    small = SentGuard(tmp_path / "s.npz", capacity=2, floor=1.0)  # bounded: the oldest answered are forgotten
    for i in range(4):
        _, _, k = small.screen_and_reserve(a[i:i + 1], lambda j, accept, burn: b[i:i + 1])
        small.store_logits(k, np.eye(1, 10))  # answered (a pending one is never forgotten: test_faults)
    assert len(small) == 2  # two transmissions of an image and a fool: the newest one kept whole
    with pytest.raises(CvError, match="threshold"):
        SentGuard(None, threshold=1.5)
