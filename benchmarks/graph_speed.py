"""Processing-graph speed, complex vs original, in ONNX Runtime CPU (and PyTorch eager), side by side.

    .venv/bin/python benchmarks/graph_speed.py COMPLEX_DIR ORIGINAL_DIR [COMPLEX_DIR ORIGINAL_DIR ...]
        [--batch 128] [--repeats 30] [--threads T] [--level ORT_ENABLE_ALL]

Exports each model with `cvconvert export` (into a temporary copy; DIR/onnx/ is used when present) and
times the pairs round-robin (one call each per round) so that load from other processes hits both.
Prints p50 latencies and the complex/original ratio. Not run by the tests.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--level", default="ORT_ENABLE_ALL")
    args = ap.parse_args()
    import onnxruntime as ort

    from cvconvert.bench import prepare_graphs
    from cvconvert.device.contracts import expected_shapes
    from cvconvert.device.sessions import session_options
    from cvconvert.modeldir import load_model

    if len(args.dirs) % 2:
        ap.error("give COMPLEX_DIR ORIGINAL_DIR pairs")
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, d in enumerate(args.dirs):
            model, manifest = load_model(d)
            path = prepare_graphs(Path(d), model, manifest, Path(tmp) / str(i))[0]["processing"]
            s = ort.InferenceSession(str(path), session_options(args.threads, {"graph_optimization_level": args.level}),
                                     providers=["CPUExecutionProvider"])
            shape = (args.batch,) + expected_shapes(manifest)["x"]
            x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
            sessions[d] = (s, x)
        times = {d: [] for d in sessions}
        for r in range(args.repeats + 3):
            for d, (s, x) in sessions.items():
                t0 = time.perf_counter()
                s.run(None, {"x": x})
                if r >= 3:
                    times[d].append(time.perf_counter() - t0)
    for c, o in zip(args.dirs[::2], args.dirs[1::2]):
        tc, to = np.median(times[c]) * 1e3, np.median(times[o]) * 1e3
        print(f"{c}: {tc:.1f} ms   {o}: {to:.1f} ms   complex/original {tc / to:.2f}x  (batch {args.batch})")


if __name__ == "__main__":
    main()
