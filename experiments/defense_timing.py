"""Training-step cost of each defense, interleaved so that every variant sees the same machine load.

    .venv/bin/python experiments/defense_timing.py [--steps 20] [--batch-size 64]

One thread; LeNet paper split on Fashion-MNIST-shaped random data (the cost does not depend on the
pixels). Prints the median seconds per step and the ratios to the original variant and to the
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import defense_lib as L  # noqa: E402,F401  (sets one thread)

from cvconvert.build import convert_to_dir  # noqa: E402
from cvconvert.defense import make_defense  # noqa: E402
from cvconvert.modeldir import load_model  # noqa: E402
from cvconvert.defense import gradient_penalty as _gradient_penalty, negatives  # noqa: E402


def stepper(kind: str, tmp: Path):
    convert_to_dir("lenet", tmp / kind, force=True, variant="original" if kind == "original" else "complex")
    m, _ = load_model(tmp / kind)
    m.train()
    d = make_defense(kind, m, {"weight": 1.0}) if kind in ("exchange", "symmetric") else None
    disc = m.discriminator
    params = [p for n, p in m.named_parameters() if not n.startswith("discriminator")]
    opt = torch.optim.Adam(params, lr=1e-3)
    copt = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.9)) if kind == "paper-wgan" else None

    def step(img, y, i):
        if not m.is_complex:
            loss = F.cross_entropy(m(img), y)
        else:
            a = m.encoder.features(img)
            b = a.roll(1, 0)
            key = m.random_key(len(a))
            x = m.encoder.combine(a, b[:, None], key)
            if d is not None:
                d.update(a, b, x)
            loss = F.cross_entropy(m.decoder(m.processing(x), key), y)
            if d is not None:
                loss = loss + d.extra_loss(a, b, x, i)[0]
            if copt is not None:
                s = a.pow(2).mean().sqrt() + 1e-8
                real, fake = a / s, negatives(a, b, 8, i) / s
                r, f = real.detach(), fake.detach()
                dr, df = disc(torch.cat((r, f))).chunk(2)
                c = df.mean() - dr.mean() + 10 * _gradient_penalty(disc, r, f)
                copt.zero_grad()
                c.backward()
                copt.step()
                dr, df = disc(torch.cat((real, fake))).chunk(2)
                loss = loss + 0.1 * (dr.mean() - df.mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


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
