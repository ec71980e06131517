"""Training and evaluation of a model directory, on one process or under torchrun.

Every variant trains on the task loss (cross-entropy, or BCE for multi-label data). The complex variant
adds its phase-hiding defense (cvconvert/defense.py): ``exchange`` by default, ``paper`` for the paper's
WGAN-GP of Eqs. 8-9, ``symmetric``. Every defense goes through the same two calls per step
(``update`` for its own critic, ``extra_loss`` for the term added to the task loss), so the training
step does not know which one it runs. Each image's fool is another image of the batch, picked by the
fool rule (cvconvert/fools.py: ``match`` by default, ``random`` for the paper). Without an explicit
choice a model keeps the defense and the fool rule it was trained with before, so a resumed or
continued run never switches.

Files (rank 0 only, all written atomically): DIR/checkpoints/last.pt (model, optimizers, epoch, RNG
state, metrics; for --resume), DIR/model.pt (the best weights by validation error, so load_model and
export see them), DIR/metrics.jsonl (one line per epoch), the manifest's ``history``.

Distributed: under torchrun (WORLD_SIZE > 1) each process takes a DistributedSampler shard of the
batches (--batch-size is per process) and gradients of the model and the critic are averaged with one
all-reduce per step (cvconvert/dist.py); buffers (batch-norm running statistics) are broadcast from
rank 0 after each step as DDP does.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .datasets import dataset_info
from .defense import make_defense
from .dist import Dist, device_kind, pick_device
from .errors import CvError
from .device.artifacts import upgraded
from .device.keylaws import law_of
from .device.fools import check_rule, match_law
from .parts import fool_indices
from .checkpoints import load_checkpoint, restore, rng_state
from .progress import Reporter, fmt
from .modeldir import (MANIFEST, WEIGHTS, atomic_json, atomic_torch_save, atomic_write, load_model,
                       read_manifest)
from .device.preprocess import spec_for

CHECKPOINT = Path("checkpoints") / "last.pt"
METRICS = "metrics.jsonl"
DEFAULT_DEFENSE = "exchange"  # measured in docs/results.md: the angle stays at the pi/4 floor
DEFAULT_FOOL_RULE = "match"   # measured in docs/results.md: raises the attacker's reconstruction error


@dataclass
class TrainConfig:
    data: str | None = None
    data_dir: str | None = None
    task: str | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    device: str = "auto"
    seed: int = 0
    workers: int = 0
    max_steps: int | None = None
    resume: bool = False
    k: int | None = None
    gan_weight: float = 0.01
    critic_steps: int = 1
    critic_lr: float | None = None
    gp_weight: float = 10.0
    gan_every: int = 1
    gan_batch: int | None = None  # None: the whole batch
    defense: str | None = None  # paper | exchange | symmetric; None: the model's own, else exchange
    defense_weight: float = 0.1
    fool_rule: str | None = None  # random | match; None: the model's own, else match (complex models)
    val_fraction: float = 0.05
    train_limit: int | None = None
    log_every: int = 50


# --- data and model checks -----------------------------------------------------------------------------

def data_for(manifest: dict, data: str | None, task: str | None):
    """The data set name/task to use (default: the manifest's) and its DatasetInfo, checked against the model."""
    mdata = manifest.get("data") or {}
    name = data or mdata.get("name") or "fashion-mnist"
    if task is None:  # the task the model was converted for, when it is this data set's
        task = "coarse" if name == "fashion-mnist" == mdata.get("name") and mdata.get("task") == "coarse" else "fine"
    info = dataset_info(name, task)
    shape, classes = list(manifest["input_shape"]), manifest["num_classes"]
    if list(info.input_shape) != shape:
        raise CvError(f"the model takes input {shape} but {name} images are {list(info.input_shape)}: "
                      f"convert it with --data {name}")
    if info.num_classes != classes:
        raise CvError(f"the model has {classes} classes but {name} (task {info.task}) has {info.num_classes}: "
                      f"convert it with --data {name}" + (" --task coarse" if info.task == "coarse" else ""))
    return name, task, info


def _check_config(cfg: TrainConfig) -> None:
    if cfg.epochs < 1 and cfg.max_steps is None:
        raise CvError("--epochs must be at least 1")
    if cfg.batch_size < 1 or cfg.lr <= 0 or cfg.critic_steps < 1 or cfg.gan_every < 1:
        raise CvError("--batch-size, --lr, --critic-steps and --gan-every must be positive")
    if cfg.k is not None and cfg.k < 2:
        raise CvError("--k must be at least 2")


def choose_defense(cfg: TrainConfig, manifest: dict) -> str | None:
    """--defense, else the one the model was trained with, else exchange; None for a real variant, and for
    "none" (the task loss alone: the experiments' undefended baseline)."""
    if cfg.defense == "none":
        return None
    if manifest["variant"] != "complex":
        if cfg.defense not in (None, "paper"):  # "paper" on a real variant: task loss only, as always
            raise CvError(f"--defense {cfg.defense} needs a complex model (this one is {manifest['variant']!r})")
        return None
    law = law_of(manifest)
    if law.of_angle is None:  # the defenses hide the angle; a Haar key already makes every row equally likely
        if cfg.defense is not None:
            raise CvError(f"--defense {cfg.defense} is about the angle of a two-part key; this model's key law "
                          f"({law.name}, {manifest.get('parts', 2)} parts) is its defense")
        return None
    return cfg.defense or (manifest.get("defense") or {}).get("name") or DEFAULT_DEFENSE


def choose_fool_rule(cfg: TrainConfig, manifest: dict) -> str:
    """--fool-rule, else the model's own (a trained model without the key used random), else match."""
    complex_ = manifest["variant"] == "complex"
    if cfg.fool_rule is not None:
        rule = check_rule(cfg.fool_rule)
    elif manifest.get("fool_rule") or manifest.get("history") or not complex_:
        rule = check_rule(manifest.get("fool_rule") or "random")
    else:
        rule = DEFAULT_FOOL_RULE
    if rule != "random" and not complex_:
        raise CvError(f"--fool-rule {rule} needs a complex model (this one is {manifest['variant']!r})")
    return rule


def _defense_options(name: str, cfg: TrainConfig, k: int) -> dict:
    """The CLI's defense options, as the named defense's config fields."""
    if name == "paper":
        return {"weight": cfg.gan_weight, "k": k, "critic_lr": cfg.critic_lr or cfg.lr,
                "critic_steps": cfg.critic_steps, "gp_weight": cfg.gp_weight, "every": cfg.gan_every,
                "batch": cfg.gan_batch}
    return {"weight": cfg.defense_weight}


def _loss_fn(multilabel: bool):
    if multilabel:
        return lambda logits, y: F.binary_cross_entropy_with_logits(logits, y)
    return lambda logits, y: F.cross_entropy(logits, y)


def _errors(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> tuple[float, int]:
    """(number of errors, number of predictions): per attribute for multi-label data."""
    if multilabel:
        return float(((logits > 0).float() != y).sum()), y.numel()
    return float((logits.argmax(1) != y).sum()), y.shape[0]


# --- the step ----------------------------------------------------------------------------------------------

class SplitTrainer:
    """One optimiser step of a SplitModel: task loss plus the complex variant's defense."""

    def __init__(self, model, manifest, cfg: TrainConfig, device, dist: Dist, multilabel: bool,
                 fool_index: Callable | None = None):
        """fool_index: a hook image batch -> each sample's fool index, in place of the fool rule's draw
        (experiments/ studies rules the product does not ship)."""
        self.model, self.manifest, self.cfg, self.device, self.dist = model, manifest, cfg, device, dist
        self.fool_hook = fool_index
        self.multilabel = multilabel
        self.loss_fn = _loss_fn(multilabel)
        self.k = int(cfg.k or manifest.get("k") or 8)
        # the critic belongs to the defense (or, for real variants, is never trained): not the model's optimiser
        critic_ids = {id(p) for p in model.discriminator.parameters()} if model.discriminator is not None else set()
        self.model_params = [p for p in model.parameters() if id(p) not in critic_ids]
        self.opt = torch.optim.Adam(self.model_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.fool_rule = choose_fool_rule(cfg, manifest)
        self.defense = None
        name = choose_defense(cfg, manifest)
        if name is not None:
            self.defense = make_defense(name, model, _defense_options(name, cfg, self.k), dist).to(device)
            if dist.enabled and not self.defense.distributed:
                raise CvError(f"--defense {name} keeps a per-process critic: run it without torchrun")
        self.step = 0

    def _task(self, image):
        """Logits, and for the complex variant the real features a and their fooling counterparts b."""
        m = self.model
        if not m.is_complex:
            return m(image), None, None, None
        a = m.encoder.features(image)
        b = a[self._fool_index(image)]  # [N, P-1, ...]: P-1 distinct fools per image
        key = m.random_key(a.shape[0], a.device)  # by the model's key law (a defense may set it)
        x = m.encoder.combine(a, b, key)
        # the defenses are about the angle (two parts): they see the one fool's feature b [N, ...]
        return m.decoder(m.processing(x), key), a, b[:, 0], x

    def _fool_index(self, image) -> torch.Tensor:
        """Which sample of the batch is each sample's fool: a derangement, or drawn by the match law.
        P parts: [N, P-1] distinct fools per sample, never the sample itself."""
        n, law = image.shape[0], None
        if self.fool_hook is not None:
            return self.fool_hook(image).reshape(n, -1)  # [N] (one fool each) or [N, P-1]
        if self.fool_rule != "random" and n >= 2:
            law = torch.from_numpy(match_law(image.detach().flatten(1).cpu().numpy())).float()
        return fool_indices(n, self.model.parts - 1, law, image.device)

    def train_step(self, image, y) -> dict:
        logits, a, b, x = self._task(image)
        task_loss = self.loss_fn(logits, y)
        loss, stats = task_loss, {}
        if self.defense is not None:
            stats.update(self.defense.update(a, b, x, self.step))
            d_loss, d_stats = self.defense.extra_loss(a, b, x, self.step)
            loss = loss + d_loss
            stats.update(d_stats)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        err, n = _errors(logits.detach(), y, self.multilabel)
        extra = self.dist.average_grads(self.model_params, torch.stack(
            [task_loss.detach(), loss.detach(), torch.tensor(err / n, device=loss.device)]))
        if not all(math.isfinite(float(v)) for v in extra):
            raise _NonFinite(self.step)
        self.opt.step()
        self.dist.broadcast_buffers(self.model)
        self.step += 1
        stats.update(loss=float(extra[1]), task_loss=float(extra[0]), error=float(extra[2]))
        return stats


class _NonFinite(Exception):
    def __init__(self, step):
        self.step = step


@torch.no_grad()
def evaluate_error(model, loader, device, multilabel: bool, limit: int | None = None, progress=None) -> dict:
    """Classification error with the right key (the complex model's forward draws theta and decodes with it)."""
    model.eval()
    errs = preds = seen = 0
    loss_fn = _loss_fn(multilabel)
    loss_sum = 0.0
    for image, y, _ in loader:
        image, y = image.to(device), y.to(device)
        logits = model(image)
        e, n = _errors(logits, y, multilabel)
        errs, preds, seen = errs + e, preds + n, seen + image.shape[0]
        loss_sum += float(loss_fn(logits, y)) * image.shape[0]
        if progress is not None:
            progress(image.shape[0])
        if limit is not None and seen >= limit:
            break
    return {"error": errs / max(preds, 1), "loss": loss_sum / max(seen, 1), "n": seen}


# --- data, checkpoints, progress ---------------------------------------------------------------------------

def _split_train_val(dataset, fraction: float, seed: int):
    from torch.utils.data import Subset

    n = len(dataset)
    n_val = int(round(n * fraction)) if fraction > 0 else 0
    if n_val == 0 or n_val >= n:
        return dataset, None
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    return Subset(dataset, perm[n_val:]), Subset(dataset, perm[:n_val])


@dataclass
class _Data:
    train_set: object
    loader: object
    sampler: object
    order: torch.Generator  # the loader's shuffle generator, re-seeded per epoch
    val_loader: object


def _load_data(name: str, task: str, cfg: TrainConfig, dist: Dist, device, train_set=None) -> _Data:
    """The training split (a seeded subset with --train-limit), its held-out part and their loaders.
    train_set: a dataset of (image, target, prop) to use in place of the named one's training split."""
    from torch.utils.data import DataLoader, Subset
    from torch.utils.data.distributed import DistributedSampler

    from .data import get_dataset

    full = get_dataset(name, True, cfg.data_dir, task) if train_set is None else train_set
    if len(full) == 0:
        raise CvError(f"{name} training set is empty")
    if cfg.train_limit is not None and cfg.train_limit < len(full):  # a seeded random subset (benchmarks)
        keep = torch.randperm(len(full), generator=torch.Generator().manual_seed(cfg.seed + 1))[:cfg.train_limit]
        full = Subset(full, sorted(keep.tolist()))
    train_set, val_set = _split_train_val(full, cfg.val_fraction, cfg.seed)
    sampler = DistributedSampler(train_set, dist.world, dist.rank, shuffle=True, seed=cfg.seed) \
        if dist.enabled else None
    order = torch.Generator()
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=cfg.workers, drop_last=len(train_set) > cfg.batch_size * dist.world,
                        generator=order, pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0)
    val_loader = DataLoader(val_set, batch_size=max(cfg.batch_size, 256), num_workers=cfg.workers) \
        if val_set is not None else None
    if len(loader) == 0:
        raise CvError(f"{name}: fewer training images ({len(train_set)}) than one batch")
    return _Data(train_set, loader, sampler, order, val_loader)


# --- the run -------------------------------------------------------------------------------------------------

Callback = Callable[[SplitTrainer, dict], None]


@dataclass
class _Run:
    """What one `train` call works on, shared by its epoch and save steps."""

    model_dir: Path
    cfg: TrainConfig
    device: torch.device
    dist: Dist
    manifest: dict
    name: str
    task: str
    multilabel: bool
    trainer: SplitTrainer
    data: _Data
    rep: Reporter
    records: list
    best: dict | None
    last_good: Path


def train(model_dir, cfg: TrainConfig, log=True, callbacks: Sequence[Callback] = (), *, train_set=None,
          fool_index: Callable | None = None) -> dict:
    """Train DIR in place; returns the run summary (also in the manifest's history).

    Each callback is called on every process at the end of each epoch, after rank 0 saved it, with
    the trainer (its model holds the weights) and the epoch's metrics record. train_set and fool_index
    are hooks for experiments/: a dataset of (image, target, prop) in place of the data set's training
    split, and SplitTrainer's fool hook."""
    model_dir = Path(model_dir)
    read_manifest(model_dir)  # one-line errors for a missing / foreign dir before anything starts
    pick_device(cfg.device)  # fails before any process group is set up
    dist = Dist(device_kind(cfg.device))
    try:
        return _train(model_dir, cfg, pick_device(cfg.device, dist.local_rank), dist, log, callbacks,
                      {"train_set": train_set, "fool_index": fool_index})
    finally:
        dist.close()


def _train(model_dir: Path, cfg: TrainConfig, device, dist: Dist, log: bool, callbacks, hooks: dict) -> dict:
    _check_config(cfg)
    model, manifest = load_model(model_dir)
    name, task, info = data_for(manifest, cfg.data, cfg.task)
    ckpt_path = model_dir / CHECKPOINT
    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    data = _load_data(name, task, cfg, dist, device, hooks["train_set"])
    model.to(device)
    # a critic's init draws from the seed
    trainer = SplitTrainer(model, manifest, cfg, device, dist, info.multilabel, hooks["fool_index"])
    start_epoch, records, best = restore(trainer, ckpt, ckpt_path, cfg, device) if ckpt else (1, [], None)
    run = _Run(model_dir, cfg, device, dist, manifest, name, task, info.multilabel, trainer, data,
               Reporter(log and dist.main), records, best,
               ckpt_path if ckpt_path.exists() else model_dir / WEIGHTS)
    run.rep.log(f"training {manifest['variant']} {manifest['arch']} on {name} ({len(data.train_set)} images, "
                f"{dist.world} process{'es' if dist.world > 1 else ''}, {device.type}) from epoch {start_epoch}"
                + (trainer.defense.describe() if trainer.defense is not None else "")
                + (f", fool rule {trainer.fool_rule}" if trainer.fool_rule != "random" else ""))
    run_start, stopped = time.time(), None
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            rec, stopped = _run_epoch(run, epoch)
            _end_epoch(run, rec)
            for cb in callbacks:
                cb(trainer, rec)
            if stopped:
                break
    finally:
        run.rep.close()
    return {"epochs": run.records[-1]["epoch"] if run.records else start_epoch - 1, "steps": trainer.step,
            "best": run.best, "time_s": round(time.time() - run_start, 2), "stopped": stopped,
            "world_size": dist.world}


def _run_epoch(run: _Run, epoch: int) -> tuple[dict, str | None]:
    """One pass over the training shard; returns the epoch's record and why it stopped early (or None)."""
    cfg, trainer, data = run.cfg, run.trainer, run.data
    if data.sampler is not None:
        data.sampler.set_epoch(epoch)
    data.order.manual_seed(cfg.seed * 100003 + epoch)  # same order on resume
    trainer.model.train()
    steps = len(data.loader)
    run.rep.epoch(epoch, cfg.epochs, steps)
    t0, sums, count, stopped = time.time(), {}, 0, None
    every = max(1, min(cfg.log_every, steps // 5 or 1))
    for i, (image, y, _) in enumerate(data.loader):
        image, y = image.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        try:
            stats = trainer.train_step(image, y)
        except _NonFinite as nf:
            raise CvError(f"the loss became NaN/inf at epoch {epoch}, step {nf.step} (try a lower --lr); "
                          f"stopped, the last good weights are kept in {run.last_good}") from None
        count += 1
        for key, v in stats.items():
            sums[key] = sums.get(key, 0.0) + v
        run.rep.step(fmt(stats), f"epoch {epoch} step {i + 1}/{steps} {fmt(stats)}" if (i + 1) % every == 0 else None)
        if cfg.max_steps is not None and trainer.step >= cfg.max_steps:
            stopped = "max_steps"
            break
    train_time = time.time() - t0
    rec = {"epoch": epoch, "steps": count, "global_step": trainer.step, "time_s": round(train_time, 3),
           "images_per_s": round(count * cfg.batch_size * run.dist.world / max(train_time, 1e-9), 1)}
    rec.update({f"train_{k}": round(v / max(count, 1), 6) for k, v in sums.items()})
    if stopped:
        rec["partial"] = True
    return rec, stopped


def _end_epoch(run: _Run, rec: dict) -> None:
    """Validate (rank 0), track the best epoch, save and log it; then wait for every process."""
    if run.dist.main and run.data.val_loader is not None:
        val = evaluate_error(run.trainer.model, run.data.val_loader, run.device, run.multilabel)
        rec.update({f"val_{k}": v for k, v in val.items()})
    run.records.append(rec)
    val_err = rec.get("val_error", rec.get("train_error"))
    improved = run.best is None or val_err <= run.best["error"]
    if improved:
        run.best = {"epoch": rec["epoch"], "error": val_err}
    if run.dist.main:
        _save(run, rec["epoch"], improved)
        run.last_good = run.model_dir / CHECKPOINT
        msg = f"epoch {rec['epoch']}/{run.cfg.epochs}: {rec['time_s']:.1f}s, " \
              f"train loss {rec.get('train_loss', 0):.4f}, train error {rec.get('train_error', 0):.4f}"
        if "val_error" in rec:
            msg += f", val error {rec['val_error']:.4f}"
        if "train_wdist" in rec:
            msg += f", W(a,a') {rec['train_wdist']:.3f}"
        run.rep.log(msg + (" (best)" if improved else ""))
    run.dist.barrier()


def _save(run: _Run, epoch: int, improved: bool) -> None:
    """last.pt, then (when best) model.pt, then metrics.jsonl and the manifest: each written atomically."""
    cfg, trainer, records = run.cfg, run.trainer, run.records
    state = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
    ckpt = {"model": state, "optimizer": trainer.opt.state_dict(),
            "defense": trainer.defense.state_dict() if trainer.defense is not None else None,
            "epoch": epoch, "step": trainer.step, "best": run.best, "rng": rng_state(run.device),
            "metrics": json.dumps(records), "epochs_planned": cfg.epochs, "config": json.dumps(asdict(cfg))}
    atomic_torch_save(ckpt, run.model_dir / CHECKPOINT)
    if improved:
        atomic_torch_save(state, run.model_dir / WEIGHTS)

    def write_metrics(tmp):
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    atomic_write(run.model_dir / METRICS, write_metrics)
    current = read_manifest(run.model_dir)
    current["history"] = {
        "data": {"name": run.name, "task": run.task}, "epochs": epoch, "steps": trainer.step, "best": run.best,
        "last": records[-1], "optimizer": {"name": "adam", "lr": cfg.lr, "batch_size": cfg.batch_size},
        "gan": trainer.defense.history() if trainer.defense is not None else None, "seed": cfg.seed}
    # what infer applies to images of the data set's own size: the steps this training used
    current.setdefault("data", {})["preprocess"] = spec_for(run.name, current["input_shape"])
    if cfg.k is not None:
        current["k"] = cfg.k
    if trainer.defense is not None:  # e.g. key_law: exchange, so the device draws the keys it was trained for
        current.update(trainer.defense.manifest_updates())
    if trainer.fool_rule == "random":  # infer and attack pick the fools the way the model was trained
        current.pop("fool_rule", None)
    else:
        current["fool_rule"] = trainer.fool_rule
    atomic_json(upgraded(current), run.model_dir / MANIFEST)  # format 2: the manifest names its key law
