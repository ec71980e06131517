"""Write Fashion-MNIST test images as 32x32 grey PNGs (28x28 zero-padded by 2, as cvconvert trains on them).

    python scripts/fmnist_samples.py out/demo-images --count 8            # images 0..7
    python scripts/fmnist_samples.py out/demo-fools --count 32 --offset 5000

Names are NNNNN_<class>.png so predictions can be checked by eye. Needs numpy and Pillow only.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]


def read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    return np.frombuffer(data, dtype=np.uint8, offset=offset)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--offset", type=int, default=0, help="index of the first test image")
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
        img = np.pad(images[i], 2)  # zero border, as cvconvert.data pads 28x28 -> 32x32
        Image.fromarray(img, mode="L").save(args.out / f"{i:05d}_{CLASSES[labels[i]]}.png")
    print(f"wrote {args.count} images to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
