"""Training checkpoints: the RNG states and a checkpoint's load and restore (resume with the same draws)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from .errors import CvError
from .modeldir import load_into, torch_load


def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device) -> None:
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


def restore(trainer, ckpt: dict, path: Path, cfg, device) -> tuple[int, list, dict]:
    """Load a checkpoint into the trainer and the RNGs; returns (first epoch to run, records, best)."""
    load_into(trainer.model, ckpt["model"], f"checkpoint {path}")
    try:
        trainer.opt.load_state_dict(ckpt["optimizer"])
        # checkpoints written before the paper's WGAN became a defense keep its optimizer on its own
        state = ckpt.get("defense") or ({"opt": ckpt["critic_optimizer"]} if ckpt.get("critic_optimizer") else None)
        if trainer.defense is not None and state:
            trainer.defense.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CvError(f"checkpoint {path}: optimizer state does not match: {str(exc)[:200]}") from None
    trainer.step = int(ckpt.get("step", 0))
    set_rng_state(ckpt["rng"], device)
    if ckpt.get("epochs_planned") and cfg.epochs <= ckpt["epoch"]:
        raise CvError(f"--resume: the checkpoint already holds {ckpt['epoch']} epochs; "
                      f"pass --epochs greater than that to train on")
    return ckpt["epoch"] + 1, list(json.loads(ckpt.get("metrics", "[]"))), ckpt.get("best")
