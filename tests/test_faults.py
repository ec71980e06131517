"""The device under faults (issue 20): a fault-injecting proxy (tests/faultproxy.py) in front of `cvconvert
serve`, then the same command again. Each test checks the exit code, the message, the state after, that a
retry answers every image, and that no image or fool lies in two transmissions that differ (the span check
over everything the proxy received)."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cvconvert.attacks.span import bases
from cvconvert.cli.main import app
from cvconvert.device.fools import FoolPool
from cvconvert.device.pipeline import Pipeline
from cvconvert.device.remote import RemoteProcessing
from cvconvert.device.state import DeviceState, guard_path
from faultproxy import FaultProxy

EXC_NAME = re.compile(r"\b\w*(Error|Exception)\b|BadZipFile|EOFError|Errno")
SAME = 0.999  # a principal cosine this high between two transmissions: they share a vector


# ---------------------------------------------------------------------------------------------------
# fixtures


def _picture(path: Path, seed: int) -> None:
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    img = 0.5 + 0.5 * np.sin(2 * np.pi * (r.uniform(0.5, 3) * xx + r.uniform(0.5, 3) * yy + r.uniform()))
    Image.fromarray(((0.7 * img + 0.3 * r.random((32, 32))) * 255).astype(np.uint8), "L").save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, lenet_exported):
    """The session's exported LeNet served by `cvconvert serve` (background thread), 4 image sets of 4
    and 60 fool pictures."""
    from cvconvert.serve import app as srv
    from cvconvert.serve import run as srv_run
    from cvconvert.serve.model import load_served_model

    base = tmp_path_factory.mktemp("faults")
    shutil.copytree(lenet_exported / "lenet", base / "lenet")
    for s in "ABCD":
        (base / s).mkdir()
        for i in range(4):
            _picture(base / s / f"{s}{i}.png", seed=10 * ord(s) + i)
    (base / "fools").mkdir()
    for i in range(60):
        _picture(base / "fools" / f"f{i}.png", seed=1000 + i)
    model = load_served_model(base / "lenet")
    with srv_run.BackgroundServer(srv.build_app(model)) as server:
        yield {"base": base, "model": base / "lenet", "url": server.url}


@pytest.fixture
def pool(world, tmp_path):
    from cvconvert.cli.fools import _load

    pipe = Pipeline.from_model_dir(world["model"], guard=None)
    arr, _ = _load([world["base"] / "fools"], pipe.manifest, False)
    return FoolPool.create(tmp_path / "pool", arr, pipe.features(arr), features_sha256=pipe.features_sha256,
                           input_shape=pipe.input_shape, feature_shape=pipe.features(arr[:1]).shape[1:])


@pytest.fixture
def proxy(world):
    with FaultProxy(world["url"]) as p:
        yield p


def infer(world, pool, url, *images, extra=()):
    args = ["infer", *[str(world["base"] / s) for s in images], "--model-dir", str(world["model"]),
            "--fool-dir", str(pool.path), "--server", url, "--json", *extra]
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(res, *fragments) -> str:
    assert res.exit_code not in (0, None), res.output
    assert "Traceback" not in res.stderr, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert not EXC_NAME.search(errors[0]), errors[0]
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]


def answered(res, n: int) -> list[dict]:
    """Every image answered with finite probabilities, exit 0."""
    import json

    assert res.exit_code == 0, res.stderr
    preds = json.loads(res.stdout)["predictions"]
    assert len(preds) == n
    for p in preds:
        assert all(np.isfinite(t["prob"]) for t in p["top"]) and 0.99 < sum(t["prob"] for t in p["top"]) <= 1.001 \
            or len(p["top"]) < 10
    return preds


def pending(pool=None) -> dict:
    return DeviceState().load()["pending"]


def used(pool) -> int:
    return pool.status()["used"]


def assert_no_exposure(seen: list[np.ndarray]) -> None:
    """No two transmitted rows that differ share a vector (principal cosine ~1): a resend is the same x."""
    rows = {r.tobytes(): r for x in seen for r in x}
    if len(rows) < 2:
        return
    q = bases(torch.from_numpy(np.stack(list(rows.values()))))  # [T, D, 2]
    cos = torch.linalg.svdvals(q.transpose(1, 2)[:, None] @ q[None])[..., 0]  # [T, T] first principal cosine
    cos.fill_diagonal_(0)
    assert cos.max() < SAME, f"two different transmissions share a vector (principal cosine {cos.max():.6f})"


def _pipe(world, pool, url, **kw):
    from cvconvert.device.guard import SentGuard

    sha = Pipeline.from_model_dir(world["model"], guard=None).features_sha256
    return Pipeline.from_model_dir(world["model"], pool=pool, guard=SentGuard(guard_path(sha)),
                                   processing=RemoteProcessing(url, "lenet_processing", **kw))


def _images(world, *sets):
    from cvconvert.cli.fools import _load

    man = Pipeline.from_model_dir(world["model"], guard=None).manifest
    return _load([world["base"] / s for s in sets], man, False)[0]


def _closed_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# ---------------------------------------------------------------------------------------------------
# nothing left the device: released


def test_refused_and_dns_release_the_reservation(world, pool, proxy):
    images = _images(world, "A")
    for url in (_closed_port(), "http://no-such-host.invalid:8000"):
        with pytest.raises(Exception) as exc:
            _pipe(world, pool, url, retries=0).predict(images)
        assert "nothing left this device, 4 fool(s) went back to the pool" in str(exc.value)
        assert not EXC_NAME.search(str(exc.value))
        assert used(pool) == 0 and pending() == {}
    # the CLI: the server is checked before anything is reserved
    res = infer(world, pool, _closed_port(), "A")
    one_line_error(res, "cannot reach server")
    assert used(pool) == 0 and pending() == {}
    answered(infer(world, pool, proxy.url, "A"), 4)
    assert used(pool) == 4 and len(proxy.seen) == 1
    assert_no_exposure(proxy.seen)


def test_mixed_retry_releases_only_the_new_images(world, pool, proxy):
    """B pending (reset), then B + C against a dead server: C's fools go back, B stays pending with its x;
    then B + C against a live one: B's identical x is resent, C gets fresh fools."""
    proxy.fault("reset")
    with pytest.raises(Exception, match="outcome is unknown"):
        _pipe(world, pool, proxy.url, retries=0).predict(_images(world, "B"))
    assert used(pool) == 4 and len(pending()) == 1
    with pytest.raises(Exception, match="0 fool|4 fool"):
        _pipe(world, pool, _closed_port(), retries=0).predict(_images(world, "B", "C"))
    assert used(pool) == 4 and len(pending()) == 1 and list(pending().values())[0]["images"] == 4
    proxy.fault("pass")
    pipe = _pipe(world, pool, proxy.url)
    logits = pipe.predict(_images(world, "B", "C"))
    assert np.isfinite(logits).all() and len(pipe.last["resent"]) == 4 and pipe.last["sent"] == 4
    assert used(pool) == 8 and pending() == {}
    assert np.array_equal(proxy.seen[0], proxy.seen[-1][4:])  # the pending rows went again, byte for byte
    assert_no_exposure(proxy.seen)


