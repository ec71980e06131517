"""One training loop for every attacker: minibatches, a rich progress task, per-epoch checkpoints in
REPORT_DIR/checkpoints (so an interrupted audit resumes), and an optional per-epoch evaluation."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import CvError
from ..modeldir import atomic_torch_save, torch_load


@dataclass
class Trainer:
    ckpt_dir: Path
    device: torch.device
    progress: object = None        # rich.progress.Progress or None
    resume: bool = False
    seed: int = 0
    meta: dict = field(default_factory=dict)  # what the checkpoints must match to be resumed

    def fit(self, name: str, net: torch.nn.Module, n_items: int, batch_fn: Callable, loss_fn: Callable,
            epochs: int, batch_size: int = 128, lr: float = 1e-3, eval_fn: Callable | None = None) -> list:
        """Train ``net`` for ``epochs`` passes over ``n_items`` items. ``batch_fn(idx, gen)`` returns
        (input, target) for the index tensor idx; ``eval_fn()`` returns a number logged per epoch.
        Returns the per-epoch history of eval_fn (or of the training loss)."""
        batch_size = min(batch_size, max(8, n_items // 8))  # small attacker sets: more, smaller steps
        net.to(self.device)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
        file = self.ckpt_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".pt")
        meta = {**self.meta, "name": name, "epochs": epochs, "n_items": n_items, "batch_size": batch_size}
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:16]
        start, history = 0, []
        if self.resume and file.is_file():
            ck = torch_load(file, f"cannot read attacker checkpoint {file}")  # optimizers move state to the params
            if ck.get("digest") != digest:
                raise CvError(f"checkpoint {file} was made with other settings (model, data or budget); "
                              f"run without --resume to start over")
            net.load_state_dict(ck["net"])
            opt.load_state_dict(ck["opt"])
            sched.load_state_dict(ck["sched"])
            start, history = int(ck["epoch"]), list(ck["history"])
        steps = (n_items + batch_size - 1) // batch_size
        task = self.progress.add_task(f"{name}", total=epochs * steps, completed=start * steps) \
            if self.progress is not None else None
        for epoch in range(start, epochs):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + int(digest[:6], 16))
            perm = torch.randperm(n_items, generator=gen)
            net.train()
            total = 0.0
            for i in range(steps):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                if len(idx) < 2 and n_items >= 2:  # batch-norm needs two samples
                    idx = perm[-2:]
                inp, target = batch_fn(idx, gen)
                loss = loss_fn(net(inp), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                if task is not None:
                    self.progress.advance(task)
            sched.step()
            net.eval()
            with torch.no_grad():
                history.append(float(eval_fn()) if eval_fn is not None else total / steps)
            atomic_torch_save({"digest": digest, "net": net.state_dict(), "opt": opt.state_dict(),
                               "sched": sched.state_dict(), "epoch": epoch + 1, "history": history}, file)
        if task is not None:
            self.progress.update(task, completed=epochs * steps)
        net.eval()
        return history
