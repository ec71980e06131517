"""Cold start of `cvconvert infer` (process start to first prediction) vs a bare ONNX Runtime script
that loads the same three graphs and classifies the same image. Target: within 2x.

    .venv/bin/python benchmarks/cold_start.py DIR [--repeats 7] [--json]

DIR is a complex model dir with DIR/onnx/ (`cvconvert export DIR`). Each repeat starts both as fresh
processes, alternating, and times them until exit (wall clock); medians are reported, together with
`python -c pass` (the interpreter's own start) as the floor. Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE = r"""
import sys, os, json
import numpy as np, onnxruntime as ort
from PIL import Image
d, img = sys.argv[1], sys.argv[2]
m = json.load(open(os.path.join(d, "cvconvert.json")))
s = {p: ort.InferenceSession(os.path.join(d, "onnx", p + ".onnx"), providers=["CPUExecutionProvider"])
     for p in ("encoder", "processing", "decoder")}
c = m["input_shape"][0]
a = np.asarray(Image.open(img).convert("L" if c == 1 else "RGB"), dtype=np.float32) / 255.0
a = (a[None] if c == 1 else a.transpose(2, 0, 1))[None]
t = (np.frombuffer(os.urandom(4), np.uint32).astype(np.float32) / 2**32 * 2 * np.pi)
key = np.array([[[np.cos(t[0]), -np.sin(t[0])], [np.sin(t[0]), np.cos(t[0])]]], np.float32)  # R(theta), P = 2
x = s["encoder"].run(None, {"image": a, "fool": a[:, None, ..., ::-1].copy(), "key": key})[0]
h = s["processing"].run(None, {"x": x})[0]
logits = s["decoder"].run(None, {"h": h, "key": key})[0]
print(int(logits.argmax()))
"""


def timed(cmd) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"error: {' '.join(map(str, cmd[:3]))} ... failed: {res.stderr.strip().splitlines()[-1:]}")
    return dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import numpy as np
    from PIL import Image

    manifest = json.loads((args.model_dir / "cvconvert.json").read_text())
    if not (args.model_dir / "onnx" / "processing.onnx").is_file():
        sys.exit(f"error: {args.model_dir}/onnx/ missing: run `cvconvert export {args.model_dir}` first")
    c, h, w = manifest["input_shape"]
    py = Path(sys.executable)
    cli = py.parent / "cvconvert"
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "sample.png"
        pixels = (np.random.default_rng(0).random((h, w) if c == 1 else (h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(img)
        cases = {"python -c pass": [str(py), "-c", "pass"],
                 "bare onnxruntime script": [str(py), "-c", BARE, str(args.model_dir), str(img)],
                 "cvconvert infer": [str(cli), "infer", str(img), "--model-dir", str(args.model_dir),
                                     "--provider", "cpu", "--json"]}
        for cmd in cases.values():  # page cache warm: we measure start-up, not the disk
            timed(cmd)
        times = {k: [] for k in cases}
        for _ in range(args.repeats):
            for k, cmd in cases.items():
                times[k].append(timed(cmd))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["cvconvert infer"] / med["bare onnxruntime script"]
    if args.json:
        print(json.dumps({"median_s": med, "runs": times, "ratio_infer_over_bare": ratio}, indent=2))
    else:
        for k, v in med.items():
            print(f"{k:28s} {v * 1e3:8.0f} ms (median of {args.repeats})")
        print(f"cvconvert infer / bare script: {ratio:.2f}x (target <= 2x)")


if __name__ == "__main__":
    main()