def test_unsendable_request_costs_no_fool(world, pool, proxy, tmp_path):
    """A request holding a fool already sent (refused) reserves nothing: no fool burned, nothing pending."""
    answered(infer(world, pool, proxy.url, "A"), 4)
    used_fool = int(np.flatnonzero(np.load(pool.path / "ledger.npy"))[0])
    mixed = tmp_path / "mixed"
    shutil.copytree(world["base"] / "B", mixed)
    shutil.copy(sorted((world["base"] / "fools").iterdir())[used_fool], mixed / "zz.png")
    res = CliRunner().invoke(app, ["infer", str(mixed), "--model-dir", str(world["model"]), "--fool-dir",
                                   str(pool.path), "--server", proxy.url])
    one_line_error(res, "near-duplicate", "fooling image", "nothing was sent")
    assert used(pool) == 4 and pending() == {} and len(proxy.seen) == 1
    answered(infer(world, pool, proxy.url, "B"), 4)
    assert used(pool) == 8
    assert_no_exposure(proxy.seen)


# ---------------------------------------------------------------------------------------------------
# outcome unknown: kept, resent as it is


@pytest.mark.parametrize("mode,words", [("503", "answered 503"), ("reset", "closed the connection")])
def test_retried_then_pending_then_resent(world, pool, proxy, mode, words):
    proxy.fault(mode, times=2)  # two bad answers, the third attempt gets through
    answered(infer(world, pool, proxy.url, "A"), 4)
    assert len(proxy.seen) == 3 and all(np.array_equal(proxy.seen[0], s) for s in proxy.seen)
    proxy.fault(mode)  # for ever: the retries run out
    res = infer(world, pool, proxy.url, "B", extra=["--retries", "1"])
    one_line_error(res, words, "outcome is unknown", "stay pending")
    assert used(pool) == 8 and len(pending()) == 1
    proxy.fault("pass")
    preds = answered(infer(world, pool, proxy.url, "B"), 4)
    assert all(p["sent"] for p in preds) and pending() == {} and used(pool) == 8
    assert all(np.array_equal(proxy.seen[3], s) for s in proxy.seen[3:])
    assert_no_exposure(proxy.seen)


