"""The row audit of P-part models: `cvconvert attack` end to end on a tiny P = 3 model, the key-free
(Gram) features' invariance, and the which-row classifier at and above chance."""

import json
from dataclasses import replace

import pytest
import torch

from cvconvert.attacks import runner as audit
from cvconvert.attacks.base import Public
from cvconvert.attacks.budget import BUDGETS
from cvconvert.attacks.fit import Trainer
from cvconvert.attacks.gram import gram_features, spectra
from cvconvert.attacks.invariant import channel_pairs
from cvconvert.attacks.rowsearch import key_matrix, rows, simulate
from cvconvert.attacks.whichrow import WhichRow, shuffled
from cvconvert.complex.functional import encode
from cvconvert.errors import CvError
from cvconvert.device.keylaws import KEY_LAWS
from cvconvert.parts import random_key
from test_attack import N_EVAL, N_TRAIN, one_thread, run, synthetic  # noqa: F401  (one_thread: autouse fixture)


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_gram_features_do_not_depend_on_the_key(parts):
    f = torch.randn(5, parts, 4, 6, 6)
    haar = KEY_LAWS["haar"]
    x1, x2 = rows(random_key(5, parts, haar), f), rows(random_key(5, parts, haar), f)
    assert (x1 - x2).abs().max() > 0.1  # the transmissions differ ...
    pairs = channel_pairs(4)
    torch.testing.assert_close(gram_features(x1, pairs), gram_features(x2, pairs), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(spectra(x1), spectra(x2), atol=1e-3, rtol=1e-4)  # ... what the attack reads does not
    torch.testing.assert_close(gram_features(x1, pairs), gram_features(f, pairs), atol=1e-4, rtol=1e-4)


def test_two_part_key_matrix_reproduces_the_encoder():
    a, b, theta = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4), torch.rand(6) * 6.28
    k = key_matrix(encode, theta)
    torch.testing.assert_close(rows(k, torch.stack((a, b), 1)), encode(a, b, theta), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k @ k.transpose(1, 2), torch.eye(2).expand(6, 2, 2), atol=1e-5, rtol=1e-5)


def _public(tmp_path, a: torch.Tensor) -> Public:
    budget = replace(BUDGETS["quick"], epochs_override=4)
    return Public(torch.device("cpu"), budget, Trainer(tmp_path, torch.device("cpu")), None, 0,
                  tr={"images": torch.zeros(len(a), 1, 8, 8), "a": a})


def _features(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g) + torch.rand(n, 1, 1, 1, generator=g)


def _accuracy(which, f: torch.Tensor) -> float:
    cand, target = shuffled(f, torch.Generator().manual_seed(7))
    return float((which.pick(cand) == target).float().mean())


def test_which_row_finds_the_image_when_fools_differ_and_not_when_they_are_exchangeable(tmp_path):
    """Control: fools drawn from another law (small noise) are told apart, so the classifier must beat
    1/P by far; with fools drawn like the image (the deployment) no classifier can beat 1/P."""
    parts, pub = 3, _public(tmp_path, _features(400, 0))
    noise = 0.3 * torch.randn(400, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    control = WhichRow(parts, bank=noise).fit(pub)
    test_a = _features(600, 2)
    gen = torch.Generator().manual_seed(3)
    f_control = torch.cat((test_a[:, None], noise[torch.randint(400, (600, parts - 1), generator=gen)]), 1)
    assert _accuracy(control, f_control) > 0.9
    honest = WhichRow(parts).fit(pub)
    f_honest = torch.cat((test_a[:, None], test_a[torch.randint(600, (600, parts - 1), generator=gen)]), 1)
    assert abs(_accuracy(honest, f_honest) - 1 / parts) < 0.1


def test_simulated_transmissions_hide_the_image_with_an_orthogonal_key(tmp_path):
    pub = _public(tmp_path, _features(20, 0))
    pub.partners = lambda idx, n, gen: (idx + 1) % n  # noqa: E731
    x, f, q = simulate(pub, torch.arange(20), 4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(f[:, 0], pub.tr["a"])
    torch.testing.assert_close(q @ q.transpose(1, 2), torch.eye(4).expand(20, 4, 4), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows(q.transpose(1, 2), x), f, atol=1e-5, rtol=1e-5)


@pytest.fixture
def tiny3(monkeypatch, tmp_path):
    def load(name, train, data_dir=None, task="fine"):
        return synthetic(N_TRAIN if train else N_EVAL, 1 if train else 2, True)

    monkeypatch.setattr(audit, "load_split", load)
    small = replace(audit.BUDGETS["quick"], n_train=N_TRAIN, n_eval=N_EVAL, unet_width=8, whitebox_n=8,
                    whitebox_steps=10)
    monkeypatch.setitem(audit.BUDGETS, "quick", small)
    torch.manual_seed(0)
    for v, extra in (("p3", ["--parts", "3"]), ("original", ["--variant", "original"])):
        res = run("convert", "lenet", "-o", tmp_path / v, "--input-shape", "1,32,32", "--num-classes", "2", *extra)
        assert res.exit_code == 0, res.output
    return tmp_path


def test_attack_runs_the_row_audit_on_a_three_part_model(tiny3):
    out = tiny3 / "report"
    res = run("attack", tiny3 / "p3", "--data", "fashion-mnist", "-o", out, "--baseline", tiny3 / "original",
              "--epochs", "1", "--train-size", "64", "--eval-size", "24", "--no-multi-query")
    assert res.exit_code == 0, res.output
    R = json.loads((out / "report.json").read_text())
    assert R["meta"]["parts"] == 3 and R["meta"]["audit"] == "rows"
    t = R["tables"]
    assert [r["id"] for r in t["rotation"]] == ["row_search", "random"]
    assert {r["id"] for r in t["which_row"]} == {"which_row", "which_row_oracle"}
    assert all(r["chance"] == pytest.approx(1 / 3) and 0 <= r["accuracy"] <= 1 for r in t["which_row"])
    ids = {r["id"] for r in t["reconstruction"] if r["model"] == "complex"}
    assert ids == {"reference", "picked_row", "best_of_rows", "gram_inversion", "whitebox_picked", "whitebox_parts"}
    best = next(r["mae"] for r in t["reconstruction"] if r["id"] == "best_of_rows")
    picked = next(r["mae"] for r in t["reconstruction"] if r["id"] == "picked_row")
    assert best <= picked + 1e-6  # the oracle bound is the best of the P, the pick one of them
    assert {r["id"] for r in t["property"]} >= {"reference", "gram_probe", "picked_probe", "original_a"}
    assert [r["target"].split(" <=")[0] for r in t["targets"]][0] == "which-row accuracy of the best attack"
    md = (out / "report.md").read_text()
    assert "## Which row is the image" in md and "## Best rotation search" in md
    assert (out / "reconstructions.png").stat().st_size > 0


def test_victims_get_distinct_fools_never_themselves():
    images = torch.arange(7.0).reshape(7, 1, 1, 1).expand(7, 1, 2, 2).contiguous()
    fools = audit._victim_fools(images, "random", 3)
    assert fools.shape == (7, 3, 1, 2, 2)
    ids = fools[:, :, 0, 0, 0].long()
    for i in range(7):
        assert i not in ids[i].tolist() and len(set(ids[i].tolist())) == 3
    with pytest.raises(CvError, match="more than 3 victim images"):
        audit._victim_fools(images[:3], "random", 3)
