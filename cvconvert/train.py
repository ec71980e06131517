"""Training and evaluation of a model directory, on one process or under torchrun.

Every variant trains on the task loss (cross-entropy, or BCE for multi-label data). The complex variant
adds the WGAN loss of the paper's Eqs. 8-9: for each sample, b = the feature of another sample of the
batch, theta ~ U(0, 2 pi), and a negative a' = Re[(a + ib) e^{i dtheta}] with dtheta one of the k-1
angles j pi / k (j = 1..k-1, cycled over the batch so every angle is used in every step). The critic D
(``model.discriminator``) is trained to score a above a'; the encoder is trained to close the gap.

WGAN variant (our choice, documented in README): WGAN-GP (Gulrajani et al. 2017) with the penalty on a
subset of the batch (``GP_SAMPLES`` interpolates) to keep the double backward cheap, Adam(0.5, 0.9) for
the critic. Critic and model steps alternate on every ``gan_every``-th batch. ``gan_batch`` plays the
game on only the first n samples of each (shuffled) batch: cheaper (the critic costs about as much per
sample as the generator), but 32 of 128 cost accuracy in our LeNet runs, so the default is the whole
batch (docs/results.md). The critic sees the features
divided by the batch's RMS of a (not detached), so the encoder cannot win the game by shrinking its
features towards zero (the processing part's delta with c = E|f| is scale-free, so nothing else would
stop it).

Files (rank 0 only, all written atomically): DIR/checkpoints/last.pt (model, optimizers, epoch, RNG
state, metrics; for --resume), DIR/model.pt (the best weights by validation error, so load_model and
export see them), DIR/metrics.jsonl (one line per epoch), the manifest's ``history``.

Distributed: under torchrun (WORLD_SIZE > 1) each process takes a DistributedSampler shard of the
batches (--batch-size is per process) and gradients of the model and the critic are averaged with one
all-reduce per step (the manual form of DistributedDataParallel: the model is called part by part and
the critic and model steps alternate, which DDP's hooks do not follow); buffers (batch-norm running
statistics) are broadcast from rank 0 after each step as DDP does.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .datasets import dataset_info
from .errors import CvError
from .fools import check_rule, match_law
from .model import random_theta
from .modeldir import (MANIFEST, WEIGHTS, atomic_json, atomic_torch_save, atomic_write, load_model, read_manifest,
                       torch_load)
from .preprocess import spec_for

CHECKPOINT = Path("checkpoints") / "last.pt"
METRICS = "metrics.jsonl"
GP_SAMPLES = 16


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
    defense: str = "paper"  # cvconvert/defense.py: paper | exchange | symmetric
    defense_weight: float = 0.1
    fool_rule: str | None = None  # cvconvert/fools.py: random | match; None keeps the manifest's (random)
    val_fraction: float = 0.05
    train_limit: int | None = None
    log_every: int = 50


# --- distributed ------------------------------------------------------------------------------------

class Dist:
    """The process group when run under torchrun, else a one-process stand-in."""

    def __init__(self, device_kind: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device_kind == "cuda" else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            torch.distributed.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def average_grads(self, params, extra: torch.Tensor) -> torch.Tensor:
        """All-reduce-average the gradients of params (one flat buffer) and `extra` (summed stats)."""
        if not self.enabled:
            return extra
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [extra.reshape(-1)])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        off = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[off:off + n].view_as(p).clone()
            off += n
        return flat[off:].view_as(extra)

    def broadcast_buffers(self, module) -> None:
        if self.enabled:
            for b in module.buffers():
                torch.distributed.broadcast(b, 0)

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def close(self):
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def pick_device(name: str, dist_local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise CvError("--device cuda asked for, but no CUDA device is available (use --device cpu or auto)")
        return torch.device(name if ":" in name else f"cuda:{dist_local_rank}")
    if name != "cpu":
        raise CvError(f"unknown device {name!r} (auto, cpu or cuda)")
    return torch.device("cpu")


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


def _loss_fn(multilabel: bool):
    if multilabel:
        return lambda logits, y: F.binary_cross_entropy_with_logits(logits, y)
    return lambda logits, y: F.cross_entropy(logits, y)


def _errors(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> tuple[float, int]:
    """(number of errors, number of predictions): per attribute for multi-label data."""
    if multilabel:
        return float(((logits > 0).float() != y).sum()), y.numel()
    return float((logits.argmax(1) != y).sum()), y.shape[0]


# --- the steps ---------------------------------------------------------------------------------------------

def _derangement(n: int, device) -> torch.Tensor:
    """A random permutation with no fixed point (b must come from another sample)."""
    p = torch.randperm(n, device=device)
    out = torch.empty_like(p)
    out[p] = p.roll(1)
    return out


def negatives(a: torch.Tensor, b: torch.Tensor, k: int, offset: int) -> torch.Tensor:
    """a' = Re[(a + ib) e^{i dtheta}] = a cos(dtheta) - b sin(dtheta), dtheta = j pi / k, j cycling 1..k-1."""
    j = (torch.arange(a.shape[0], device=a.device) + offset) % (k - 1) + 1
    dtheta = (j.float() * (math.pi / k)).reshape((-1,) + (1,) * (a.dim() - 1))
    return a * torch.cos(dtheta) - b * torch.sin(dtheta)