@pytest.mark.parametrize("mode,words", [("nan", "not finite"), ("shape", "returned a batch of 3 for 4")])
def test_bad_answers_are_refused_not_cached(world, pool, proxy, mode, words):
    proxy.fault(mode, times=1)
    res = infer(world, pool, proxy.url, "A")
    one_line_error(res, words, "stay pending")
    assert res.stdout == "" and len(pending()) == 1
    proxy.fault("pass")
    answered(infer(world, pool, proxy.url, "A"), 4)
    assert pending() == {} and used(pool) == 4
    assert_no_exposure(proxy.seen)


@pytest.mark.parametrize("mode", ["drip", "hang"])
def test_drip_cannot_hold_infer_past_its_timeout(world, pool, proxy, mode):
    proxy.fault(mode, times=1, drip=0.3, delay=6)
    t0 = time.monotonic()
    res = infer(world, pool, proxy.url, "A", extra=["--timeout", "1.5", "--retries", "0"])
    elapsed = time.monotonic() - t0
    one_line_error(res, "did not answer within 1.5 s", "stay pending")
    assert elapsed < 1.5 + 1.5, elapsed  # the deadline plus the device's own (local) work
    proxy.fault("pass")
    answered(infer(world, pool, proxy.url, "A"), 4)
    assert pending() == {} and len(proxy.seen) == 2 and np.array_equal(*proxy.seen)


def test_server_dies_between_batches(world, pool, proxy):
    proxy.fault("die", after=2)
    res = infer(world, pool, proxy.url, "A", extra=["--batch-size", "1", "--retries", "0"])
    one_line_error(res, "images 1-2 were answered", "nothing left this device, 1 fool(s) went back")
    assert used(pool) == 2 and pending() == {}
    with FaultProxy(world["url"]) as again:
        preds = answered(infer(world, pool, again.url, "A", extra=["--batch-size", "1"]), 4)
        assert [p["sent"] for p in preds] == [False, False, True, True]
        assert_no_exposure(proxy.seen + again.seen)
    assert used(pool) == 4


def test_other_weights_under_the_same_name_are_refused(world, pool, proxy):
    proxy.fault("sha")
    one_line_error(infer(world, pool, proxy.url, "A"), "other than the one exported here", "nothing was sent")
    assert proxy.seen == [] and used(pool) == 0


# ---------------------------------------------------------------------------------------------------
# kill -9 of infer mid-request


def test_kill_9_at_random_points_then_retry(world, pool, proxy, monkeypatch, tmp_path):
    cli = Path(sys.executable).parent / "cvconvert"
    rand = random.Random(20)
    for trial in range(4):
        monkeypatch.setenv("CVCONVERT_STATE_DIR", str(tmp_path / f"state{trial}"))
        fresh = FoolPool.open(shutil.copytree(pool.path, tmp_path / f"pool{trial}"))
        proxy.seen.clear()
        proxy.fault("slow", delay=1.5)
        cmd = [str(cli), "infer", str(world["base"] / "C"), "--model-dir", str(world["model"]), "--fool-dir",
               str(fresh.path), "--server", proxy.url]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rand.uniform(0.3 + 0.6 * trial, 0.9 + 0.6 * trial))  # start-up, reserve, in flight, after
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        print(f"kill trial {trial}: {len(proxy.seen)} x received, {len(pending())} pending")
        proxy.fault("pass")
        preds = answered(infer(world, fresh, proxy.url, "C"), 4)
        assert pending() == {}
        assert_no_exposure(proxy.seen)
        assert used(fresh) == 4 or not proxy.seen[:-1]  # a killed send keeps its fools; no second set
        assert len(preds) == 4


