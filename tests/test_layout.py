"""The layout: one installed import name, imports that run one way (the zoo into cvconvert), registries that
warn on a name registered twice, and documentation whose links resolve."""

import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
# Pages other branches write (key law, device faults, cross-query privacy); a link to them may dangle until
# those branches land.
PENDING_PAGES = {"docs/keys.md", "docs/device.md", "docs/privacy.md"}


def test_the_wheel_installs_one_import_package_with_every_source_file(tmp_path):
    """What `pip install .` copies (setuptools' build_py, from pyproject's package list): one top-level
    name, `cvconvert`, holding cli/ and zoo/ as cvconvert.cli and cvconvert.zoo, and every source module
    (a package left off the list would be missing from the install)."""
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py", "-d",
                    str(tmp_path)], cwd=ROOT, check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cvconvert"]
    built = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.py")}
    source = set()
    for folder, prefix in (("cvconvert", "cvconvert"), ("cli", "cvconvert/cli"), ("zoo", "cvconvert/zoo")):
        source |= {f"{prefix}/{p.relative_to(ROOT / folder).as_posix()}" for p in (ROOT / folder).rglob("*.py")}
    assert source - built == set(), "modules missing from the wheel: add their package to pyproject.toml"


def test_imports_run_one_way_and_the_zoo_loads_on_first_lookup():
    """Nothing in cvconvert imports the zoo at import time; the architecture registry loads it on the first
    lookup (the one place), and the zoo imports only cvconvert's registry, converter and errors."""
    code = ("import sys, cvconvert.model, cvconvert.build, cvconvert.convert, cvconvert.cli.main, cvconvert.archs\n"
            "zoo = lambda: sorted(m for m in sys.modules if m.startswith(('zoo', 'cvconvert.zoo')))\n"
            "print(zoo()); cvconvert.archs.get_entry('lenet'); print(zoo())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    before, after = out.strip().splitlines()
    assert before == "[]" and "'cvconvert.zoo.resnet_cifar'" in after
    finders = [p.relative_to(ROOT).as_posix() for folder in ("cvconvert", "cli")
               for p in (ROOT / folder).rglob("*.py") if re.search(r"cvconvert\.zoo|import zoo", p.read_text())]
    assert finders == ["cvconvert/archs.py"]
    for p in (ROOT / "zoo").glob("*.py"):
        used = set(re.findall(r"^from (cvconvert[\w.]*) import", p.read_text(), re.M))
        assert used <= {"cvconvert.archs", "cvconvert.convert", "cvconvert.errors"}, (p.name, used)


def test_a_name_registered_twice_warns(monkeypatch):
    from cvconvert import archs, convert, datasets
    from cvconvert.attacks import stages

    archs.list_models()  # load the zoo first: loaded inside the test, it would fill only the copy below
    monkeypatch.setattr(archs, "_REGISTRY", dict(archs._REGISTRY))
    monkeypatch.setattr(datasets, "DATASETS", dict(datasets.DATASETS))
    monkeypatch.setattr(convert, "DEFAULT_MAPPING", dict(convert.DEFAULT_MAPPING))

    class A(nn.Module):
        pass

    class B(nn.Module):
        pass

    def arch(num_classes=10, input_shape=(1, 32, 32)):
        """a test architecture"""

    def arch2(num_classes=10, input_shape=(1, 32, 32)):
        """another"""

    fm = datasets.DATASETS["fashion-mnist"]
    cases = [  # (first registration, the same name again, the name the warning gives)
        (lambda: archs.register_model(splits={}, name="mine")(arch),
         lambda: archs.register_model(splits={}, name="mine")(arch2), "architecture 'mine'"),
        (lambda: datasets.register_dataset("toy", fm), lambda: datasets.register_dataset("toy", datasets.DATASETS["cifar10"]),
         "data set 'toy'"),
        (lambda: convert.register_complex(A, B), lambda: convert.register_complex(A, nn.Identity),
         "complex mapping for 'A'"),
    ]
    for first, again, name in cases:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            first()
            assert not seen, [str(w.message) for w in seen]
            again()
        assert len(seen) == 1 and name in str(seen[0].message) and "registered twice" in str(seen[0].message)
    assert archs.get_entry("mine").fn is arch2  # the later entry wins, as in timm

    from cvconvert.attacks.registry import PROPERTY_ATTACKS, check_ids
    with pytest.warns(UserWarning, match="attack 'knn1' registered twice"):
        check_ids(PROPERTY_ATTACKS, [("knn1", "another 1-NN", "feature", None)])

    # The audit keeps its fitted attacks by id: a second attack with an id already taken warns.
    class Fake:
        id, label, history, limit, stage = "same", "fake", {}, None, "angle"

        def fit(self, pub):
            return self

        def estimate(self, x):
            return x

    monkeypatch.setattr(stages, "ANGLE_ATTACKS", (lambda run: Fake(), lambda run: Fake()))
    import torch
    run = SimpleNamespace(public=None, R={"history": {}, "tables": {}}, x_ev=torch.zeros(3), theta_ev=torch.zeros(3),
                          angle={}, clock=SimpleNamespace(lap=lambda stage: None))
    with pytest.warns(UserWarning, match="angle attack 'same' registered twice"):
        stages.angles(run)


def _links(page: Path):
    """(path, anchor) of every relative link; a bare #anchor is a link into PAGE itself."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links inside code blocks are not links
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:", target):
            path, _, anchor = target.partition("#")
            yield path or page.name, anchor


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but - and _ dropped, spaces as -."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked, missing = 0, []
    for page in pages:
        for target, anchor in _links(page):
            path = (page.parent / target).resolve()
            rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
            checked += 1
            if not path.exists():
                if rel not in PENDING_PAGES:
                    missing.append(f"{page.relative_to(ROOT)} -> {target}")
            elif anchor and anchor not in _anchors(path):
                missing.append(f"{page.relative_to(ROOT)} -> {target}#{anchor}")
    assert checked > 20 and missing == []
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