def _gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    n = min(GP_SAMPLES, real.shape[0])
    eps = torch.rand((n,) + (1,) * (real.dim() - 1), device=real.device)
    mix = (eps * real[:n] + (1 - eps) * fake[:n]).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mix).sum(), mix, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


class Trainer:
    def __init__(self, model, manifest, cfg: TrainConfig, device, dist: Dist, multilabel: bool):
        self.model, self.manifest, self.cfg, self.device, self.dist = model, manifest, cfg, device, dist
        self.multilabel = multilabel
        self.loss_fn = _loss_fn(multilabel)
        self.critic = model.discriminator if model.is_complex else None
        self.k = int(cfg.k or manifest.get("k") or 8)
        # the additional variant's discriminator is never trained (no adversarial loss): leave it out
        critic_ids = {id(p) for p in model.discriminator.parameters()} if model.discriminator is not None else set()
        self.model_params = [p for p in model.parameters() if id(p) not in critic_ids]
        self.opt = torch.optim.Adam(self.model_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.copt = None
        if self.critic is not None:
            self.critic_params = list(self.critic.parameters())
            self.copt = torch.optim.Adam(self.critic_params, lr=cfg.critic_lr or cfg.lr, betas=(0.5, 0.9))
        self.fool_rule = check_rule(cfg.fool_rule or manifest.get("fool_rule") or "random")
        if self.fool_rule != "random" and not model.is_complex:
            raise CvError(f"--fool-rule {self.fool_rule} needs a complex model (this one is {manifest['variant']!r})")
        self.defense = None
        if model.is_complex:
            from .defense import make_defense
            self.defense = make_defense(cfg.defense, model, {"weight": cfg.defense_weight})
            if hasattr(self.defense, "to"):
                self.defense.to(device)
            if not self.defense.uses_paper_gan:
                self.critic = None  # the defense replaces the paper's WGAN term
            if dist.enabled and self.defense.parameters():
                raise CvError(f"--defense {cfg.defense} keeps a per-process critic: run it without torchrun")
        elif cfg.defense != "paper":
            raise CvError(f"--defense {cfg.defense} needs a complex model (this one is {manifest['variant']!r})")
        self.step = 0

    def _task(self, image):
        """Logits, and for the complex variant the real features a and their fooling counterparts b."""
        m = self.model
        if not m.is_complex:
            return m(image), None, None, None
        a = m.encoder.features(image)
        b = a[self._fool_index(image)]
        theta = random_theta(a.shape[0], a.device)  # training angles need no secrecy, but cost nothing
        x = m.encoder.combine(a, b, theta)  # the encoder's own mixing (a defense may change it)
        return m.decoder(m.processing(x), theta), a, b, x

    def _fool_index(self, image) -> torch.Tensor:
        """Which sample of the batch is each sample's fool: a derangement, or drawn by the match law."""
        n = image.shape[0]
        if self.fool_rule == "random" or n < 2:
            return _derangement(n, image.device)
        law = match_law(image.detach().flatten(1).cpu().numpy())
        return torch.multinomial(torch.from_numpy(law).float(), 1).squeeze(1).to(image.device)

    def train_step(self, image, y) -> dict:
        cfg, m = self.cfg, self.model
        gan = self.critic is not None and cfg.gan_weight > 0 and self.step % cfg.gan_every == 0
        logits, a, b, x = self._task(image)
        task_loss = self.loss_fn(logits, y)
        stats = {}
        loss = task_loss
        if self.defense is not None and not self.defense.uses_paper_gan:
            stats.update(self.defense.update(a, b, x))
            d_loss, d_stats = self.defense.extra_loss(a, b, x, self.step)
            loss = loss + d_loss
            stats.update(d_stats)
        if gan:
            scale = a.pow(2).mean().sqrt() + 1e-8
            # the game on a slice of the (already shuffled) batch: the critic's cost is the GAN's cost
            n = min(cfg.gan_batch or a.shape[0], a.shape[0])
            real, fake = a[:n] / scale, negatives(a[:n], b[:n], self.k, self.step) / scale
            # critic: maximise D(a) - D(a') (WGAN-GP), on the detached features of this very forward pass
            for _ in range(cfg.critic_steps):
                r, f = real.detach(), fake.detach()
                d_real, d_fake = self.critic(torch.cat((r, f))).chunk(2)  # no batch-norm in D: one call
                d_loss = d_fake.mean() - d_real.mean()
                c_loss = d_loss + cfg.gp_weight * _gradient_penalty(self.critic, r, f)
                self.copt.zero_grad(set_to_none=True)
                c_loss.backward()
                extra = self.dist.average_grads(self.critic_params, d_loss.detach().reshape(1))
                self.copt.step()
                stats["critic_loss"] = float(c_loss.detach())
                stats["wdist"] = -float(extra)  # the critic's estimate of W(a, a')
            # encoder/generator: minimise D(a) - D(a') with the critic frozen
            for p in self.critic_params:
                p.requires_grad_(False)
            d_real, d_fake = self.critic(torch.cat((real, fake))).chunk(2)
            g_loss = d_real.mean() - d_fake.mean()
            for p in self.critic_params:
                p.requires_grad_(True)
            loss = loss + cfg.gan_weight * g_loss
            stats["gan_loss"] = float(g_loss.detach())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        err, n = _errors(logits.detach(), y, self.multilabel)
        extra = self.dist.average_grads(self.model_params, torch.stack(
            [task_loss.detach(), loss.detach(), torch.tensor(err / n, device=loss.device)]))
        if not all(math.isfinite(float(v)) for v in extra):
            raise _NonFinite(self.step)
        self.opt.step()
        self.dist.broadcast_buffers(m)
        self.step += 1
        stats.update(loss=float(extra[1]), task_loss=float(extra[0]), error=float(extra[2]))
        return stats


class _NonFinite(Exception):
    def __init__(self, step):
        self.step = step


@torch.no_grad()
def evaluate(model, loader, device, multilabel: bool, limit: int | None = None, progress=None) -> dict:
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


# --- the run -------------------------------------------------------------------------------------------------

def _split_train_val(dataset, fraction: float, seed: int):
    from torch.utils.data import Subset

    n = len(dataset)
    n_val = int(round(n * fraction)) if fraction > 0 else 0
    if n_val == 0 or n_val >= n:
        return dataset, None
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    return Subset(dataset, perm[n_val:]), Subset(dataset, perm[:n_val])


def _rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise CvError(f"--resume: no checkpoint at {path} (train without --resume first)")
    ckpt = torch_load(path, f"checkpoint {path} does not load")
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "epoch"} <= set(ckpt):
        raise CvError(f"checkpoint {path} is not a cvconvert training checkpoint")
    return ckpt


