"""`cvconvert train`: train a model directory in place (task loss; + a phase-hiding defense for the complex variant).

Runs unchanged under torchrun: `torchrun --nproc-per-node 2 -m cvconvert.cli train DIR ...` (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cvconvert.datasets import dataset_names

from ._app import command, emit_json, info


@command("train")
def train(
    model_dir: Path = typer.Argument(..., help="Model directory written by `cvconvert convert`."),
    data: Optional[str] = typer.Option(None, help=f"{' | '.join(dataset_names())} (default: the data set the "
                                                  "model was converted for)."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder holding the data set's files."),
    task: Optional[str] = typer.Option(None, help="fine | coarse (Fashion-MNIST's 4 superclasses)."),
    epochs: int = typer.Option(10, help="Epochs in total (with --resume: including those already done)."),
    batch_size: int = typer.Option(128, help="Batch size per process."),
    lr: float = typer.Option(1e-3, help="Adam learning rate of the model."),
    weight_decay: float = typer.Option(0.0, help="Adam weight decay."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    seed: int = typer.Option(0, help="Seed of the initialisation-free randomness (data order, split, GAN)."),
    workers: int = typer.Option(0, help="DataLoader worker processes."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimiser steps (smoke runs)."),
    resume: bool = typer.Option(False, help="Continue from DIR/checkpoints/last.pt."),
    k: Optional[int] = typer.Option(None, help="--defense paper: 1 real + k-1 rotated negatives (default: the manifest's k)."),
    gan_weight: float = typer.Option(0.01, help="--defense paper: weight of the WGAN loss in the model's loss (0: none; "
                                                "see docs/results.md for 0.1 vs 0.01)."),
    critic_steps: int = typer.Option(1, help="Critic updates per GAN step."),
    critic_lr: Optional[float] = typer.Option(None, help="Critic learning rate (default: --lr)."),
    gp_weight: float = typer.Option(10.0, help="WGAN-GP gradient-penalty weight."),
    gan_every: int = typer.Option(1, help="Do the critic + adversarial step on every N-th batch only."),
    gan_batch: Optional[int] = typer.Option(None, help="Samples of each batch the critic and the adversarial "
                                                       "loss see (default: all; fewer is cheaper)."),
    defense: Optional[str] = typer.Option(None, help="Phase-hiding defense of the complex variant: exchange "
                                                     "(the exchange key law: the fool's sign follows theta's quadrant) | paper (Eqs. 8-9 WGAN, to "
                                                     "reproduce the paper) | symmetric (exchange + a sign critic). "
                                                     "Default: the model's own, else exchange; see "
                                                     "docs/results.md."),
    defense_weight: float = typer.Option(0.1, help="Weight of the symmetric defense's loss."),
    fool_rule: Optional[str] = typer.Option(None, help="How each image's fooling image is picked: random (the "
                                                       "paper) | match (favours distant pairs, keeps them "
                                                       "exchangeable); recorded for infer and attack. "
                                                       "Default: the model's own, else match (random for a "
                                                       "model trained before without a rule)."),
    val_fraction: float = typer.Option(0.05, help="Share of the training set held out to pick the best epoch."),
    train_limit: Optional[int] = typer.Option(None, help="Train on a seeded random subset of this many images."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout."),
):
    """Train DIR; the best weights go to DIR/model.pt, the last checkpoint to DIR/checkpoints/last.pt."""
    from cvconvert.errors import CvError
    from cvconvert.train import TrainConfig, train as run

    if not 0 <= val_fraction < 1:
        raise CvError("--val-fraction must be in [0, 1)")
    if max_steps is not None and max_steps < 1:
        raise CvError("--max-steps must be at least 1")
    if gan_batch is not None and gan_batch < 2:
        raise CvError("--gan-batch must be at least 2")
    if train_limit is not None and train_limit < 1:
        raise CvError("--train-limit must be at least 1")
    cfg = TrainConfig(data=data, data_dir=str(data_dir) if data_dir else None, task=task, epochs=epochs,
                      batch_size=batch_size, lr=lr, weight_decay=weight_decay, device=device, seed=seed,
                      workers=workers, max_steps=max_steps, resume=resume, k=k, gan_weight=gan_weight,
                      critic_steps=critic_steps, critic_lr=critic_lr, gp_weight=gp_weight, gan_every=gan_every,
                      gan_batch=gan_batch, defense=defense, defense_weight=defense_weight, fool_rule=fool_rule,
                      val_fraction=val_fraction, train_limit=train_limit)
    summary = run(model_dir, cfg)
    import os
    if os.environ.get("RANK", "0") != "0":
        return
    if as_json:
        emit_json(summary)
    else:
        best = summary["best"] or {}
        info(f"trained {model_dir}: {summary['epochs']} epoch(s), {summary['steps']} steps in {summary['time_s']}s; "
             f"best epoch {best.get('epoch')} (error {best.get('error', float('nan')):.4f}) -> {model_dir}/model.pt")
