"""`cvconvert train` / `eval`: tiny Fashion-MNIST idx files, a few --max-steps, one-line errors, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cvconvert.cli.main import app
from cvconvert.build import convert_to_dir
from cvconvert.modeldir import load_model
from cvconvert.dist import Dist
from cvconvert.train import CHECKPOINT, SplitTrainer, TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_data import write_fashion  # noqa: E402

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def fm(tmp_path, monkeypatch):
    monkeypatch.setenv("CVCONVERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CVCONVERT_DATA", raising=False)
    write_fashion(tmp_path / "fm", n_train=40, n_test=16)
    return tmp_path / "fm"


def _cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


def _train_args(d, fm, *extra):
    return ["train", d, "--data-dir", fm, "--batch-size", 8, "--device", "cpu", "--val-fraction", 0.2, *extra]


def _state(d):
    return {k: v.clone() for k, v in torch.load(Path(d) / "model.pt", weights_only=True).items()}


def test_original_trains_and_writes_checkpoints(tmp_path, fm):
    d = tmp_path / "orig"
    convert_to_dir("lenet", d, variant="original")
    before = _state(d)
    code, out = _cli(*_train_args(d, fm, "--epochs", 2, "--json"))
    assert code == 0, out
    recs = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2] and recs[0]["steps"] == 4
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in recs) and recs[0]["train_loss"] != recs[1]["train_loss"]
    assert "val_error" in recs[1]
    ckpt = torch.load(d / CHECKPOINT, weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 8
    after = _state(d)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # model.pt holds trained weights
    model, manifest = load_model(d)  # and loads back
    assert manifest["history"]["epochs"] == 2 and manifest["history"]["best"]["epoch"] in (1, 2)
    assert not list(d.glob(".*tmp")) and not list((d / "checkpoints").glob(".*tmp"))
    code, out = _cli("eval", d, "--data-dir", fm, "--device", "cpu")
    assert code == 0, out
    res = json.loads((d / "eval.json").read_text())
    assert res["n"] == 16 and 0 <= res["error"] <= 1 and f"{100 * res['error']:.2f}%" in out


def test_complex_gan_steps_move_encoder_and_critic(tmp_path):
    d = tmp_path / "cx"
    convert_to_dir("lenet", d)
    model, manifest = load_model(d)
    cfg = TrainConfig(gan_weight=0.5, lr=1e-3, defense="paper")
    trainer = SplitTrainer(model, manifest, cfg, torch.device("cpu"), Dist("cpu"), multilabel=False)
    critic0 = [p.detach().clone() for p in model.discriminator.parameters()]
    gen0 = [p.detach().clone() for p in model.encoder.features.generator.parameters()]
    x, y = torch.rand(8, 1, 32, 32), torch.randint(0, 10, (8,))
    stats = [trainer.train_step(x, y) for _ in range(3)]
    for key in ("loss", "task_loss", "gan_loss", "critic_loss", "wdist"):
        vals = [s[key] for s in stats]
        assert all(torch.isfinite(torch.tensor(vals))), key
        assert len(set(vals)) > 1, key  # the losses move
    assert stats[-1]["task_loss"] < stats[0]["task_loss"]  # same batch: the task loss goes down
    assert any(not torch.equal(a, b) for a, b in zip(critic0, model.discriminator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(gen0, model.encoder.features.generator.parameters()))


def test_complex_cli_smoke_and_finetune_from_original(tmp_path, fm):
    orig = tmp_path / "orig"
    convert_to_dir("lenet", orig, variant="original")
    assert _cli(*_train_args(orig, fm, "--epochs", 1, "--max-steps", 2))[0] == 0
    cx = tmp_path / "cx"
    code, out = _cli("convert", "lenet", "--weights", orig, "-o", cx)
    assert code == 0, out
    trained_conv1 = torch.load(orig / "model.pt", weights_only=True)["encoder.body.conv1.weight"]
    assert torch.equal(torch.load(cx / "model.pt", weights_only=True)["encoder.features.body.conv1.weight"],
                       trained_conv1)
    code, out = _cli(*_train_args(cx, fm, "--epochs", 1, "--max-steps", 3, "--k", 4, "--gan-batch", 4,
                                  "--train-limit", 20, "--defense", "paper"))
    assert code == 0, out
    rec = json.loads((cx / "metrics.jsonl").read_text())
    assert rec["steps"] == 2 and "train_wdist" in rec and "train_critic_loss" in rec  # 16 of 20 images: 2 steps
    assert rec["val_n"] == 4
    manifest = json.loads((cx / "cvconvert.json").read_text())
    assert manifest["k"] == 4 and manifest["history"]["gan"]["k"] == 4


def test_resume_loses_no_epoch(tmp_path, fm):
    # original variant: no CSPRNG angles, so a resumed run must equal an uninterrupted one bit for bit
    a, b = tmp_path / "a", tmp_path / "b"
    convert_to_dir("lenet", a, variant="original")
    shutil.copytree(a, b)  # the same initial weights
    assert _cli(*_train_args(a, fm, "--epochs", 2, "--val-fraction", 0))[0] == 0
    assert _cli(*_train_args(b, fm, "--epochs", 1, "--val-fraction", 0))[0] == 0
    code, out = _cli(*_train_args(b, fm, "--epochs", 2, "--val-fraction", 0, "--resume"))
    assert code == 0, out
    ca, cb = (torch.load(d / CHECKPOINT, weights_only=True) for d in (a, b))
    assert cb["epoch"] == 2 and cb["step"] == ca["step"]
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert [json.loads(ln)["epoch"] for ln in (b / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def _one_line_error(code, out, pattern):
    assert code != 0, out
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and pattern in lines[0], out
    assert "Traceback" not in out


def test_bad_inputs_are_one_line_errors(tmp_path, fm):
    d = tmp_path / "m"
    convert_to_dir("lenet", d, variant="original")
    (tmp_path / "empty").mkdir()
    _one_line_error(*_cli(*_train_args(d, fm, "--data", "mnist")), "unknown data set 'mnist'")
    _one_line_error(*_cli(*_train_args(d, tmp_path / "empty")), "apt-get install dataset-fashion-mnist")
    _one_line_error(*_cli(*_train_args(tmp_path / "nope", fm)), "does not exist")
    c10 = tmp_path / "c10"
    convert_to_dir("lenet", c10, data="cifar10", variant="original")
    _one_line_error(*_cli(*_train_args(c10, fm, "--data", "fashion-mnist")), "takes input [3, 32, 32]")
    coarse = tmp_path / "coarse"
    convert_to_dir("lenet", coarse, variant="original", task="coarse")
    _one_line_error(*_cli(*_train_args(coarse, fm, "--task", "fine")), "has 4 classes")
    _one_line_error(*_cli(*_train_args(d, fm, "--resume")), "no checkpoint")
    (d / "checkpoints").mkdir()
    (d / CHECKPOINT).write_bytes(b"not a checkpoint")
    _one_line_error(*_cli(*_train_args(d, fm, "--resume")), "does not load")
    if not torch.cuda.is_available():
        _one_line_error(*_cli(*_train_args(d, fm, "--device", "cuda")), "no CUDA device")
    _one_line_error(*_cli("eval", d, "--data-dir", tmp_path / "empty"), "dataset-fashion-mnist")


def test_nan_loss_stops_and_keeps_last_good(tmp_path, fm):
    d = tmp_path / "m"
    convert_to_dir("lenet", d, variant="original")
    assert _cli(*_train_args(d, fm, "--epochs", 1))[0] == 0
    good = _state(d)
    ckpt = (d / CHECKPOINT).read_bytes()
    code, out = _cli(*_train_args(d, fm, "--epochs", 3, "--lr", 1e30))
    _one_line_error(code, out, "NaN")
    assert "epoch 1" in out and "kept" in out
    # the run blew up inside its first epoch: nothing it wrote replaced the previous good files
    now = _state(d)
    assert all(torch.equal(good[k], now[k]) for k in good)
    assert (d / CHECKPOINT).read_bytes() == ckpt


# Run under torchrun by the test below: trains through the public API, and a callback records each
# process's final weights (only rank 0 writes files, so the other rank's weights are not on disk).
_WORKER = """
import hashlib, json, os, sys
from pathlib import Path
from cvconvert.train import TrainConfig, train

