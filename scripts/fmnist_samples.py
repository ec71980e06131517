"""Write Fashion-MNIST test images as 32x32 grey PNGs (28x28 zero-padded by 2, as cvconvert trains on them).

    python scripts/fmnist_samples.py out/demo-images --count 8            # images 0..7
    python scripts/fmnist_samples.py out/demo-private --count 64 --offset 5000 --private

--private stands in for a device's own photos in the demo: each picture is a test image moved by a random
shift, flipped at random, with random contrast and brightness and light noise (all from os.urandom), so
it is no picture of the public data set, which the cloud may hold. A real device uses its own pictures.

Names are NNNNN_<class>.png so predictions can be checked by eye. Needs numpy and Pillow only.
"""

from __future__ import annotations

import argparse
import gzip
import secrets
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]


def read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    return np.frombuffer(data, dtype=np.uint8, offset=offset)


def private(img: np.ndarray) -> np.ndarray:
    """A randomly altered copy of a 28x28 picture (CSPRNG): shifted by up to 3 pixels, maybe mirrored,
    contrast x0.8-1.2, brightness +-20, noise +-6."""
    rand = secrets.SystemRandom()
    out = np.roll(img.astype(np.float32), (rand.randint(-3, 3), rand.randint(-3, 3)), axis=(0, 1))
    if rand.random() < 0.5:
        out = out[:, ::-1]
    out = out * rand.uniform(0.8, 1.2) + rand.uniform(-20, 20) * (out > 0)
    noise = np.frombuffer(secrets.token_bytes(out.size), np.uint8).reshape(out.shape) % 13
    return np.clip(out + noise - 6.0 * (out > 0), 0, 255).astype(np.uint8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--offset", type=int, default=0, help="index of the first test image")
    ap.add_argument("--private", action="store_true", help="randomly altered copies (device-private stand-ins)")
    ap.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    args = ap.parse_args()
    try:
        images = read_idx(args.data_dir / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = read_idx(args.data_dir / "t10k-labels-idx1-ubyte.gz", 8)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read Fashion-MNIST from {args.data_dir}: {exc}", file=sys.stderr)
        return 2
    if not (0 <= args.offset and args.count >= 1 and args.offset + args.count <= len(images)):
        print(f"error: --offset/--count outside the {len(images)} test images", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for i in range(args.offset, args.offset + args.count):
        img = np.pad(private(images[i]) if args.private else images[i], 2)  # zero border, as training pads
        Image.fromarray(img, mode="L").save(args.out / f"{i:05d}_{CLASSES[labels[i]]}.png")
    print(f"wrote {args.count} images to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