class _Reporter:
    """A rich progress bar on a terminal, plain log lines otherwise (stderr; rank 0 only)."""

    def __init__(self, enabled: bool, total_steps: int, epochs: int):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.progress = None
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                                     console=Console(stderr=True), transient=False)
            self.progress.start()
        self.task = None

    def epoch(self, epoch: int, epochs: int, steps: int):
        if self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(f"epoch {epoch}/{epochs}", total=steps, stats="")

    def step(self, text: str, line: str | None):
        if self.progress is not None:
            self.progress.update(self.task, advance=1, stats=text)
        elif self.enabled and line:
            print(line, file=sys.stderr, flush=True)

    def log(self, msg: str):
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self):
        if self.progress is not None:
            self.progress.stop()


def _fmt(stats: dict) -> str:
    out = f"loss {stats['loss']:.4f} acc {1 - stats['error']:.3f}"
    if "wdist" in stats:
        out += f" W {stats['wdist']:.3f}"
    return out


def train(model_dir, cfg: TrainConfig, log=True) -> dict:
    """Train DIR in place; returns the run summary (also in the manifest's history)."""
    model_dir = Path(model_dir)
    read_manifest(model_dir)  # one-line errors for a missing / foreign dir before anything starts
    kind = "cuda" if (cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())) else "cpu"
    pick_device(cfg.device)  # fails before any process group is set up
    dist = Dist(kind)
    try:
        return _train(model_dir, cfg, pick_device(cfg.device, dist.local_rank), dist, log)
    finally:
        dist.close()


