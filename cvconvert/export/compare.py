"""How validation compares ONNX Runtime with PyTorch: fail on a mismatch, never warn.

Max-modulus pooling jumps where a window's top two |f|^2 tie, so float rounding alone can make two
runtimes pick different elements (the output then jumps by ~0.3 of its peak). A sample that differs
only there (its smallest top-two gap under TIE_GAP of its layer's peak |f|^2) is not a conversion
error: up to a quarter of a batch may, and a fresh draw replaces it (or, where the inputs are given,
it is left out). Measured on VGG-16 at 32x32: a sample with a gap of 5.8e-8 flipped in 12 of 20
validations; each sample's smallest gap lies between 4e-9 and 1e-6.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import CvError, one_line

TIE_GAP = 1e-5
TIE_DRAWS = 3


class TieFlip(CvError):
    """Every sample that differs sits at a max-modulus pooling tie (`samples`: the mask of them)."""

    def __init__(self, msg: str, samples: np.ndarray):
        super().__init__(msg)
        self.samples = samples


def compare(label: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float,
             gaps: np.ndarray | None = None) -> float:
    """Max abs diff; CvError on a mismatch, TieFlip when only tie samples (per `gaps`, see TIE_GAP) differ."""
    if got.shape != want.shape:
        raise CvError(f"{label}: ONNX Runtime output shape {list(got.shape)} != PyTorch {list(want.shape)}")
    if not np.isfinite(got).all():
        raise CvError(f"{label}: ONNX Runtime output has NaN/inf")
    if not got.size:
        return 0.0
    diff = float(np.max(np.abs(got - want)))
    # float32 rounding grows with magnitude (random-init deep ResNets reach 1e3): atol counts per unit
    # of the output's peak magnitude once that exceeds 1; rtol is elementwise, as in np.allclose.
    peak = max(1.0, float(np.max(np.abs(want))))
    bad = ~np.isclose(got, want, atol=atol * peak, rtol=rtol).reshape(len(got), -1).all(1)
    if not bad.any():
        return diff
    msg = (f"{label}: ONNX Runtime differs from PyTorch, max abs diff {diff:.3g} at peak |value| {peak:.3g} "
           f"(atol {atol:g} x peak, rtol {rtol:g})")
    ties = bad & (gaps < TIE_GAP) if gaps is not None else np.zeros_like(bad)
    if ties.sum() == bad.sum() <= max(1, len(bad) // 4):
        raise TieFlip(f"{msg}, only in {int(bad.sum())} sample(s) at a max-modulus pooling tie", bad)
    raise CvError(f"{msg}; nothing written")


def compare_outside_ties(label: str, got: np.ndarray, want: np.ndarray, gaps, atol: float,
                         rtol: float) -> tuple[float, int]:
    """(max abs diff, samples left out): as `compare`, but the samples that differ only at a max-modulus
    tie are left out of the check (for inputs that cannot be drawn again)."""
    try:
        return compare(label, got, want, atol, rtol, gaps), 0
    except TieFlip as tie:
        keep = ~tie.samples
        if not keep.any():
            raise CvError(f"{tie}: no sample left to check; nothing written") from None
        return compare(f"{label} (tie samples left out)", got[keep], want[keep], atol, rtol), int(tie.samples.sum())


def redraw_at_ties(check, redraws: list):
    """check(draw) for draw = 0, 1, ... until no TieFlip; each retried draw is appended to `redraws`."""
    for draw in range(TIE_DRAWS):
        try:
            return check(draw)
        except TieFlip as tie:
            if draw == TIE_DRAWS - 1:
                raise CvError(f"{tie}, in {TIE_DRAWS} draws in a row; nothing written") from None
            redraws.append(str(tie))


def noisy_check(label, got: np.ndarray, clean: np.ndarray, gamma: float, atol: float, rtol: float) -> float:
    """The noisy baseline draws fresh noise in the graph: check its scale, which is exact per sample
    (mean|out - a| = gamma * mean|a| by construction of NoiseInjection)."""
    dims = tuple(range(1, got.ndim))
    want = gamma * np.abs(clean).mean(axis=dims)
    have = np.abs(got - clean).mean(axis=dims)
    return compare(label + " (noise scale)", have, want, atol, max(rtol, 1e-3))


def clean_features(encoder, image: np.ndarray) -> np.ndarray:
    """A noisy baseline's feature before its noise: what the noise scale is measured against."""
    with torch.no_grad():
        a = encoder.body(encoder.normalize(torch.from_numpy(image)))
        return (encoder.generator(a) if encoder.generator is not None else a).numpy()


def ort_run(sess, feeds: dict, label: str) -> np.ndarray:
    try:
        return sess.run(None, feeds)[0]
    except Exception as exc:
        raise CvError(f"{label}: ONNX Runtime failed: {one_line(exc)}") from None
