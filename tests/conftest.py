import os
import shutil
from pathlib import Path

import numpy as np
import pytest

# OpenMP threads that wait by sleeping, not spinning. Read once, when torch loads libgomp, so it is set before
# `import torch` (and server subprocesses inherit it). On a busy 2-core machine a spinning thread burns the
# core its descheduled partner needs at every parallel region: tests/test_convert.py took 151 s wall (44 s
# CPU) against 56 s (15 s CPU) with this, beside three busy processes (the whole suite: issue 21, item 6).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

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


@pytest.fixture(scope="session")
def _lenet3_session(tmp_path_factory):
    """The same LeNet with P = 3 parts (orthogonal [N, 3, 3] keys), converted and exported once (about 5 s)."""
    from cvconvert.build import convert_to_dir
    from cvconvert.export import export_model_dir

    root = tmp_path_factory.mktemp("lenet3-session")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        convert_to_dir("lenet", root / "lenet3", data="fashion-mnist", parts=3)
        export_model_dir(root / "lenet3")
    return root / "lenet3"


@pytest.fixture
def lenet3_exported(_lenet3_session, tmp_path) -> Path:
    """A test's own copy of the session's exported P = 3 LeNet, as tmp_path/lenet3."""
    return Path(shutil.copytree(_lenet3_session, tmp_path / "lenet3"))


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
