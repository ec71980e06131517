"""Sweep over P = 2, 3, 4 parts (LeNet paper split and ResNet-20 alpha, Fashion-MNIST), through the CLI only.

Per architecture: the original and the P-part models are converted and trained the same way (same
subset, epochs, batch, lr, seed, fool rule), scored with `cvconvert eval`, exported, timed with
`cvconvert bench` (ONNX Runtime, batch 128, against the trained original) and audited with
`cvconvert attack --baseline ORIGINAL`. Every stage skips what its output file already holds, so an
interrupted sweep resumes. `--stage report` writes the table (markdown) and the plot from the JSON.

    python experiments/parts_sweep.py --arch lenet --stage train
    python experiments/parts_sweep.py --arch lenet --stage attack
    python experiments/parts_sweep.py --stage report
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "parts"
PARTS = (2, 3, 4)
# Training and audit settings per architecture: ResNet-20 gets a short schedule (2 shared CPU cores).
SETUP = {
    "lenet": {"split": "paper", "train": ["--epochs", "3", "--batch-size", "128"],
              "attack": ["--train-size", "2000", "--eval-size", "500"], "eval": []},
    "resnet20": {"split": "alpha", "train": ["--train-limit", "4000", "--epochs", "1", "--batch-size", "64"],
                 "attack": ["--train-size", "600", "--eval-size", "200", "--epochs", "2"], "eval": ["--limit", "2000"]},
}
COMMON_TRAIN = ["--data", "fashion-mnist", "--lr", "1e-3", "--seed", "0", "--device", "cpu", "--fool-rule", "random"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cli(*args, json_out: bool = False):
    """Run `cvconvert ARGS` (python -m cvconvert.cli) from the repository root; parsed JSON stdout when asked."""
    cmd = [sys.executable, "-m", "cvconvert.cli", *map(str, args)]
    log(" ".join(["cvconvert", *map(str, args)]))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out) if json_out else out


def model_dir(work: Path, arch: str, name: str) -> Path:
    return work / f"{arch}-{name}"


def train_one(work: Path, arch: str, name: str, parts: int | None) -> dict:
    """convert -> train -> eval -> export (P-part models) for one model dir; cached in its sweep.json."""
    d, s = model_dir(work, arch, name), SETUP[arch]
    done = d / "sweep.json"
    if done.is_file():
        return json.loads(done.read_text())
    variant = ["--variant", "original"] if parts is None else ["--parts", str(parts)]
    cli("convert", arch, "--split", s["split"], "--data", "fashion-mnist", "-o", d, "--force", *variant)
    t0 = time.time()
    cli("train", d, *COMMON_TRAIN, *s["train"])
    train_s = time.time() - t0
    ev = cli("eval", d, "--data", "fashion-mnist", "--device", "cpu", "--json", *s["eval"], json_out=True)
    if parts is not None:
        cli("export", d)
    rec = {"arch": arch, "name": name, "parts": parts, "train_s": round(train_s, 1), "eval": ev}
    done.write_text(json.dumps(rec, indent=1))
    return rec


def bench_one(work: Path, arch: str, parts: int, repeats: int = 10, redo: bool = False) -> dict:
    d = model_dir(work, arch, f"p{parts}")
    out = d / "bench.json"
    if redo or not out.is_file():
        res = cli("bench", d, "-b", "128", "--engines", "ort", "--repeats", repeats, "--threads", "1",
                  "--baseline", model_dir(work, arch, "original"), "--json", json_out=True)
        out.write_text(json.dumps(res, indent=1))
    return json.loads(out.read_text())


def attack_one(work: Path, arch: str, parts: int, redo: bool = False) -> dict:
    """The row audit (the same attacks at every P, two parts included) against the trained original;
    ``redo``: run it again on the attackers' checkpoints (--resume: trained networks are kept)."""
    d = model_dir(work, arch, f"p{parts}")
    rep = d / "audit" / "report.json"
    if redo or not rep.is_file():
        cli("attack", d, "--rows", "--data", "fashion-mnist", "-o", d / "audit", "--device", "cpu", "--no-multi-query",
            "--baseline", model_dir(work, arch, "original"), *SETUP[arch]["attack"], *(["--resume"] if redo else []))
    return json.loads(rep.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(SETUP), default="lenet")
    p.add_argument("--stage", choices=("train", "bench", "attack", "report"), required=True)
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "parts", help="model dirs (not committed)")
    p.add_argument("--parts", default="2,3,4", help="comma-separated P values")
    p.add_argument("--redo", action="store_true", help="bench: time again; attack: rerun on the attackers' checkpoints")
    p.add_argument("--repeats", type=int, default=10, help="bench: timed calls per configuration")
    a = p.parse_args()
    parts = [int(v) for v in a.parts.split(",")]
    a.work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if a.stage == "report":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from parts_report import write  # noqa: E402  (next to this script)
        write(RESULTS)
        return
    for name, pp in [("original", None)] + [(f"p{q}", q) for q in parts]:
        if a.stage == "train":
            rec = train_one(a.work, a.arch, name, pp)
        elif pp is None:
            continue
        elif a.stage == "bench":
            rec = bench_one(a.work, a.arch, pp, a.repeats, a.redo)
        else:
            rec = attack_one(a.work, a.arch, pp, a.redo)
        (RESULTS / f"{a.arch}-{name}-{a.stage}.json").write_text(json.dumps(rec, indent=1, default=str))
    log("done")


if __name__ == "__main__":
    main()