@pytest.mark.parametrize("where", ["record", "write_entry", "save"])
def test_crash_inside_the_first_reservation(world, pool, proxy, monkeypatch, where):
    """A crash after the fools were taken and the guard written, before the commit (the pool's first use):
    nothing was sent, so the retry sends every image; no refusal, nothing pending."""
    from cvconvert.device.journal import Journal

    target = {"record": (Journal, "record"), "write_entry": (DeviceState, "write_entry"),
              "save": (DeviceState, "save")}[where]

    def crash(*a, **kw):
        raise KeyboardInterrupt  # what kill -9 leaves behind, without the process dying here
    real = getattr(*target)
    monkeypatch.setattr(*target, crash)
    with pytest.raises(KeyboardInterrupt):
        _pipe(world, pool, proxy.url).predict(_images(world, "A"))
    monkeypatch.setattr(*target, real)  # (not monkeypatch.undo: that would drop the private state folder too)
    assert proxy.seen == []
    preds = answered(infer(world, pool, proxy.url, "A"), 4)
    assert all(p["sent"] for p in preds) and pending() == {} and len(proxy.seen) == 1
    assert_no_exposure(proxy.seen)


# ---------------------------------------------------------------------------------------------------
# damaged, missing or unwritable state


def _first_run(world, pool, proxy):
    answered(infer(world, pool, proxy.url, "A"), 4)
    return len(proxy.seen)


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[:40])


@pytest.mark.parametrize("what,damage,words", [
    ("guard", "truncate", "guard index"), ("guard", "delete", "guard index"), ("guard", "empty", "guard index"),
    ("ledger.npy", "truncate", "ledger.npy"), ("ledger.npy", "delete", "ledger.npy"),
    ("features.npy", "truncate", "features.npy"), ("sketches.npy", "truncate", "sketches.npy"),
    ("images.npy", "delete", "images.npy"), ("pool.json", "truncate", "pool.json"),
    ("state.json", "truncate", "state.json"), ("state.json", "delete", "state.json"),
])
def test_damaged_state_files(world, pool, proxy, what, damage, words):
    sent = _first_run(world, pool, proxy)
    sha = Pipeline.from_model_dir(world["model"], guard=None).features_sha256
    target = {"guard": guard_path(sha), "state.json": DeviceState().file}.get(what, pool.path / what)
    {"truncate": _truncate, "delete": Path.unlink, "empty": lambda p: p.write_bytes(b"")}[damage](target)
    line = one_line_error(infer(world, pool, proxy.url, "A", "B"), words)
    assert "move it away" not in line and "start a new one" not in line  # advice that would lead to re-sending
    assert len(proxy.seen) == sent  # nothing sent
    if what in ("features.npy", "sketches.npy", "images.npy", "pool.json", "ledger.npy"):
        one_line_error(CliRunner().invoke(app, ["fools", "status", str(pool.path)]), words)


def test_pool_restored_from_a_backup_is_refused(world, pool, proxy, tmp_path):
    backup = shutil.copytree(pool.path, tmp_path / "backup")
    _first_run(world, pool, proxy)
    shutil.rmtree(pool.path)
    shutil.copytree(backup, pool.path)
    one_line_error(infer(world, pool, proxy.url, "B"), "ledger.npy", "restored from a backup")
    assert len(proxy.seen) == 1


def test_lost_state_folder_is_refused(world, pool, proxy):
    _first_run(world, pool, proxy)
    shutil.rmtree(DeviceState().root)
    one_line_error(infer(world, pool, proxy.url, "A"), str(pool.path), "no record of it", "no longer knows")
    assert len(proxy.seen) == 1


