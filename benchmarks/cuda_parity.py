"""CUDA execution provider parity: exported graphs on CUDA vs CPU, and vs PyTorch eager on CUDA.

    python benchmarks/cuda_parity.py out/lenet out/lenet-original [--batch 32] [--rtol 0.01]

For each exported model dir: the same images, fools and keys go through the three graphs on the CPU
execution provider and on the CUDA one; each part is compared on identical inputs (so one part's error
does not feed the next), then the whole chain against PyTorch eager on CUDA. Prints JSON (with how
often the predicted classes agree) and exits 1 when a part or the chain differs by more than --rtol of
its output's scale, or a graph did not run on the CUDA provider. Needs onnxruntime-gpu and a GPU; this
is a device check, not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cvconvert.device.pipeline import Pipeline  # noqa: E402


def rel_diff(got: np.ndarray, want: np.ndarray) -> float:
    """Max abs difference over the reference's max abs value (TF32 convs make 1e-3 normal on GPUs)."""
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))


def check_dir(model_dir: Path, batch: int, rtol: float) -> dict:
    import torch

    from cvconvert.modeldir import load_model

    cpu = Pipeline.from_model_dir(model_dir, provider="cpu")
    gpu = Pipeline.from_model_dir(model_dir, provider="cuda")
    rng = np.random.default_rng(0)
    shape = (batch, *cpu.input_shape)
    images = rng.random(shape, dtype=np.float32)
    fools = rng.random((batch, cpu.parts - 1, *cpu.input_shape), dtype=np.float32)
    key = cpu.new_keys(batch) if cpu.complex else None  # stays in this process; only differences are reported
    args = (images, fools, key) if cpu.complex else (images,)
    x = cpu.encode(*args)
    h = cpu.process(x)
    logits = cpu.decode(h, key) if cpu.complex else cpu.decode(h)
    parts = {
        "encoder": rel_diff(gpu.encode(*args), x),
        "processing": rel_diff(gpu.process(x), h),
        "decoder": rel_diff(gpu.decode(h, key) if cpu.complex else gpu.decode(h), logits),
    }
    chain = gpu.predict(images, fools, key) if cpu.complex else gpu.predict(images)
    model, _ = load_model(model_dir)
    model = model.to("cuda").eval()
    with torch.no_grad():
        t = [torch.from_numpy(a).cuda() for a in args]
        eager = model(*t).float().cpu().numpy()
    res = {
        "model_dir": str(model_dir), "variant": cpu.manifest["variant"], "arch": cpu.manifest["arch"],
        "batch": batch, "providers": gpu.providers, "rel_diff_cuda_vs_cpu": parts,
        "rel_diff_chain_cuda_vs_cpu": rel_diff(chain, logits),
        "rel_diff_chain_cuda_vs_torch_cuda": rel_diff(chain, eager),
        "argmax_agree_cuda_vs_cpu": float((chain.argmax(1) == logits.argmax(1)).mean()),
        "argmax_agree_cuda_vs_torch": float((chain.argmax(1) == eager.argmax(1)).mean()),
    }
    worst = max(*parts.values(), res["rel_diff_chain_cuda_vs_cpu"], res["rel_diff_chain_cuda_vs_torch_cuda"])
    res["ok"] = bool(worst <= rtol and set(gpu.providers.values()) == {"CUDAExecutionProvider"})
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dirs", nargs="+", type=Path)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rtol", type=float, default=1e-2, help="max abs diff / max abs value allowed per part")
    a = ap.parse_args()
    results = [check_dir(d, a.batch, a.rtol) for d in a.model_dirs]
    print(json.dumps(results, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
