"""Measure the near-duplicate guard on real data: false positives on distinct images, what it catches,
and what the span-intersection attack still gets from pairs below the threshold.

    .venv/bin/python experiments/guard_threshold.py out/lx --out experiments/results/guard.json

MODEL_DIR must be exported (onnx/). Fashion-MNIST test images: the first --distinct are sent one after
another (a flag = a false positive); --pairs images get each near-duplicate transform; fools are test
images from index 5000 on, one per transmission, never reused. Torch-free (the device runtime).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cvconvert.device.guard import DEFAULT_THRESHOLD  # noqa: E402
from cvconvert.device.sketches import sketch  # noqa: E402
from cvconvert.device.pipeline import Pipeline  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def test_images() -> np.ndarray:
    with gzip.open(FMNIST / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    return np.pad(raw, ((0, 0), (2, 2), (2, 2)))[:, None].astype(np.float32) / 255


def _jpeg(im: np.ndarray, q: int = 90) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(np.rint(im[0] * 255).astype(np.uint8)).save(buf, "JPEG", quality=q)
    return (np.asarray(Image.open(buf), np.float32) / 255)[None]


def transforms(rng) -> dict:
    def noise(k):
        return lambda x: np.clip(x + rng.choice([-k, k], x.shape).astype(np.float32) / 255, 0, 1)
    return {"pixel noise 1/255": noise(1), "pixel noise 4/255": noise(4),
            "one-pixel shift": lambda x: np.roll(x, 1, -1),
            "JPEG quality 90": lambda x: np.stack([_jpeg(i) for i in x]),
            "brightness +5%": lambda x: np.clip(x * 1.05, 0, 1)}


def sequential_max(sk: np.ndarray) -> np.ndarray:
    """For image i, its largest cosine to any earlier image (what the guard sees when they come in order)."""
    out = np.full(len(sk), -1.0)
    for start in range(1, len(sk), 1000):
        block = sk[start:start + 1000] @ sk[:start + 1000].T
        for r in range(len(block)):
            i = start + r
            out[i] = block[r, :i].max()
    return out


def span_pair(x1: np.ndarray, x2: np.ndarray) -> tuple[float, np.ndarray]:
    """The span-intersection attack on two transmissions: the largest principal cosine between
    span(Re x1, Im x1) and span(Re x2, Im x2), and the recovered shared vector (in span(x1))."""
    q1, _ = np.linalg.qr(x1.reshape(2, -1).T.astype(np.float64))
    q2, _ = np.linalg.qr(x2.reshape(2, -1).T.astype(np.float64))
    u, s, _ = np.linalg.svd(q1.T @ q2)
    return float(s[0]), q1 @ u[:, 0]


def attack_pairs(pipe, a1, a2, fools, mean) -> dict:
    """Send a1 and a2 with fresh fools and keys; what the span attack gets from each pair."""
    n = len(a1)
    k1, k2 = pipe.new_keys(n), pipe.new_keys(n)  # by the model's key law (os.urandom)
    x1 = pipe.combine(a1, fools[:n, None], k1)
    x2 = pipe.combine(a2, fools[n:2 * n, None], k2)
    prin, rec = [], []
    for i in range(n):
        s, v = span_pair(x1[i], x2[i])
        a = a1[i].reshape(-1) - mean  # centred: every feature shares a large common part
        v = v - (v @ mean) / (mean @ mean) * mean
        prin.append(s)
        rec.append(abs(v @ a) / (np.linalg.norm(v) * np.linalg.norm(a) + 1e-12))
    return {"principal_cos_median": float(np.median(prin)), "principal_cos_min": float(np.min(prin)),
            "recovered_centred_cos_median": float(np.median(rec)), "exposed_share": float(np.mean(np.array(prin) >= 0.999))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--distinct", type=int, default=10000)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    pipe = Pipeline.from_model_dir(args.model_dir, provider="cpu", guard=None)
    imgs = test_images()
    feats = np.concatenate([pipe.features(imgs[i:i + 500]) for i in range(0, args.distinct, 500)])
    sk = sketch(feats)
    seq = sequential_max(sk)
    res = {"model_dir": str(args.model_dir), "distinct": args.distinct, "threshold_default": DEFAULT_THRESHOLD,
           "fpr": {str(t): float(np.mean(seq[1:] >= t)) for t in (0.98, 0.99, 0.993, 0.995, 0.997, 0.999)},
           "distinct_nearest_quantiles": dict(zip(("50", "99", "99.9", "max"),
                                                   np.quantile(seq[1:], [0.5, 0.99, 0.999, 1.0]).round(5).tolist()))}
    rng = np.random.default_rng(0)
    base = imgs[:args.pairs]
    a0 = pipe.features(base)
    fools = pipe.features(imgs[5000:5000 + 2 * args.pairs])
    mean = feats.mean(0).reshape(-1)
    res["near_duplicates"] = {}
    for name, tf in transforms(rng).items():
        a1 = pipe.features(tf(base))
        cos = (sketch(a0) * sketch(a1)).sum(1)
        row = {"cos_min": float(cos.min()), "cos_median": float(np.median(cos)),
               "caught_share": float(np.mean(cos >= DEFAULT_THRESHOLD)), **attack_pairs(pipe, a0, a1, fools, mean)}
        below = cos < DEFAULT_THRESHOLD
        if below.any():  # what the attack gets from the pairs the guard lets through
            row["below_threshold"] = attack_pairs(pipe, a0[below], a1[below], fools, mean)
        res["near_duplicates"][name] = row
    near = np.argmax(sk[:args.pairs] @ sk[args.pairs:].T, 1) + args.pairs  # each image's most similar other one
    res["distinct_nearest_pairs"] = attack_pairs(pipe, a0, feats[near], fools, mean)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
