"""What the query guard decides per image (``Verdict``), and the guard turned off (``NoGuard``: the audit's
picture of the old device). numpy only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Verdict:
    """Per image: "send"; "cached" (an exact repeat: logits from an earlier send, ``ref`` its entry);
    "same" (a repeat of image ``ref`` of this request); "similar" (its transmission would tell it from its
    fools: answered from the related earlier image ``ref``); "refuse" (matches a fool sent before);
    "tells" (would tell, and nothing to answer from); "busy" (repeat of a send whose answer is missing).
    ``why`` of a sent image: how its fools were found ("coin": pool fools keeping a fresh secret coin,
    "mirror": mirrored fools, "typical": no coin kept, fools of the request's kind); of a "similar" one (or
    "tells"): "stands out" (nearer its earlier image than the fools sent lie to theirs) or "share" (sending
    would lift its kind's share at its level over chance); "" otherwise."""
    action: list
    ref: list
    cosine: np.ndarray
    logits: list
    why: list
    fool_keys: np.ndarray | None = None  # the index keys of the fools reserved for the images to send


class NoGuard:
    """The guard turned off (the audit's picture of the old device): every image is sent, fools are taken
    without the screen. The fool pool's own rules still hold."""

    path, threshold, capacity, stamp = None, None, 0, 0

    def stored_generation(self):
        return None

    def pending_keys(self) -> set:
        return set()

    def forget(self, keys) -> None:
        pass

    def screen_and_reserve(self, features, send_fools, images=None, model="", parts=2, embed=None):
        n = len(features)
        fools = [send_fools(i, None, None) for i in range(n)]
        return (Verdict(["send"] * n, [None] * n, np.full(n, -1.0), [None] * n, [""] * n, np.zeros(0, np.int64)),
                [getattr(f, "features", f) for f in fools], np.zeros(0, np.int64))

    def store_logits(self, keys, logits) -> None:
        pass
