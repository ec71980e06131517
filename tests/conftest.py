import os

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
