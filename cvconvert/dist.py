"""Devices and the process group: one process, or several under torchrun.

``pick_device`` turns ``--device auto|cpu|cuda[:N]`` into a torch.device with a one-line error when the
request cannot be met. ``Dist`` is the torchrun process group (gloo on CPU, nccl on CUDA), or a
one-process stand-in whose collectives do nothing, so training code calls them unconditionally.
"""

from __future__ import annotations

import os

import torch

from .errors import CvError


def pick_device(name: str, dist_local_rank: int = 0) -> torch.device:
    """The device for --device NAME (``auto``: CUDA when available); under torchrun, cuda means this
    process's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise CvError("--device cuda asked for, but no CUDA device is available (use --device cpu or auto)")
        return torch.device(name if ":" in name else f"cuda:{dist_local_rank}")
    if name != "cpu":
        raise CvError(f"unknown device {name!r} (auto, cpu or cuda)")
    return torch.device("cpu")


def device_kind(name: str) -> str:
    """``cuda`` or ``cpu``: which process-group backend --device NAME needs (before the group exists)."""
    return "cuda" if (name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())) else "cpu"


class Dist:
    """The process group when run under torchrun (WORLD_SIZE > 1), else a one-process stand-in."""

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
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0

    def average_grads(self, params, extra: torch.Tensor) -> torch.Tensor:
        """All-reduce-average the gradients of params and `extra` (per-step statistics) in one flat buffer;
        returns the averaged `extra`. What DistributedDataParallel's hooks do, done by hand because the
        model is called part by part and critic and model steps alternate."""
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
        """Copy rank 0's buffers (batch-norm running statistics) to every process, as DDP does."""
        if self.enabled:
            for b in module.buffers():
                torch.distributed.broadcast(b, 0)

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def close(self):
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
