"""The audit: load the model dir (as the attacker sees it) and the baselines, simulate the victim,
run every attack, score them and hand the results to ``report``.

Threat model: the attacker has the public released weights and public images of the same kind (the
attacker's training split, taken from the training set), and sees the victim's transmitted x, every one
of them, across requests. The victim's theta and fooling image are drawn here from the OS's CSPRNG and
are only used to score the attacks (and the utility); they are never printed or written. When the model
dir has exported graphs, the victims' x come from the deployed encoder.onnx through the device runtime;
the attacker's white-box search needs gradients and runs on model.pt.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..datasets import dataset_info
from ..errors import CvError
from ..modeldir import load_model
from ..dist import pick_device
from ..device.fools import choose_fools
from . import stages
from .base import Public
from .budget import BUDGETS, Budget, available_memory, estimate_memory
from .common import batched, combiner
from .data import has_property, load_split, stack_subset
from .fit import Trainer

BASELINE_VARIANTS = ("original", "noisy", "additional")


def _check_target(model, manifest, path) -> None:
    if not model.is_complex:
        raise CvError(f"{path} holds a {manifest['variant']!r} model: the audit attacks a complex model; "
                      f"give original/noisy/additional model dirs with --baseline")


def _load_baseline(path, spec, seen: dict):
    model, manifest = load_model(path)
    if model.spec.variant not in BASELINE_VARIANTS:
        raise CvError(f"baseline {path} is a {model.spec.variant!r} model; baselines must be one of "
                      f"{', '.join(BASELINE_VARIANTS)}")
    if tuple(model.spec.input_shape) != tuple(spec.input_shape):
        raise CvError(f"baseline {path} takes inputs {list(model.spec.input_shape)}, the audited model "
                      f"{list(spec.input_shape)}")
    name = model.spec.variant + (f"(gamma={model.spec.gamma:g})" if model.spec.variant == "noisy" else "")
    seen[name] = seen.get(name, 0) + 1
    if seen[name] > 1:
        name = f"{name}#{seen[name]}"
    return name, model, manifest


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=False)


def run_audit(model_dir, data: str, out, data_dir=None, task: str | None = None, baselines=(),
              budget: Budget | None = None, device: str = "auto", seed: int = 0, resume: bool = False,
              log=lambda msg: None, multi_query: bool = True, rows: bool = False) -> dict:
    t0 = time.time()
    budget = budget or BUDGETS["quick"]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CvError(f"report output {out} exists and is not a directory")
    model, manifest = load_model(model_dir)
    _check_target(model, manifest, model_dir)
    task = task or (manifest.get("data") or {}).get("task") or "fine"
    info = dataset_info(data, task)
    if tuple(info.input_shape) != tuple(model.spec.input_shape):
        raise CvError(f"{data} images are {list(info.input_shape)} but the model takes {list(model.spec.input_shape)}")
    seen: dict = {}
    base = [_load_baseline(p, model.spec, seen) for p in baselines]
    dev = pick_device(device)
    torch.manual_seed(seed)
    tr, ev, need = _data(model, data, data_dir, task, budget, len(base), seed)
    with_prop = has_property(tr["props"]) and has_property(ev["props"])
    log(f"attacker split: {len(tr['images'])} training images; victim split: {len(ev['images'])} test images; "
        f"device {dev}; estimated peak memory {need / 2**30:.2f} GiB")
    if not with_prop:
        log(f"{data} (task {task}) has no hidden-property labels: skipping the property inference attacks")
    ckpt = out / "checkpoints"
    if ckpt.exists() and not resume:
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    meta = {"model": _fingerprint(model_dir), "baselines": [_fingerprint(p) for p in baselines], "data": data,
            "task": task, "budget": asdict(budget), "seed": seed}
    progress = _progress()
    pub = Public(dev, budget, Trainer(ckpt, dev, progress, resume, seed, meta), progress, seed,
                 fool_rule=manifest.get("fool_rule", "random"))
    victim, provenance = deployed_victim(model_dir)
    R: dict = {"tables": {}, "history": {}, "figures": {}}
    rows = rows or model.spec.law.of_angle is None  # the angle audit needs a key law with an angle
    with progress:
        _audit(pub, model, base, tr, ev, with_prop, R, victim, model_dir, multi_query, rows)
    R["meta"] = {"model_dir": str(model_dir), "arch": model.spec.arch, "variant": model.spec.variant,
                 "exported_graphs": provenance["weights_vs_graphs"], "victim_encoder": provenance,
                 "fool_rule": pub.fool_rule, "parts": model.parts, "key_law": model.spec.law.name,
                 "audit": "rows" if rows else "angle",
                 "split": manifest.get("split"), "feature_shape": list(model.feature_shape),
                 "baselines": {name: str(p) for (name, _, _), p in zip(base, baselines)},
                 "data": data, "task": task, "n_attacker_train": len(tr["images"]), "n_eval": len(ev["images"]),
                 "property": bool(with_prop), "budget": asdict(budget), "device": str(dev), "seed": seed,
                 "elapsed_s": round(time.time() - t0, 1), "estimated_memory_gib": round(need / 2**30, 2)}
    return R


def _data(model, data, data_dir, task, budget, n_base: int, seed: int):
    """The attacker's and the victims' images (seeded subsets of the training and test splits), after
    checking that the budget fits in memory."""
    spec = model.spec
    gen = torch.Generator().manual_seed(seed)
    train_ds, test_ds = load_split(data, True, data_dir, task), load_split(data, False, data_dir, task)
    n_tr, n_ev = min(budget.n_train, len(train_ds)), min(budget.n_eval, len(test_ds))
    need = estimate_memory(budget, n_tr, n_ev, spec.input_shape, model.feature_shape, n_base)
    have = available_memory()
    if need > have:
        raise CvError(f"budget {budget.name!r} needs about {need / 2**30:.1f} GiB of memory "
                      f"({n_tr} attacker images, {n_ev} victim images) but {have / 2**30:.1f} GiB is available: "
                      f"lower --train-size/--eval-size or use --budget quick")
    return stack_subset(train_ds, n_tr, gen), stack_subset(test_ds, n_ev, gen), need


def _fingerprint(path) -> str:
    p = Path(path)
    st = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in (p / "model.pt", p / "cvconvert.json")
          if f.exists()]
    return f"{p.resolve()}:{st}"


def _victim_fools(images: torch.Tensor, rule: str, count: int = 1) -> torch.Tensor:
    """The fooling images of each victim image, [N, count, ...]: other victim images, as in the paper, chosen
    by the model's fool rule exactly as the device's simulation rule chooses them (CSPRNG), the image's
    fools all distinct and never the image itself."""
    n = len(images)
    if rule == "match":  # one match draw per fool (a rare repeat is possible, as on the device's batch path)
        return torch.stack([torch.from_numpy(choose_fools(images.numpy(), None, "match")[0]) for _ in range(count)], 1)
    if n <= count:
        raise CvError(f"the audit needs more than {count} victim images for {count} distinct fools each")
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    shifts = 1 + rng.choice(n - 1, size=count, replace=False)  # distinct shifts: distinct fools
    perm = torch.from_numpy(rng.permutation(n))
    out = []
    for shift in shifts:
        fool_idx = torch.empty_like(perm)
        fool_idx[perm] = perm.roll(-int(shift))  # a random derangement: every image gets another image
        out.append(images[fool_idx])
    return torch.stack(out, 1)


def _victim_inputs(model, images: torch.Tensor, rule: str):
    """(fools [N, P-1, ...], secret keys [N, P, P] drawn by the model's key law) for the victims."""
    return _victim_fools(images, rule, model.parts - 1), model.random_key(len(images))


@torch.no_grad()
def _victim(model, images: torch.Tensor, dev, rule: str = "random") -> tuple:
    """The victim's transmitted x (secret key and fooling images from the CSPRNG) and its utility error
    input (logits with the right key), with the torch model (when no graphs are exported)."""
    fool, key = _victim_inputs(model, images, rule)
    enc = lambda i, f, k: model.encoder(i, f, k)  # noqa: E731
    x = batched(enc, images, fool, key, batch_size=256, device=dev)
    logits = batched(lambda xb, k: model.decoder(model.processing(xb), k), x, key, batch_size=256, device=dev)
    return x, key, logits


def deployed_victim(model_dir):
    """(victim function, provenance) that builds the victims' x with the exported encoder.onnx through the
    device runtime (what is deployed), or (None, provenance) when DIR/onnx/ does not exist."""
    from ..device.artifacts import ONNX_DIR, export_provenance, sha256
    from ..device.pipeline import Pipeline

    graph = Path(model_dir) / ONNX_DIR / "encoder.onnx"
    weights = export_provenance(model_dir)
    if not graph.is_file():
        return None, {"source": "model.pt", "graph_sha256": None, "weights_vs_graphs": weights}
    pipe = Pipeline.from_model_dir(model_dir, guard=None)  # refuses graphs modified after export

    def victim(model, images: torch.Tensor, dev, rule: str = "random") -> tuple:
        fool, key = _victim_inputs(model, images, rule)
        x = np.concatenate([pipe.encode(images[i:i + 256].numpy(), fool[i:i + 256].numpy(), key[i:i + 256].numpy())
                            for i in range(0, len(images), 256)])
        logits = np.concatenate([pipe.decode(pipe.process(x[i:i + 256]), key[i:i + 256].numpy())
                                 for i in range(0, len(x), 256)])
        return torch.from_numpy(x), key, torch.from_numpy(logits)
    return victim, {"source": f"{ONNX_DIR}/encoder.onnx", "graph_sha256": sha256(graph), "weights_vs_graphs": weights}


def _audit(pub: Public, model, base, tr, ev, with_prop: bool, R: dict, victim=None, model_dir=None,
           multi_query: bool = True, rows: bool = False):
    """Every stage in turn; each is one loop over its list of attacks (attacks/registry.py). ``rows``: the
    row audit (attacks/parts_stages.py), the only one for key laws without an angle (Haar, any P)."""
    pub.combine, pub.encoder = combiner(model), model.encoder
    R["timings"] = {}
    run = stages.Run(pub, model, base, tr, ev, R, victim or _victim, stages.Clock(R["timings"]))
    if rows:
        from . import parts_stages
        return parts_stages.audit(run, with_prop)
    stages.utility(run)
    stages.angles(run)
    stages.reconstructions(run)
    stages.properties(run, with_prop)
    stages.pictures(run)
    R["tables"]["targets"] = stages.targets(R, base)
    if model_dir is not None:
        stages.multi_query(run, model_dir, multi_query)
    return run