def _train(model_dir: Path, cfg: TrainConfig, device, dist: Dist, log: bool) -> dict:
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from .data import get_dataset

    if cfg.epochs < 1 and cfg.max_steps is None:
        raise CvError("--epochs must be at least 1")
    if cfg.batch_size < 1 or cfg.lr <= 0 or cfg.critic_steps < 1 or cfg.gan_every < 1:
        raise CvError("--batch-size, --lr, --critic-steps and --gan-every must be positive")
    if cfg.k is not None and cfg.k < 2:
        raise CvError("--k must be at least 2")
    model, manifest = load_model(model_dir)
    name, task, info = data_for(manifest, cfg.data, cfg.task)
    ckpt_path = model_dir / CHECKPOINT
    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    full = get_dataset(name, True, cfg.data_dir, task)
    if len(full) == 0:
        raise CvError(f"{name} training set is empty")
    if cfg.train_limit is not None and cfg.train_limit < len(full):  # a seeded random subset (benchmarks)
        from torch.utils.data import Subset
        keep = torch.randperm(len(full), generator=torch.Generator().manual_seed(cfg.seed + 1))[:cfg.train_limit]
        full = Subset(full, sorted(keep.tolist()))
    train_set, val_set = _split_train_val(full, cfg.val_fraction, cfg.seed)
    sampler = DistributedSampler(train_set, dist.world, dist.rank, shuffle=True, seed=cfg.seed) \
        if dist.enabled else None
    loader_gen = torch.Generator()
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=cfg.workers, drop_last=len(train_set) > cfg.batch_size * dist.world,
                        generator=loader_gen, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.workers > 0)
    val_loader = DataLoader(val_set, batch_size=max(cfg.batch_size, 256), num_workers=cfg.workers) \
        if val_set is not None else None

    model.to(device)
    trainer = Trainer(model, manifest, cfg, device, dist, info.multilabel)
    start_epoch, records, best = 1, [], None
    if ckpt is not None:
        from .modeldir import load_into
        load_into(model, ckpt["model"], f"checkpoint {ckpt_path}")
        try:
            trainer.opt.load_state_dict(ckpt["optimizer"])
            if trainer.copt is not None and ckpt.get("critic_optimizer"):
                trainer.copt.load_state_dict(ckpt["critic_optimizer"])
            if trainer.defense is not None and ckpt.get("defense"):
                trainer.defense.load_state_dict(ckpt["defense"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CvError(f"checkpoint {ckpt_path}: optimizer state does not match: {str(exc)[:200]}") from None
        start_epoch, records, best = ckpt["epoch"] + 1, list(json.loads(ckpt.get("metrics", "[]"))), ckpt.get("best")
        trainer.step = int(ckpt.get("step", 0))
        _set_rng_state(ckpt["rng"], device)
        if ckpt.get("epochs_planned") and cfg.epochs <= ckpt["epoch"]:
            raise CvError(f"--resume: the checkpoint already holds {ckpt['epoch']} epochs; "
                          f"pass --epochs greater than that to train on")
    epochs = cfg.epochs
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise CvError(f"{name}: fewer training images ({len(train_set)}) than one batch")
    rep = _Reporter(log and dist.main, steps_per_epoch, epochs)
    if dist.main and log:
        rep.log(f"training {manifest['variant']} {manifest['arch']} on {name} ({len(train_set)} images, "
                f"{dist.world} process{'es' if dist.world > 1 else ''}, {device.type}) from epoch {start_epoch}"
                + (f", GAN weight {cfg.gan_weight}, k={trainer.k}" if trainer.critic is not None else ""))
    run_start = time.time()
    last_good = ckpt_path if ckpt_path.exists() else model_dir / WEIGHTS
    stopped = None
    try:
        for epoch in range(start_epoch, epochs + 1):
            if sampler is not None:
                sampler.set_epoch(epoch)
            loader_gen.manual_seed(cfg.seed * 100003 + epoch)  # same order on resume
            model.train()
            rep.epoch(epoch, epochs, steps_per_epoch)
            t0 = time.time()
            sums, count = {}, 0
            for i, (image, y, _) in enumerate(loader):
                image, y = image.to(device, non_blocking=True), y.to(device, non_blocking=True)
                try:
                    stats = trainer.train_step(image, y)
                except _NonFinite as nf:
                    raise CvError(f"the loss became NaN/inf at epoch {epoch}, step {nf.step} (try a lower --lr); "
                                  f"stopped, the last good weights are kept in {last_good}") from None
                count += 1
                for key, v in stats.items():
                    sums[key] = sums.get(key, 0.0) + v
                every = max(1, min(cfg.log_every, steps_per_epoch // 5 or 1))
                rep.step(_fmt(stats), f"epoch {epoch} step {i + 1}/{steps_per_epoch} {_fmt(stats)}"
                         if (i + 1) % every == 0 else None)
                if cfg.max_steps is not None and trainer.step >= cfg.max_steps:
                    stopped = "max_steps"
                    break
            train_time = time.time() - t0
            rec = {"epoch": epoch, "steps": count, "global_step": trainer.step, "time_s": round(train_time, 3),
                   "images_per_s": round(count * cfg.batch_size * dist.world / max(train_time, 1e-9), 1)}
            rec.update({f"train_{k}": round(v / max(count, 1), 6) for k, v in sums.items()})
            if stopped:
                rec["partial"] = True
            if dist.main and val_loader is not None:
                rec.update({f"val_{k}": v for k, v in evaluate(model, val_loader, device, info.multilabel).items()})
            records.append(rec)
            val_err = rec.get("val_error", rec.get("train_error"))
            improved = best is None or val_err <= best["error"]
            if improved:
                best = {"epoch": epoch, "error": val_err}
            if dist.main:
                _save(model_dir, model, trainer, epoch, records, best, improved, cfg, manifest, name, task, device)
                last_good = ckpt_path
                msg = f"epoch {epoch}/{epochs}: {rec['time_s']:.1f}s, train loss {rec.get('train_loss', 0):.4f}, " \
                      f"train error {rec.get('train_error', 0):.4f}"
                if "val_error" in rec:
                    msg += f", val error {rec['val_error']:.4f}"
                if "train_wdist" in rec:
                    msg += f", W(a,a') {rec['train_wdist']:.3f}"
                rep.log(msg + (" (best)" if improved else ""))
            dist.barrier()
            if stopped:
                break
    finally:
        rep.close()
    summary = {"epochs": records[-1]["epoch"] if records else start_epoch - 1, "steps": trainer.step,
               "best": best, "time_s": round(time.time() - run_start, 2), "stopped": stopped,
               "world_size": dist.world}
    if os.environ.get("CVCONVERT_TEST_WEIGHT_DUMP"):  # test hook: each rank writes its final weights' hash
        import hashlib
        h = hashlib.sha256()
        for key, v in sorted(model.state_dict().items()):
            h.update(key.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        Path(f"{os.environ['CVCONVERT_TEST_WEIGHT_DUMP']}.{dist.rank}").write_text(h.hexdigest())
    return summary


def _save(model_dir, model, trainer, epoch, records, best, improved, cfg, manifest, name, task, device):
    """last.pt, then (when best) model.pt, then metrics.jsonl and the manifest: each written atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {"model": state, "optimizer": trainer.opt.state_dict(),
            "critic_optimizer": trainer.copt.state_dict() if trainer.copt is not None else None,
            "defense": trainer.defense.state_dict() if trainer.defense is not None else None,
            "epoch": epoch, "step": trainer.step, "best": best, "rng": _rng_state(device),
            "metrics": json.dumps(records), "epochs_planned": cfg.epochs, "config": json.dumps(asdict(cfg))}
    atomic_torch_save(ckpt, model_dir / CHECKPOINT)
    if improved:
        atomic_torch_save(state, model_dir / WEIGHTS)

    def write_metrics(tmp):
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    atomic_write(model_dir / METRICS, write_metrics)
    current = read_manifest(model_dir)
    current["history"] = {
        "data": {"name": name, "task": task}, "epochs": epoch, "steps": trainer.step, "best": best,
        "last": records[-1], "optimizer": {"name": "adam", "lr": cfg.lr, "batch_size": cfg.batch_size},
        "gan": ({"weight": cfg.gan_weight, "k": trainer.k, "critic_steps": cfg.critic_steps,
                 "gp_weight": cfg.gp_weight, "gan_every": cfg.gan_every} if trainer.critic is not None else None),
        "seed": cfg.seed}
    # what infer applies to images of the data set's own size: the steps this training used
    current.setdefault("data", {})["preprocess"] = spec_for(name, current["input_shape"])
    if cfg.k is not None:
        current["k"] = cfg.k
    if trainer.defense is not None:  # e.g. fool_sign: quadrant, so load_model rebuilds the same encoder
        current.update(trainer.defense.manifest_updates())
    if trainer.fool_rule == "random":  # infer and attack pick the fools the way the model was trained
        current.pop("fool_rule", None)
    else:
        current["fool_rule"] = trainer.fool_rule
    atomic_json(current, model_dir / MANIFEST)


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
    res = evaluate(model, loader, dev, info.multilabel, limit)
    out = {"data": name, "task": task, "split": "test", "variant": manifest["variant"], "arch": manifest["arch"],
           "error": round(res["error"], 6), "loss": round(res["loss"], 6), "n": res["n"],
           "multilabel": info.multilabel, "time_s": round(time.time() - t0, 2),
           "decoded_with": "the right key (random secret theta per image)" if model.is_complex else None}
    atomic_json(out, model_dir / "eval.json")
    return out
