"""Test error of the sweep's model dirs on the whole Fashion-MNIST test set (10,000 images, right key),
added to OUT/defense_sweep.json as test_error_full.

    .venv/bin/python experiments/defense_testerr.py [--out experiments/results] [--models DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import defense_lib as L  # noqa: E402

from cvconvert.data import get_dataset  # noqa: E402
from cvconvert.modeldir import atomic_json, load_model  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--models", default="/tmp/cvconvert-defense-models")
    args = p.parse_args()
    res_file = Path(args.out) / "defense_sweep.json"
    te = get_dataset("fashion-mnist", False)
    images, y = te.images.float() / 255, torch.tensor(te.targets)
    for name in [n for n in json.loads(res_file.read_text()) if not n.startswith("_")]:
        model, _ = load_model(Path(args.models) / name)
        err = L.test_error(model, images, y)
        results = json.loads(res_file.read_text())
        results[name]["test_error_full"] = err
        atomic_json(results, res_file)
        L.log(f"{name}: test error {err:.4f} on {len(y)} images")


if __name__ == "__main__":
    main()
