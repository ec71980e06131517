"""Which of the P candidate rows is the image, and the image read from the chosen one (P-part models).

``WhichRow`` is a per-row scorer s trained as a P-way classifier (softmax over s(row_1..row_P)) on the
attacker's own simulated transmissions, de-rotated perfectly: the rows of F = [a; b_1; ...] in a random
order. This is the strongest position the attacker can train from (it knows its own keys); it is then
applied to the victims' candidates R_hat x from the best rotation search. Its accuracy counts a pick as
right when the picked candidate is the one closest (largest |cos|) to the image's true feature a, so it
measures "which row is the image" after the attacker's own de-rotation; chance is 1/P.

``FromPicked`` reconstructs the image from the picked candidate with the audit's inverter (a U-Net
trained on a -> image); ``BestOfRows`` scores the better of the P candidates' reconstructions, a bound
that needs the truth (the attacker cannot know which one it is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Memo, ReconstructionAttack, _FitsOnPublic
from .common import Standardize, batched
from .metrics import per_sample_mae
from .nets import SmallCNN
from .rowsearch import simulate


class RowScorer(torch.nn.Module):
    """s(row) for every row of [N, P, ...] -> logits [N, P] (one network shared by the rows)."""

    def __init__(self, sample: torch.Tensor):
        super().__init__()
        self.net = torch.nn.Sequential(Standardize(sample), SmallCNN(sample.shape[1], 1))

    def forward(self, cand):
        n, p = cand.shape[:2]
        return self.net(cand.flatten(0, 1)).reshape(n, p)


def shuffled(f: torch.Tensor, gen: torch.Generator):
    """(rows of f in a random order per item, the position the image's row went to)."""
    n, p = f.shape[:2]
    perm = torch.argsort(torch.rand(n, p, generator=gen), 1)
    return f[torch.arange(n)[:, None], perm], (perm == 0).float().argmax(1)


class WhichRow(_FitsOnPublic):
    """The which-row-is-the-image classifier; ``bank``: draw the simulated fools from these features
    instead of the attacker's own (a control where fools are told apart easily)."""
    id, label, stage = "which_row", "which-row classifier on the search's candidates", "which row"

    def __init__(self, parts: int, bank: torch.Tensor | None = None):
        super().__init__()
        self.parts, self.bank, self._memo = parts, bank, Memo()

    def _fit(self, public) -> None:
        a_tr = public.tr["a"]
        self.net = RowScorer(a_tr[:1024])

        def batch_fn(idx, gen):
            _, f, _ = simulate(public, idx, self.parts, gen, self.bank)
            cand, target = shuffled(f, gen)
            return cand.to(public.device), target.to(public.device)

        hist = public.trainer.fit(f"parts{self.parts}_which_row" + ("_bank" if self.bank is not None else ""),
                                  self.net, len(a_tr), batch_fn, F.cross_entropy,
                                  epochs=public.budget.epochs("classifier"), batch_size=64)
        self.history = {f"which-row classifier, P={self.parts} (train)": hist}

    def pick(self, cand: torch.Tensor) -> torch.Tensor:
        """The index of the row the classifier takes for the image, per transmission."""
        return self._memo.get(cand, lambda c: batched(self.net, c, device=self.public.device).argmax(1))


def take(cand: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return cand[torch.arange(len(cand)), idx]


class FromPicked(ReconstructionAttack):
    """The inverter applied to the candidate the which-row classifier picks."""
    id, label, stage = "picked_row", "dec(picked candidate): search + which-row + inverter", "which row"

    def __init__(self, search, which: WhichRow, inverter):
        super().__init__()
        self.search, self.which, self.inverter = search, which, inverter

    def _fit(self, public) -> None:
        self.search.fit(public)
        self.which.fit(public)
        self.history = self.inverter.fit(public).history

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        cand = self.search.candidates(x)
        return self.inverter.reconstruct(take(cand, self.which.pick(cand)))


class BestOfRows(FromPicked):
    """Every candidate through the inverter, scored by the best one per image (needs the truth)."""
    id, label = "best_of_rows", "dec(each candidate), the better of the P (oracle bound)"

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        cand = self.search.candidates(x)
        return torch.stack([self.inverter.reconstruct(cand[:, j]) for j in range(cand.shape[1])])

    def score(self, images: torch.Tensor, truth: torch.Tensor) -> dict:
        err = torch.stack([per_sample_mae(im, truth) for im in images]).min(0).values
        return {"mae": float(err.mean()), "psnr": None, "ssim": None,
                "note": "the best of the P candidates per image: needs the truth, so a bound, not an attack"}

    def pictures(self, images: torch.Tensor, k: int) -> list:
        return [(f"candidate {j}", images[j][:k]) for j in range(len(images))]
