"""`cvconvert eval`: the test error of a model dir, written to DIR/eval.json."""

from __future__ import annotations

import time
from pathlib import Path

from .dist import pick_device
from .modeldir import atomic_json, load_model
from .train import data_for, evaluate_error


def eval_dir(model_dir, data=None, data_dir=None, task=None, batch_size=256, device="auto", workers=0,
             limit=None, log=True) -> dict:
    """Test classification error of DIR; writes DIR/eval.json atomically."""
    from torch.utils.data import DataLoader

    from .data import get_dataset

    model_dir = Path(model_dir)
    dev = pick_device(device)
    model, manifest = load_model(model_dir)
    name, task, info = data_for(manifest, data, task)
    test = get_dataset(name, False, data_dir, task)
    loader = DataLoader(test, batch_size=batch_size, num_workers=workers)
    model.to(dev)
    t0 = time.time()
    res = evaluate_error(model, loader, dev, info.multilabel, limit)
    out = {"data": name, "task": task, "split": "test", "variant": manifest["variant"], "arch": manifest["arch"],
           "error": round(res["error"], 6), "loss": round(res["loss"], 6), "n": res["n"],
           "multilabel": info.multilabel, "time_s": round(time.time() - t0, 2),
           "decoded_with": "the right key (random secret theta per image)" if model.is_complex else None}
    atomic_json(out, model_dir / "eval.json")
    return out
