"""Measure the geometry the query guard decides on (docs/privacy.md, "Thresholds"): principal cosines between
the spans of an image's transmission and of a related one (one-pixel shift, 1-px crop, 3-degree rotation,
JPEG 70, the nearest other test image) or an unrelated one, each with its own fresh fool; exact and
count-sketched; and how often a pool holds a fool that makes the pair symmetric.

    .venv/bin/python experiments/query_geometry.py /tmp/q/lenet --n 300 --pool 2000

Fashion-MNIST test images: images 0..n-1 are the victims, fools come from 5000 on. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cvconvert.attacks.queries import NEAR, lookalikes  # noqa: E402
from cvconvert.device.sketches import sketch  # noqa: E402
from cvconvert.device.pipeline import Pipeline  # noqa: E402
from cvconvert.device.screen import DEFAULT_FLOOR, DEFAULT_MARGIN, History, cosines, orth, unit  # noqa: E402
from guard_threshold import test_images  # noqa: E402


def pair_cosines(a1, b1, a2, b2) -> np.ndarray:
    """[n, 2] principal cosines between span{a1, b1} and span{a2, b2} per row."""
    out = []
    for v1, w1, v2, w2 in zip(a1, b1, a2, b2):
        out.append(cosines(orth(np.stack([v1, w1]))[None], orth(np.stack([v2, w2])))[0])
    return np.array(out)


def pct(v, qs=(1, 5, 50, 95, 99)):
    return {f"p{q}": round(float(np.percentile(v, q)), 3) for q in qs}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--pool", type=int, default=2000)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    pipe = Pipeline.from_model_dir(args.model_dir, guard=None)
    imgs = test_images()
    n = args.n
    victims, fools = imgs[:n], imgs[5000:5000 + 2 * n]
    pool = imgs[5000 + 2 * n:5000 + 2 * n + args.pool]
    feat = lambda x: pipe.features(x).reshape(len(x), -1)  # noqa: E731
    a1, b1, b2 = feat(victims), feat(fools[:n]), feat(fools[n:])
    related = {k: (label, np.stack([f(v) for v in victims])) for k, (label, f) in NEAR.items()}
    related["lookalike"] = ("look-alike (nearest other test image)", imgs[lookalikes(victims, imgs[:5000])])
    related["unrelated"] = ("unrelated image", imgs[n:2 * n])
    pool_sk = sketch(feat(pool))
    out = {}
    for key, (label, other) in related.items():
        a2 = feat(other)
        s = pair_cosines(a1, b1, a2, b2)
        sk = pair_cosines(*(sketch(v) for v in (a1, b1, a2, b2)))
        # the symmetric fix: a pool fool b2' that keeps the pair fine (s_0 < floor or s_0 - s_1 <= margin)
        fixed, flagged = 0, 0
        for i in range(n):
            hist = History(np.zeros((0, pool_sk.shape[1])), np.zeros(0, np.int64), None, DEFAULT_FLOOR, DEFAULT_MARGIN)
            hist.add(sketch(np.stack([a1[i], b1[i]])), 0)
            ska = sketch(a2[i:i + 1])
            if hist.fine(np.concatenate([ska, sketch(b2[i:i + 1])]), 0)[0]:
                continue
            flagged += 1
            fixed += bool(hist.accept(ska, pool_sk, 0, True).any())
        out[key] = {"label": label, "s0": pct(s[:, 0]), "s1": pct(s[:, 1]), "gap": pct(s[:, 0] - s[:, 1]),
                    "sketch_err_s0": pct(np.abs(sk[:, 0] - s[:, 0]), (50, 99)),
                    "sketch_err_s1": pct(np.abs(sk[:, 1] - s[:, 1]), (50, 99)),
                    "image_cos": pct(np.sum(unit(a1) * unit(a2), 1)),
                    "flagged": flagged / n, "fixed_by_pool": fixed / max(flagged, 1)}
        print(key, json.dumps(out[key]), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"n": n, "pool": args.pool, "floor": DEFAULT_FLOOR, "margin": DEFAULT_MARGIN,
                                        "modes": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
