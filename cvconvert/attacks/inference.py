"""Property inference attacks 1-4 (paper Sec. 4.3) on the hidden property (e.g. the fine class).

1: a classifier trained on raw images, tested on dec(a*) (or on dec(a) for a baseline);
2: a classifier trained and tested on a* (or a);
3: a classifier trained and tested on dec(a*) (or dec(a));
4: k-NN (k = 1, 3, 5) of each a* against the attacker's training features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


@torch.no_grad()
def knn_errors(ctx, query: torch.Tensor, ref: torch.Tensor, ref_y: torch.Tensor, y: torch.Tensor,
               ks=(1, 3, 5)) -> dict:
    """Euclidean k-NN on flattened, standardised features."""
    mu, sd = ref.flatten(1).mean(0), ref.flatten(1).std(0).clamp_min(1e-6)
    r = ((ref.flatten(1) - mu) / sd).to(ctx.device)
    kmax = max(ks)
    nbrs = []
    for i in range(0, len(query), 256):
        q = ((query[i:i + 256].flatten(1) - mu) / sd).to(ctx.device)
        nbrs.append(torch.cdist(q, r).topk(kmax, largest=False).indices.cpu())
    nbrs = torch.cat(nbrs)
    out = {}
    for k in ks:
        votes = ref_y[nbrs[:, :k]]
        if is_multilabel(ref_y):
            pred = (votes.float().mean(1) > 0.5).float() * 2 - 1  # logits-like sign for error_rate
        else:
            n_cls = int(max(ref_y.max(), y.max())) + 1
            score = F.one_hot(votes, n_cls).float().sum(1) + 0.5 * F.one_hot(votes[:, 0], n_cls)
            pred = score.argmax(1)  # majority vote; a tie goes to the nearest neighbour's label
        out[f"{k}-NN"] = error_rate(pred, y)
    return out
