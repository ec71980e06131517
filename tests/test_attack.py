"""`cvconvert attack` on a tiny LeNet with tiny synthetic data and a shrunken budget: every report field
and picture, attacks that beat chance where nothing protects, resume, and one-line errors."""

import json
from dataclasses import replace

import pytest
import torch
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from cvconvert.cli.main import app
from cvconvert.attacks import runner as audit
from conftest import one_line_error

cli = CliRunner()
N_TRAIN, N_EVAL = 160, 48


class Items(TensorDataset):
    """The item format of cvconvert.data.get_dataset: (image [C,H,W] in [0,1], target, prop)."""

    def __getitem__(self, i):
        img, t, p = super().__getitem__(i)
        return img, int(t), int(p)


def synthetic(n: int, seed: int, with_prop: bool = True):
    """A bright square whose position is the hidden property (4 values) on a noisy background; the
    task is the square's row (2 classes). Structured enough that inversion and probes can learn it."""
    g = torch.Generator().manual_seed(seed)
    prop = torch.randint(0, 4, (n,), generator=g)
    img = 0.15 * torch.rand(n, 1, 32, 32, generator=g)
    for i, p in enumerate(prop.tolist()):
        r, c = 4 + 14 * (p // 2), 4 + 14 * (p % 2)
        img[i, 0, r:r + 10, c:c + 10] += 0.8
    return Items(img.clamp(0, 1), prop // 2, prop if with_prop else torch.full((n,), -1))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from a second thread, and on a shared machine its spin-waiting
    costs several times the work; restore the suite's setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny(monkeypatch):
    """Synthetic data in place of the real loader and a budget small enough for tests."""
    state = {"with_prop": True}

    def load(name, train, data_dir=None, task="fine"):
        return synthetic(N_TRAIN if train else N_EVAL, 1 if train else 2, state["with_prop"])

    monkeypatch.setattr(audit, "load_split", load)
    small = replace(audit.BUDGETS["quick"], n_train=N_TRAIN, n_eval=N_EVAL, unet_width=8, grid=(12, 5),
                    whitebox_n=16, whitebox_steps=60)
    monkeypatch.setitem(audit.BUDGETS, "quick", small)
    return state


def run(*args):
    return cli.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)  # the same untrained weights every run
    for v in ("complex", "original"):
        res = run("convert", "lenet", "-o", root / v, "--variant", v, "--input-shape", "1,32,32", "--num-classes", "2")
        assert res.exit_code == 0, res.output
    return root


def assert_one_line_error(res, fragment):
    one_line_error(res, fragment, code=2)  # progress messages may come first; the error is the last line


def test_audit_report_fields_pictures_and_attacks_beat_chance(tiny, models, tmp_path):
    out = tmp_path / "report"
    args = ("attack", models / "complex", "--data", "fashion-mnist", "--baseline", models / "original",
            "-o", out, "--epochs", "4", "--device", "cpu")
    res = run(*args)
    assert res.exit_code == 0, res.output
    R = json.loads((out / "report.json").read_text())
    m = R["meta"]
    assert (m["n_attacker_train"], m["n_eval"], m["property"]) == (N_TRAIN, N_EVAL, True)
    assert m["exported_graphs"] == "not exported"  # the report says which weights it audited
    t = R["tables"]
    assert {r["model"] for r in t["utility"]} == {"complex", "original"}
    angles = {r["attack"]: r for r in t["angle"]}
    assert len(angles) == 5 and all(0 <= r["mean_abs_error_rad"] <= 3.15 and r["verdict"] for r in angles.values())
    rec = {(r["model"], r["attack"]): r for r in t["reconstruction"]}
    assert ("original", "inversion from a") in rec
    assert {"inversion 1: dec(a*), paper D' angle", "inversion 2: dec(x)", "white-box: I_hat",
            "adaptive: dec(|x|, x_j conj x_k), no angle"} <= {a for _, a in rec}
    assert all(r["mae"] >= 0 and "verdict" in r for r in t["reconstruction"][1:])
    prop = {(r["model"], r["attack"]): r["error"] for r in t["property"]}
    for model, fa in (("complex", "a*"), ("original", "a")):
        for k in (1, 3, 5):
            assert (model, f"inference 4: {k}-NN of {fa}") in prop
        assert (model, f"inference 2: classifier on {fa}") in prop
        assert (model, f"inference 3: classifier on dec({fa})") in prop
        assert (model, f"inference 1: raw-image classifier on dec({fa})") in prop
    assert any(r["target"].startswith("reconstruction error from a*") for r in t["targets"])
    assert len(R["history"]["inference 2 (complex, a*)"]) == 4
    for name in R["figures"].values():
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000, name
    md = (out / "report.md").read_text()
    for heading in ("## Utility", "## Angle estimation", "## Reconstruction", "## Property inference", "## Verdicts"):
        assert heading in md
    assert "its ONNX graphs (`onnx/`): not exported yet" in md
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))

    # Nothing protects the original variant: inversion from its a beats the constant (mean) image,
    # and the hidden property (the square's position) is read off its features far better than chance.
    chance_rec = t["reconstruction"][0]["mae"]
    assert rec[("original", "inversion from a")]["mae"] < 0.8 * chance_rec
    chance_prop = t["property"][0]["chance"]
    assert prop[("original", "inference 4: 1-NN of a")] < chance_prop - 0.3
    # The untrained complex LeNet has no adversarial training: its phases give the key away.
    # (How well the training-free estimator does depends on the random init's channel means, so the
    # test asks for the better of it and the white-box search.)
    assert angles["learned regressor (cos, sin)"]["mean_abs_error_rad"] < 1.3
    assert min(angles["phase support: channel-weighted mean phase"]["mean_abs_error_rad"],
               angles["white-box optimisation (closed-form theta)"]["mean_abs_error_rad"]) < 0.5

    # Resume: every attacker comes from its checkpoint, nothing is retrained.
    ckpts = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("*.pt")}
    assert len(ckpts) >= 10
    res = run(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert {p: p.stat().st_mtime_ns for p in ckpts} == ckpts
    # ... but a resume with other settings is refused rather than mixing attackers.
    assert_one_line_error(run(*args[:-2], "--epochs", "2", "--resume"), "other settings")


def test_data_without_property_skips_property_attacks(tiny, models, tmp_path):
    tiny["with_prop"] = False
    out = tmp_path / "r"
    res = run("attack", models / "complex", "--data", "fashion-mnist", "-o", out, "--epochs", "1",
              "--train-size", "64", "--eval-size", "16")
    assert res.exit_code == 0, res.output
    assert "no hidden-property labels" in res.stderr
    R = json.loads((out / "report.json").read_text())
    assert R["tables"]["property"] == [] and "skipped" in R["property_skipped"]
    assert R["tables"]["reconstruction"] and R["tables"]["angle"]
    assert "Skipped:" in (out / "report.md").read_text()


def test_bad_inputs_give_one_line_errors(tiny, models, tmp_path, monkeypatch):
    out = tmp_path / "r"
    assert_one_line_error(run("attack", tmp_path / "nope", "--data", "fashion-mnist", "-o", out), "does not exist")
    assert_one_line_error(run("attack", models / "original", "--data", "fashion-mnist", "-o", out),
                          "attacks a complex model")
    assert_one_line_error(run("attack", models / "complex", "--data", "fashion-mnist", "-o", out,
                              "--baseline", models / "complex"), "baselines must be one of")
    assert_one_line_error(run("attack", models / "complex", "--data", "cifar10", "-o", out), "model takes")
    assert_one_line_error(run("attack", models / "complex", "--data", "mnist", "-o", out), "unknown data set")
    assert_one_line_error(run("attack", models / "complex", "--data", "fashion-mnist", "-o", out, "--budget", "huge"),
                          "unknown budget")
    assert_one_line_error(run("attack", models / "complex", "--data", "fashion-mnist", "-o", out,
                              "--train-size", "1"), "--train-size")
    monkeypatch.setattr(audit, "available_memory", lambda: 1 << 20)
    assert_one_line_error(run("attack", models / "complex", "--data", "fashion-mnist", "-o", out), "needs about")
    assert not out.exists()
