"""The device package is torch-free by layout: importing every module of cvconvert.device loads no torch."""

import pkgutil
import subprocess
import sys

import cvconvert.device


def test_every_device_module_imports_without_torch():
    names = sorted(m.name for m in pkgutil.iter_modules(cvconvert.device.__path__, "cvconvert.device."))
    assert {"cvconvert.device.pipeline", "cvconvert.device.fools", "cvconvert.device.guard"} <= set(names)
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'fastapi', 'uvicorn'))\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the device package loaded {out.stdout.strip()}"
