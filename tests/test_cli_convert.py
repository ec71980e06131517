"""`cvconvert convert`, `list` and `info` through typer's CliRunner, including every bad input."""

import json

import pytest
import torch
from typer.testing import CliRunner

from cvconvert import zoo
from cvconvert.cli.main import app
from cvconvert.modeldir import load_model, read_manifest

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(res, fragment):
    assert res.exit_code != 0
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in res.output
    assert fragment in err, err


def test_list_shows_zoo_and_presets():
    res = run("list", "--json")
    assert res.exit_code == 0
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "lenet", "vgg16", "alexnet"} <= set(rows)
    assert rows["resnet56"]["splits"] == {"alpha": "layer1:layer3.1", "beta": "layer1:layer3.8"}
    assert rows["lenet"]["default_split"] == "paper"
    res = run("list", "resnet1*", "--all", "--json")
    names = [r["name"] for r in json.loads(res.stdout)]
    assert "resnet110" in names and "resnet18" in names and "lenet" not in names
    res = run("list", "--nodes", "resnet20")
    assert "layer1.0.add" in res.stdout.split()


@pytest.mark.parametrize("arch,extra", [("resnet110", ["--split", "alpha"]), ("resnet20", ["--split", "beta"]),
                                        ("lenet", []), ("alexnet", []), ("vgg16", ["--data", "cifar10"])])
def test_convert_zoo_entries(tmp_path, arch, extra):
    out = tmp_path / arch
    res = run("convert", arch, "-o", out, *extra, "--json")
    assert res.exit_code == 0, res.output
    manifest = json.loads(res.stdout)
    assert manifest == read_manifest(out)
    model, m = load_model(out)
    assert m["variant"] == "complex" and model.is_complex
    c, h, w = m["input_shape"]
    with torch.no_grad():
        logits = model.eval()(torch.rand(2, c, h, w))
    assert logits.shape == (2, m["num_classes"])


def test_convert_baselines_and_weights_roundtrip(tmp_path):
    for variant in ("original", "noisy", "additional"):
        res = run("convert", "lenet", "-o", tmp_path / variant, "--variant", variant)
        assert res.exit_code == 0, res.output
        assert read_manifest(tmp_path / variant)["variant"] == variant
    # Fine-tuning path: a trained original's model dir feeds --weights of a complex conversion.
    orig, _ = load_model(tmp_path / "original")
    with torch.no_grad():
        orig.encoder.body.conv1.weight.add_(1.0)
    torch.save(orig.state_dict(), tmp_path / "original" / "model.pt")
    res = run("convert", "lenet", "-o", tmp_path / "cplx", "--weights", tmp_path / "original")
    assert res.exit_code == 0, res.output
    cplx, _ = load_model(tmp_path / "cplx")
    assert torch.equal(cplx.encoder.features.body.conv1.weight, orig.encoder.body.conv1.weight)
    assert torch.equal(cplx.processing.conv2.weight, orig.processing.conv2.weight)
    # A plain state_dict of the real model works too.
    real = zoo.create_model("lenet", 10, (1, 32, 32))
    torch.save(real.state_dict(), tmp_path / "real.pt")
    assert run("convert", "lenet", "-o", tmp_path / "c2", "--weights", tmp_path / "real.pt").exit_code == 0
    assert torch.equal(load_model(tmp_path / "c2")[0].processing.fc1.weight, real.fc1.weight)


def test_convert_seed_fixes_the_initialisation(tmp_path):
    """Same seed: the same weights, and the original and complex variants share the real conv weights."""
    for name, variant, seed in (("a", "complex", 7), ("b", "complex", 7), ("o", "original", 7), ("c", "complex", 8)):
        res = run("convert", "lenet", "-o", tmp_path / name, "--variant", variant, "--seed", seed)
        assert res.exit_code == 0, res.output
    a, b, o, c = (load_model(tmp_path / n)[0].state_dict() for n in ("a", "b", "o", "c"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["processing.conv2.weight"], o["processing.conv2.weight"])
    assert not torch.equal(a["processing.conv2.weight"], c["processing.conv2.weight"])
    assert read_manifest(tmp_path / "a")["init_seed"] == 7
    assert run("convert", "lenet", "-o", tmp_path / "u").exit_code == 0
    assert "init_seed" not in read_manifest(tmp_path / "u")  # unseeded: the manifest is as before
    before = torch.random.get_rng_state()
    run("convert", "lenet", "-o", tmp_path / "d", "--seed", 1)
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's generator is left alone
    assert_one_line_error(run("convert", "lenet", "-o", tmp_path / "e", "--seed", -1), "--seed -1")


def test_convert_bad_inputs(tmp_path):
    assert_one_line_error(run("convert", "nosuchnet", "-o", tmp_path / "a"), "unknown architecture 'nosuchnet'")
    assert_one_line_error(run("convert", "resnet20", "--split", "gamma", "-o", tmp_path / "a"), "unknown split 'gamma'")
    assert_one_line_error(run("convert", "resnet20", "--split", "layer1.0.conv1:layer3", "-o", tmp_path / "a"),
                          "skip connection crosses")
    assert_one_line_error(run("convert", "resnet20", "--split", "layer1:layer2", "-o", tmp_path / "a"),
                          "processing module empty")
    assert_one_line_error(run("convert", "resnet20", "--split", ":layer2", "-o", tmp_path / "a"), "encoder empty")
    assert_one_line_error(run("convert", "resnet18", "-o", tmp_path / "a"), "no split preset")
    assert_one_line_error(run("convert", "mobilenet_v2", "--split", "features.1:classifier", "-o", tmp_path / "a"),
                          "(ReLU6) cannot be made rotation-equivariant")
    assert_one_line_error(run("convert", "lenet", "--data", "mnist-9", "-o", tmp_path / "a"), "unknown data set")
    assert_one_line_error(run("convert", "lenet", "--input-shape", "3,x,2", "-o", tmp_path / "a"), "bad shape")
    torch.save(zoo.create_model("resnet20", 10, (1, 32, 32)).state_dict(), tmp_path / "r20.pt")
    assert_one_line_error(run("convert", "resnet32", "-o", tmp_path / "a", "--weights", tmp_path / "r20.pt"),
                          "does not match the model")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(run("convert", "lenet", "-o", tmp_path / "a", "--weights", tmp_path / "junk.pt"),
                          "cannot load weights")
    assert not (tmp_path / "a").exists()
    # Nothing half-written: no stray temp folders either.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt", "r20.pt"]


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "m"
    assert run("convert", "lenet", "-o", out).exit_code == 0
    before = (out / "model.pt").read_bytes()
    assert_one_line_error(run("convert", "lenet", "-o", out, "--variant", "original"), "not empty (use --force")
    assert (out / "model.pt").read_bytes() == before
    assert run("convert", "lenet", "-o", out, "--variant", "original", "--force").exit_code == 0
    assert read_manifest(out)["variant"] == "original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    res = run("convert", "lenet", "-o", tmp_path / "m")
    assert res.exit_code != 0
    assert list(tmp_path.iterdir()) == []


def test_unknown_manifest_version_is_refused(tmp_path):
    out = tmp_path / "m"
    assert run("convert", "lenet", "-o", out).exit_code == 0
    assert run("info", out).exit_code == 0
    m = json.loads((out / "cvconvert.json").read_text())
    m["format_version"] = 99
    (out / "cvconvert.json").write_text(json.dumps(m))
    assert_one_line_error(run("info", out), "format version 99")
    assert_one_line_error(run("info", tmp_path / "nope"), "does not exist")
