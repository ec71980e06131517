import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

# Two cores in CI: keep torch from oversubscribing them when pytest runs test modules that spawn work.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _private_device_state(tmp_path_factory, monkeypatch):
    """Each test gets its own device state (the near-duplicate guard's index), never the user's."""
    monkeypatch.setenv("CVCONVERT_STATE_DIR", str(tmp_path_factory.mktemp("device-state")))


# --- one exported LeNet for the whole session -------------------------------------------------------------------

@pytest.fixture(scope="session")
def _lenet_session(tmp_path_factory):
    """Converted and exported once per session (about 11 s): the demo's model, a complex LeNet for
    Fashion-MNIST (1x32x32, the paper split), as `lenet/`, with its Triton repository as `repo/`.
    Tests never touch this copy; they take `lenet_exported` (their module's own copy)."""
    from cvconvert.build import convert_to_dir
    from cvconvert.export import export_model_dir

    root = tmp_path_factory.mktemp("lenet-session")
    with torch.random.fork_rng(devices=[]):  # the same weights whichever test asks first
        torch.manual_seed(0)
        convert_to_dir("lenet", root / "lenet", data="fashion-mnist")
        export_model_dir(root / "lenet", triton_repo=root / "repo")
    return root


@pytest.fixture(scope="module")
def lenet_exported(_lenet_session, tmp_path_factory) -> Path:
    """A module's own copy of the session's exported LeNet (a folder holding `lenet/` and `repo/`), so a
    test that writes into the model dir (a re-export, a tampered graph, a cache) cannot reach another
    module's tests."""
    root = tmp_path_factory.mktemp("lenet")
    shutil.copytree(_lenet_session, root, dirs_exist_ok=True)
    return root


# --- helpers the test modules share (from conftest import ...) -------------------------------------------------

def invoke(*args, check: bool = False):
    """`cvconvert ARGS...` in-process (arguments may be paths or numbers); check: it must succeed."""
    from typer.testing import CliRunner

    from cvconvert.cli.main import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    if check:
        assert res.exit_code == 0, res.stderr + res.stdout
    return res


def one_line_error(res, *fragments, code: int | None = None) -> str:
    """The CLI's error contract: non-zero exit (or exactly CODE), no traceback, one `error:` line that is
    the last line of stderr and names every fragment. Returns that line."""
    assert res.exit_code != 0 if code is None else res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = res.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]


def png(path: Path, seed: int = 0, size=(32, 32), mode: str = "L", *, smooth: bool = False, color=None) -> Path:
    """Write a test image: uniform noise from SEED (the default), a smooth sine pattern from SEED (smooth:
    unlike each other and far apart for the near-duplicate guard), or one flat COLOR."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if color is not None:
        img = Image.new(mode, size, color)
    elif smooth:
        yy, xx = np.mgrid[0:size[1], 0:size[0]] / (np.array(size[::-1]) - 1.0)[:, None, None]
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * (rng.uniform(0.5, 3) * xx + rng.uniform(0.5, 3) * yy + rng.uniform()))
        img = Image.fromarray((wave * 255).astype(np.uint8), "L").convert(mode)
    else:
        shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
    img.save(path)
    return path