def dump(trainer, rec):
    h = hashlib.sha256()
    for key, v in sorted(trainer.model.state_dict().items()):
        h.update(key.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    Path(f"{sys.argv[2]}.{os.environ['RANK']}").write_text(h.hexdigest())

cfg = TrainConfig(data_dir=sys.argv[3], batch_size=4, device="cpu", epochs=1, max_steps=3, val_fraction=0.2,
                  defense="paper")
summary = train(sys.argv[1], cfg, log=False, callbacks=[dump])
if os.environ["RANK"] == "0":
    print(json.dumps(summary))
"""


def test_torchrun_two_gloo_processes_end_identical(tmp_path, fm):
    d = tmp_path / "cx"
    convert_to_dir("lenet", d)
    dump = tmp_path / "hash"
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    env = {**os.environ, "CVCONVERT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(worker), str(d), str(dump), str(fm)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    h0, h1 = (Path(f"{dump}.{r}").read_text() for r in (0, 1))
    assert h0 == h1
    summary = json.loads(res.stdout)
    assert summary["world_size"] == 2 and summary["steps"] == 3
    # rank 0 wrote the files, and they hold the weights both ranks agree on, critic included
    ckpt = torch.load(d / CHECKPOINT, weights_only=True)
    assert ckpt["step"] == 3 and any(k.startswith("discriminator.") for k in ckpt["model"])
    assert json.loads((d / "metrics.jsonl").read_text())["train_wdist"] != 0
    import hashlib
    h = hashlib.sha256()
    for key, v in sorted(ckpt["model"].items()):
        h.update(key.encode())
        h.update(v.contiguous().numpy().tobytes())
    assert h.hexdigest() == h0


def test_train_defense_option_persists_and_keeps_decoding(tmp_path, fm):
    """`--defense exchange` trains, records its key law in the manifest, and the reloaded model still decodes."""
    from cvconvert.complex.functional import unrotate_real
    from cvconvert.device.keylaws import KEY_LAWS, quadrant_sign

    d = tmp_path / "ex"
    convert_to_dir("lenet", d)
    before = load_model(d)[0].state_dict()
    code, out = _cli(*_train_args(d, fm, "--max-steps", 3, "--defense", "exchange"))
    assert code == 0, out
    model, manifest = load_model(d)
    after = model.state_dict()
    for k in ("encoder.features.body.conv1.weight", "processing.conv2.weight", "decoder.decoder.bias"):
        assert k in after and not torch.equal(before[k], after[k]), k  # the three parts all trained
    assert manifest["key_law"] == "exchange" and manifest["defense"]["name"] == "exchange"
    assert model.spec.law.name == "exchange" and manifest["format_version"] == 2
    img, fool = torch.rand(4, 1, 32, 32), torch.rand(4, 1, 1, 32, 32)
    theta = torch.tensor([0.3, 2.0, 3.5, 5.0])  # one angle in each quarter-circle
    model.eval()
    with torch.no_grad():
        x = model.encoder(img, fool, torch.from_numpy(KEY_LAWS["exchange"].of_angle(theta.numpy())))
        a, b = model.features(img), model.features(fool[:, 0])
    torch.testing.assert_close(unrotate_real(x, theta), a, atol=1e-5, rtol=1e-4)
    s = torch.from_numpy(quadrant_sign(theta.numpy())).view(-1, 1, 1, 1)
    torch.testing.assert_close(unrotate_real(x, theta + torch.pi / 2), s * b, atol=1e-5, rtol=1e-4)
    assert s.flatten().tolist() == [1.0, -1.0, 1.0, -1.0]
    code, out = _cli(*_train_args(tmp_path / "ex", fm, "--max-steps", 1, "--defense", "nope"))
    assert code != 0 and "unknown defense 'nope'" in out
    orig = tmp_path / "orig"
    convert_to_dir("lenet", orig, variant="original")
    code, out = _cli(*_train_args(orig, fm, "--max-steps", 1, "--defense", "exchange"))
    assert code != 0 and "needs a complex model" in out


def test_private_defaults_and_a_trained_model_keeps_its_own(tmp_path, fm):
    """A fresh complex model trains with exchange + match; a model trained before keeps its defense and
    rule when trained again without the options; --defense paper still gives the paper's WGAN."""
    d = tmp_path / "new"
    convert_to_dir("lenet", d)
    code, out = _cli(*_train_args(d, fm, "--max-steps", 2))
    assert code == 0, out
    manifest = json.loads((d / "cvconvert.json").read_text())
    assert manifest["defense"]["name"] == "exchange" and manifest["key_law"] == "exchange"
    assert manifest["fool_rule"] == "match" and manifest["history"]["gan"] is None
    rec = json.loads((d / "metrics.jsonl").read_text())
    assert "train_wdist" not in rec and "train_loss" in rec
    p = tmp_path / "paper"
    convert_to_dir("lenet", p)
    assert _cli(*_train_args(p, fm, "--max-steps", 1, "--defense", "paper", "--fool-rule", "random"))[0] == 0
    code, out = _cli(*_train_args(p, fm, "--max-steps", 1))  # no options: the model's own
    assert code == 0, out
    manifest = json.loads((p / "cvconvert.json").read_text())
    assert manifest["defense"]["name"] == "paper" and manifest["history"]["gan"]["k"] == 8
    assert "fool_rule" not in manifest and manifest["key_law"] == "rotation"
    assert "train_wdist" in json.loads((p / "metrics.jsonl").read_text())


def test_experiments_hooks_own_data_own_fool_rule_and_no_defense(tmp_path):
    """experiments/ train through cvconvert.train: a dataset of their own in place of --data's split, a
    fool hook for rules the product does not ship, and --defense none (the task loss alone)."""
    from torch.utils.data import TensorDataset

    from cvconvert.modeldir import read_manifest
    from cvconvert.train import train

    d = tmp_path / "m"
    convert_to_dir("lenet", d, data="fashion-mnist", seed=0)
    images, y = torch.rand(24, 1, 32, 32), torch.randint(0, 10, (24,))
    calls = []

    def last_is_fool(img):  # each sample's fool: the one before it
        calls.append(len(img))
        return torch.arange(len(img)).roll(1)

    records = []
    cfg = TrainConfig(epochs=2, batch_size=8, device="cpu", val_fraction=0.0, defense="none")
    out = train(d, cfg, log=False, callbacks=[lambda trainer, rec: records.append(rec)],
                train_set=TensorDataset(images, y, torch.full_like(y, -1)), fool_index=last_is_fool)
    assert out["steps"] == 6 and calls == [8] * 6 and [r["epoch"] for r in records] == [1, 2]
    m = read_manifest(d)
    assert "defense" not in m and m["history"]["steps"] == 6 and m.get("fool_sign", "none") == "none"