def test_missing_journal_entry_is_refused(world, pool, proxy):
    proxy.fault("reset")
    one_line_error(infer(world, pool, proxy.url, "A", extra=["--retries", "0"]), "stay pending")
    (rid,) = pending()
    DeviceState().entry_path(rid).unlink()
    proxy.fault("pass")
    one_line_error(infer(world, pool, proxy.url, "A"), "journal entry", "missing")
    assert len(proxy.seen) == 1


def _read_only(monkeypatch, folder: Path) -> None:
    """The folder refuses writes as a read-only mount would (chmod alone does not stop root)."""
    import errno
    import tempfile

    real_open, real_mkstemp = os.open, tempfile.mkstemp

    def no_write_open(path, flags, *a, **kw):
        if Path(path).parent == folder and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **kw)

    def no_mkstemp(*a, dir=None, **kw):
        if dir is not None and Path(dir) == folder:
            raise PermissionError(errno.EROFS, "Read-only file system", str(dir))
        return real_mkstemp(*a, dir=dir, **kw)
    monkeypatch.setattr(os, "open", no_write_open)
    monkeypatch.setattr(tempfile, "mkstemp", no_mkstemp)


def test_read_only_pool(world, pool, proxy, monkeypatch):
    _first_run(world, pool, proxy)
    _read_only(monkeypatch, pool.path)
    res = CliRunner().invoke(app, ["fools", "status", str(pool.path), "--json"])
    assert res.exit_code == 0 and '"used": 4' in res.stdout, res.stderr
    one_line_error(infer(world, pool, proxy.url, "B"), str(pool.path), "writable")
    assert len(proxy.seen) == 1 and pending() == {}


def test_full_disk_after_the_answer_still_prints_and_keeps_the_journal(world, pool, proxy, monkeypatch):
    import errno

    from cvconvert.device.guard import SentGuard

    real = SentGuard.store_logits

    def full(self, keys, logits):
        from cvconvert.device.state import disk_error
        raise disk_error(self.path, OSError(errno.ENOSPC, "No space left on device"))
    monkeypatch.setattr(SentGuard, "store_logits", full)
    res = infer(world, pool, proxy.url, "A")
    answered(res, 4)
    assert "disk is full" in res.stderr and len(pending()) == 1
    monkeypatch.setattr(SentGuard, "store_logits", real)
    preds = answered(infer(world, pool, proxy.url, "A"), 4)
    assert pending() == {} and all(p["sent"] for p in preds) and np.array_equal(*proxy.seen)


def test_status_and_resolve(world, pool, proxy):
    proxy.fault("reset")
    one_line_error(infer(world, pool, proxy.url, "A", extra=["--retries", "0"]), "stay pending")
    proxy.fault("reset")
    one_line_error(infer(world, pool, proxy.url, "B", extra=["--retries", "0"]), "stay pending")
    res = CliRunner().invoke(app, ["fools", "status", str(pool.path)])
    assert res.exit_code == 0 and res.stdout.count("pending") == 2
    assert (pool.path / "pool.json").stat().st_mode & 0o777 == 0o600
    proxy.fault("pass")
    base = ["fools", "resolve", "--model-dir", str(world["model"]), "--fool-dir", str(pool.path), "--server", proxy.url]
    (a_id, _), (b_id, _) = sorted(pending().items(), key=lambda kv: kv[1]["created"])
    res = CliRunner().invoke(app, base)
    assert res.exit_code == 0 and res.stdout.count(".png") == 8 and pending() == {}
    assert_no_exposure(proxy.seen)
    proxy.fault("reset")
    one_line_error(infer(world, pool, proxy.url, "C", extra=["--retries", "0"]), "stay pending")
    res = CliRunner().invoke(app, base + ["--abandon"])
    assert res.exit_code == 0 and "stay blocked" in res.stderr
    proxy.fault("pass")
    one_line_error(infer(world, pool, proxy.url, "C"), "--abandon", "never sent again")
    answered(infer(world, pool, proxy.url, "A", "B"), 8)  # answered from the cache


