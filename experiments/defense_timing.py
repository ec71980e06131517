"""Training-step cost of each defense, interleaved so that every variant sees the same machine load.

    .venv/bin/python experiments/defense_timing.py [--steps 20] [--batch-size 64]

One thread; LeNet paper split on Fashion-MNIST-shaped random data (the cost does not depend on the
pixels); each step is cvconvert train's own (SplitTrainer.train_step). Prints the median seconds per step and the ratios to the original variant and to the
complex variant trained without any adversarial term.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import defense_lib as L  # noqa: E402,F401  (sets one thread)

from cvconvert.build import convert_to_dir  # noqa: E402
from cvconvert.dist import Dist  # noqa: E402
from cvconvert.modeldir import load_model  # noqa: E402
from cvconvert.train import SplitTrainer, TrainConfig  # noqa: E402

# variant -> cvconvert train's --defense ("none": the complex model on the task loss alone)
DEFENSE = {"original": None, "complex": "none", "exchange": "exchange", "symmetric": "symmetric", "paper-wgan": "paper"}


def stepper(kind: str, tmp: Path):
    """One optimiser step of `cvconvert train` (SplitTrainer.train_step) for the variant: the product's step,
    defense and fool draw (random: a derangement of the batch)."""
    convert_to_dir("lenet", tmp / kind, force=True, variant="original" if kind == "original" else "complex")
    m, manifest = load_model(tmp / kind)
    m.train()
    cfg = TrainConfig(device="cpu", defense=DEFENSE[kind], defense_weight=1.0, gan_weight=0.1, fool_rule="random")
    trainer = SplitTrainer(m, manifest, cfg, torch.device("cpu"), Dist("cpu"), multilabel=False)
    return lambda img, y, i: trainer.train_step(img, y)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    kinds = ["original", "complex", "exchange", "symmetric", "paper-wgan"]
    with tempfile.TemporaryDirectory() as tmp:
        steps = {k: stepper(k, Path(tmp)) for k in kinds}
        img, y = torch.rand(args.batch_size, 1, 32, 32), torch.randint(0, 10, (args.batch_size,))
        times = {k: [] for k in kinds}
        for i in range(args.steps + 2):
            for k in kinds:
                t0 = time.perf_counter()
                steps[k](img, y, i)
                if i >= 2:  # warm-up
                    times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("| variant | s/step (median) | x original | x complex |")
    print("|---|---|---|---|")
    for k in kinds:
        print(f"| {k} | {med[k]:.4f} | {med[k] / med['original']:.2f} | {med[k] / med['complex']:.2f} |")


if __name__ == "__main__":
    main()
