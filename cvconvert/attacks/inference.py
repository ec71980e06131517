"""Property inference attacks 1-4 (paper Sec. 4.3) on the hidden property (e.g. the fine class).

1: a classifier trained on raw images, tested on dec(a*) (or on dec(a) for a baseline);
2: a classifier trained and tested on a* (or a);
3: a classifier trained and tested on dec(a*) (or dec(a));
4: k-NN (k = 1, 3, 5) of each a* against the attacker's training features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PropertyAttack
from .common import Standardize, batched
from .metrics import error_rate, is_multilabel
from .nets import SmallCNN


def _loss(multilabel: bool):
    return (lambda out, y: F.binary_cross_entropy_with_logits(out, y.float())) if multilabel else F.cross_entropy


def n_outputs(props: torch.Tensor) -> int:
    return props.shape[1] if is_multilabel(props) else int(props.max()) + 1


def train_classifier(ctx, name: str, inp_tr: torch.Tensor, y_tr: torch.Tensor, n_out: int,
                     eval_inp: torch.Tensor | None = None, eval_y: torch.Tensor | None = None):
    """Returns (net, per-epoch eval error history)."""
    net = torch.nn.Sequential(Standardize(inp_tr[:1024]), SmallCNN(inp_tr.shape[1], n_out))

    def batch_fn(idx, gen):
        return inp_tr[idx].to(ctx.device), y_tr[idx].to(ctx.device)

    eval_fn = (lambda: error_rate(predict(ctx, net, eval_inp), eval_y)) if eval_inp is not None else None
    hist = ctx.trainer.fit(name, net, len(inp_tr), batch_fn, _loss(is_multilabel(y_tr)),
                           epochs=ctx.budget.epochs("classifier"), batch_size=128, eval_fn=eval_fn)
    return net, hist


def predict(ctx, net, inp: torch.Tensor) -> torch.Tensor:
    return batched(net, inp, batch_size=512, device=ctx.device)


KNN_MAX = 5  # neighbours are found once for the largest k and shared


@torch.no_grad()
def neighbours(ctx, query: torch.Tensor, ref: torch.Tensor, kmax: int = KNN_MAX) -> torch.Tensor:
    """Indices of each query's kmax nearest ref items (Euclidean on flattened, standardised features),
    remembered for the last (query, ref) pair."""
    memo = ctx.cache.get("neighbours")
    if memo is not None and memo[0] is query and memo[1] is ref and memo[2] >= kmax:
        return memo[3]
    mu, sd = ref.flatten(1).mean(0), ref.flatten(1).std(0).clamp_min(1e-6)
    r = ((ref.flatten(1) - mu) / sd).to(ctx.device)
    nbrs = []
    for i in range(0, len(query), 256):
        q = ((query[i:i + 256].flatten(1) - mu) / sd).to(ctx.device)
        nbrs.append(torch.cdist(q, r).topk(kmax, largest=False).indices.cpu())
    nbrs = torch.cat(nbrs)
    ctx.cache["neighbours"] = (query, ref, kmax, nbrs)
    return nbrs


def knn_predict(ctx, query, ref, ref_y, k: int) -> torch.Tensor:
    votes = ref_y[neighbours(ctx, query, ref)[:, :k]]
    if is_multilabel(ref_y):
        return (votes.float().mean(1) > 0.5).float() * 2 - 1  # logits-like sign for error_rate
    n_cls = ctx.n_props
    score = F.one_hot(votes, n_cls).float().sum(1) + 0.5 * F.one_hot(votes[:, 0], n_cls)
    return score.argmax(1)  # majority vote; a tie goes to the nearest neighbour's label


class Classifier(PropertyAttack):
    """Attacks 1-3 and the adaptive probes: a small CNN on whatever view it is given. ``ckpt`` names its
    checkpoint; ``history``, when set, is the label its per-epoch error on ``monitor`` is logged under."""

    def __init__(self, public, ckpt: str, history: str | None = None):
        super().__init__()
        self.public, self.ckpt, self.history_label = public, ckpt, history

    def fit(self, inputs, props, monitor=None) -> "Classifier":
        if not self.fitted:
            n_out = self.public.n_props
            watch = monitor if self.history_label else (None, None)
            self.net, hist = train_classifier(self.public, self.ckpt, inputs, props, n_out, *watch)
            if self.history_label:
                self.history = {self.history_label: hist}
            self.fitted = True
        return self

    def predict(self, inputs):
        return predict(self.public, self.net, inputs)


class KNN(PropertyAttack):
    """Attack 4: the majority label of the k nearest attacker features (standardised Euclidean)."""

    def __init__(self, public, k: int):
        super().__init__()
        self.public, self.k = public, k

    def fit(self, inputs, props, monitor=None) -> "KNN":
        self.ref, self.ref_y, self.fitted = inputs, props, True
        return self

    def predict(self, inputs):
        return knn_predict(self.public, inputs, self.ref, self.ref_y, self.k)