def test_p3_pending_request_is_resent_with_its_stored_keys(world, tmp_path, lenet3_exported):
    """P = 3 (keys [N, 3, 3]): an unknown outcome keeps x and the orthogonal keys; the retry sends the same
    x and decodes it with them, to the logits a local run with those keys gives."""
    import onnxruntime as ort

    from cvconvert.device.remote import OutcomeUnknown

    model = lenet3_exported
    sess = ort.InferenceSession(str(model / "onnx" / "processing.onnx"), providers=["CPUExecutionProvider"])
    seen, fail = [], [True]

    def flaky(x):
        seen.append(np.array(x, copy=True))
        if fail[0]:
            fail[0] = False
            raise OutcomeUnknown("server closed the connection")
        return sess.run(None, {"x": x})[0]

    from cvconvert.cli.fools import _load

    plain = Pipeline.from_model_dir(model, guard=None)
    arr, _ = _load([world["base"] / "fools"], plain.manifest, False)
    pool3 = FoolPool.create(tmp_path / "pool3", arr, plain.features(arr), features_sha256=plain.features_sha256,
                            input_shape=plain.input_shape, feature_shape=plain.features(arr[:1]).shape[1:])
    pipe = Pipeline.from_model_dir(model, pool=pool3, processing=flaky)
    images = _images(world, "D")
    with pytest.raises(Exception, match="outcome is unknown"):
        pipe.predict(images)
    (rid,) = pending()
    entry = DeviceState().read_entry(rid)
    assert entry["key"].shape == (4, 3, 3) and used(pool3) == 8
    got = pipe.predict(images)
    assert len(pipe.last["resent"]) == 4 and used(pool3) == 8 and pending() == {}
    assert np.array_equal(seen[0], seen[1])
    want = plain.decode(sess.run(None, {"x": seen[0]})[0], entry["key"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert_no_exposure(seen)


def test_status_checks_the_recorded_hashes(pool):
    """`fools status` reads every file: a features.npy rewritten with other (well-formed) numbers is named."""
    ok = CliRunner().invoke(app, ["fools", "status", str(pool.path), "--json"])
    assert ok.exit_code == 0 and '"verified": true' in ok.stdout and '"private": true' in ok.stdout
    feats = np.load(pool.path / "features.npy")
    np.save(pool.path / "features.npy", feats[::-1].copy())
    one_line_error(CliRunner().invoke(app, ["fools", "status", str(pool.path)]), "features.npy",
                   "changed after it was written")


# ---------------------------------------------------------------------------------------------------
# found in review: a screen failing part-way, and the guard's capacity


def test_pool_used_up_part_way_costs_no_fool(world, tmp_path, proxy):
    """Four images, a pool of two fools: the screen takes two and then fails; both go back, nothing pending."""
    from cvconvert.cli.fools import _load

    pipe = Pipeline.from_model_dir(world["model"], guard=None)
    arr, _ = _load([world["base"] / "fools"], pipe.manifest, False)
    small = FoolPool.create(tmp_path / "small", arr[:2], pipe.features(arr[:2]), features_sha256=pipe.features_sha256,
                            input_shape=pipe.input_shape, feature_shape=pipe.features(arr[:1]).shape[1:])
    res = infer(world, small, proxy.url, "A")
    one_line_error(res, "unused fool")
    assert used(small) == 0 and pending() == {} and len(proxy.seen) == 0


def test_a_full_guard_never_forgets_a_pending_image(tmp_path):
    """Past --guard-size the oldest transmissions are forgotten, but never one whose answer is still due:
    forgotten, its image would be sent again with a fresh fool instead of its journaled x."""
    from cvconvert.device.guard import SentGuard

    rng = np.random.default_rng(0)
    guard = SentGuard(tmp_path / "guard.npz", capacity=2)
    images = rng.normal(size=(3, 1, 8, 8)).astype(np.float32)

    def fools(i, accept, burn):
        return rng.normal(size=(1, 1, 8, 8)).astype(np.float32)

    first, _, keys = guard.screen_and_reserve(images[:1], fools, parts=2)
    assert first.action == ["send"]  # sent, never answered: pending
    for i in (1, 2):  # answered transmissions push the guard past its capacity
        _, _, k = guard.screen_and_reserve(images[i:i + 1], fools, parts=2)
        guard.store_logits(k, np.zeros((1, 10), np.float32))
    again, _, _ = guard.screen_and_reserve(images[:1], fools, parts=2)
    assert again.action == ["busy"] and again.ref == [int(keys[0])]
