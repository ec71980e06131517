"""Scores: reconstruction (mean abs pixel error, PSNR, SSIM), circular angle error, error rates."""

from __future__ import annotations

import math

import torch

CHANCE_ANGLE = math.pi / 2  # mean |error| of a uniformly random guess on the circle


def circular_error(theta_hat: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """|theta_hat - theta| wrapped into [0, pi]."""
    d = theta_hat - theta
    return torch.atan2(torch.sin(d), torch.cos(d)).abs()


def angle_summary(err: torch.Tensor) -> dict:
    err = err.float()
    return {"mean_abs_error_rad": float(err.mean()), "median_rad": float(err.median()),
            "frac_below_0.1rad": float((err < 0.1).float().mean()), "chance_rad": CHANCE_ANGLE}


def reconstruction(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """Both in [0, 1], [N, C, H, W]. Mean abs pixel error is the paper's E||I - I_hat||."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    pred, target = pred.float().clamp(0, 1).cpu(), target.float().cpu()
    out = {"mae": float((pred - target).abs().mean()),
           "psnr": float(peak_signal_noise_ratio(pred, target, data_range=1.0))}
    # SSIM's 11x11 window needs images of at least 11 pixels a side
    out["ssim"] = float(structural_similarity_index_measure(pred, target, data_range=1.0)) \
        if min(pred.shape[-2:]) >= 11 else None
    return out


def per_sample_mae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float().clamp(0, 1) - target.float()).abs().flatten(1).mean(1)


def is_multilabel(y: torch.Tensor) -> bool:
    return y.dim() == 2


def error_rate(logits_or_pred: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 error (int labels) or mean per-attribute error (multi-hot labels, logits > 0)."""
    if is_multilabel(y):
        return float(((logits_or_pred > 0).float() != (y > 0.5).float()).float().mean())
    pred = logits_or_pred.argmax(1) if logits_or_pred.dim() == 2 else logits_or_pred
    return float((pred != y).float().mean())


def chance_error(train_y: torch.Tensor, eval_y: torch.Tensor) -> float:
    """Error of always guessing the attacker-training split's most frequent label (per attribute)."""
    if is_multilabel(train_y):
        guess = (train_y.float().mean(0) > 0.5).float()
        return float((guess.unsqueeze(0) != (eval_y > 0.5).float()).float().mean())
    majority = torch.bincount(train_y.long()).argmax()
    return float((eval_y != majority).float().mean())
